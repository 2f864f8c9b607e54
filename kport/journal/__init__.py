"""The event journal: every event the daemon emits, kept in one SQLite file.

:mod:`~kport.journal.store` appends (off the delivery path), commits, replays and keeps
the limits (:mod:`~kport.journal.retention`) in the chunks of
:mod:`~kport.journal.chunks`; :mod:`~kport.journal.reader` answers queries over what is
committed; :mod:`~kport.journal.query` is the filter both a client and the reader use.

Nothing is imported here: a client that checks its filters with
:class:`~kport.journal.query.Query` loads neither SQLite nor zstd.
"""
