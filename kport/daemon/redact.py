"""Secrets kept out: the values in a command line that look like secrets (passwords,
tokens, a URL's password, an Authorization header) replaced by ``***`` before an event
leaves the daemon — for its ports, its journal, and so the fleet and the web UI.

The daemon redacts each event once, on its way to delivery, after the sources' rules
have decided on the original command line (a rule may need the real value). A command
line without anything that looks like a secret costs one search of its arguments joined
together, and comes back as the very list it was (see :meth:`Redactor.argv`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, MutableMapping
from typing import Any, Final

#: what a redacted value becomes
MASK: Final = "***"

# A secret's name, as an option (--db-password) or an assignment (PGPASSWORD=...): words
# that may end any name, and words that end one only when they are all of it or follow a
# separator (so that --bypass and --compass are left alone).
_GLUED = (
    r"password|passwd|passphrase|secret|token|api[-_]?key|access[-_]?key|"
    r"private[-_]?key|credentials?|storepass|keypass"
)
_SEPARATE = r"pass|pwd|auth"
_NAME: Final = re.compile(
    rf"(?ai)(?!(?:no|ask|skip|prompt|without|disable)[-_])"
    rf"(?:[\w.-]*(?:{_GLUED})|(?:[\w.-]*[-_.])?(?:{_SEPARATE}))"
)
# Inside any argument: a URL's password (the user kept), an Authorization-like header
# (its scheme kept), a secret's name in a query string.
_INLINE: Final = re.compile(
    r"(?ai)"
    r"(?P<url>[a-z][a-z0-9+.-]*://[^\s/@:]*:)[^\s/@]+(?=@)"
    r"|(?P<header>\b(?:proxy-)?authorization\s*:\s*"
    r"(?:(?:basic|bearer|digest|token|negotiate|ntlm)\s+)?"
    r"|\b(?:x-api-key|x-auth-token|cookie)\s*:\s*)\S.*"
    rf"|(?P<query>[?&;](?:[\w.-]*(?:{_GLUED})|{_SEPARATE})=)[^&#\s]+"
)


def _candidate(text: str) -> bool:
    """The cheap test first: without any of these, there is nothing for the rules above
    to find (they match ASCII letters in either case; ``in`` on the lowered text is
    several times faster than a case-blind regular expression)."""
    text = text.lower()
    return (
        "pass" in text
        or "pwd" in text
        or "secret" in text
        or "token" in text
        or "key" in text
        or "auth" in text
        or "credential" in text
        or "cookie" in text
        or "://" in text
    )


#: programs whose -pVALUE is a password (-p alone asks for one; -p NAME is a database)
MYSQL_LIKE: Final = frozenset(
    {
        "mysql",
        "mysqldump",
        "mysqladmin",
        "mysqlimport",
        "mysqlshow",
        "mysqlcheck",
        "mysqlpump",
        "mysqlslap",
        "mysqlbinlog",
        "mariadb",
        "mariadb-dump",
        "mariadb-admin",
        "mariadb-import",
        "mariadb-show",
        "mariadb-check",
        "mariadb-slap",
        "mariadb-binlog",
    }
)
#: programs whose -u/--user (and proxy's) is user:password
CURL_LIKE: Final = frozenset({"curl"})
_CURL_USER: Final = frozenset({"-u", "--user", "-U", "--proxy-user"})
#: programs whose -p takes the password, attached or as the next argument
SSHPASS: Final = "sshpass"
#: every program that is looked at whatever its arguments say
_PROGRAMS: Final = MYSQL_LIKE | CURL_LIKE | {SSHPASS}


class RedactError(ValueError):
    """A pattern of the configuration's [redact] that is not a usable regular expression."""


def compile_patterns(patterns: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    """The configuration's extra patterns, compiled; :class:`RedactError` names a bad one."""
    compiled = []
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise RedactError(f"pattern {pattern!r} is not a regular expression: {err}") from err
        if regex.groups > 1:
            raise RedactError(
                f"pattern {pattern!r} has {regex.groups} groups: give it one (the part "
                "replaced) or none (the whole match replaced); (?:...) groups nothing"
            )
        if regex.search(""):
            raise RedactError(f"pattern {pattern!r} matches an empty string")
        compiled.append(regex)
    return tuple(compiled)


def _inline(match: re.Match[str]) -> str:
    kept = match.group("url") or match.group("header") or match.group("query")
    return kept + MASK


def _user_password(value: str) -> str:
    user, colon, _ = value.partition(":")
    return f"{user}:{MASK}" if colon else value


class Redactor:
    """The built-in rules (``defaults``) and the configuration's ``patterns``, compiled."""

    def __init__(self, *, defaults: bool = True, patterns: Iterable[str] = ()) -> None:
        self.defaults = defaults
        self.patterns = compile_patterns(patterns)

    def argv(self, argv: list[str]) -> tuple[list[str], bool]:
        """``argv`` with its secrets replaced, and whether any was; the same list, not a
        copy, when nothing was (and never changed in place: the process table shares it)."""
        if not argv:
            return argv, False
        out = argv
        if self.defaults and (
            _candidate("\0".join(argv)) or argv[0].rpartition("/")[2] in _PROGRAMS
        ):
            out = self._defaults(argv)
        out = self._patterns(out)
        return out, out is not argv

    def event(self, event: MutableMapping[str, Any]) -> bool:
        """Redact an event's (or a request's) ``argv``, ``argv_bytes`` and ``cmdline`` in
        place (each replaced, not changed), and say so in ``redacted``; whether it was."""
        redacted = False
        for key in ("argv", "cmdline"):
            value = event.get(key)
            if value and isinstance(value, list):
                new, changed = self.argv(value)
                if changed:
                    event[key] = new
                    redacted = True
        raw = event.get("argv_bytes")
        if raw and isinstance(raw, list):
            text = [b.decode("utf-8", "surrogateescape") for b in raw]
            new, changed = self.argv(text)
            if changed:
                event["argv_bytes"] = [a.encode("utf-8", "surrogateescape") for a in new]
                redacted = True
        if redacted:
            event["redacted"] = True
        return redacted

    def _defaults(self, argv: list[str]) -> list[str]:
        """The built-in rules; ``argv`` itself when they change nothing."""
        program = argv[0].rpartition("/")[2]
        mysql = program in MYSQL_LIKE
        curl = program in CURL_LIKE
        sshpass = program == SSHPASS
        out: list[str] | None = None
        value_next = False  # the argument before named a secret that this one is
        user_next = False  # ... named curl's user:password
        for i, arg in enumerate(argv):
            new = arg
            hot = _candidate(arg)
            if i == 0:
                pass
            elif value_next:
                new = MASK
                value_next = False
            elif user_next:
                new = _user_password(arg)
                user_next = False
            elif (mysql or sshpass) and arg.startswith("-p") and len(arg) > 2:
                new = "-p" + MASK  # -pSECRET; a long option is --p...
            elif sshpass and arg == "-p":
                value_next = True
            elif arg.startswith("-") and len(arg) > 1:
                bare = arg.lstrip("-")
                dashes = arg[: len(arg) - len(bare)]
                name, equals, value = bare.partition("=")
                if hot and len(dashes) <= 2 and _NAME.fullmatch(name):
                    if equals:
                        new = f"{dashes}{name}={MASK}" if value else arg
                    else:
                        value_next = True
                elif curl:
                    if arg in _CURL_USER:
                        user_next = True
                    elif equals and f"{dashes}{name}" in _CURL_USER:
                        new = f"{dashes}{name}={_user_password(value)}"
                    elif arg.startswith("-u") and len(arg) > 2 and not arg.startswith("--"):
                        new = "-u" + _user_password(arg[2:])
            else:
                name, equals, value = arg.partition("=")
                if hot and equals and value and _NAME.fullmatch(name):
                    new = f"{name}={MASK}"
            if hot and new is arg:
                new = _INLINE.sub(_inline, arg)
            if new != arg:
                if out is None:
                    out = list(argv)
                out[i] = new
        return argv if out is None else out

    def _patterns(self, argv: list[str]) -> list[str]:
        """The configuration's patterns, each searched in each argument; ``argv`` itself
        when they change nothing."""
        if not self.patterns:
            return argv
        out: list[str] | None = None
        for i, arg in enumerate(argv):
            new = arg
            for pattern in self.patterns:
                new = pattern.sub(_masked, new)
            if new != arg:
                if out is None:
                    out = list(argv)
                out[i] = new
        return argv if out is None else out


def _masked(match: re.Match[str]) -> str:
    """A pattern's match with its one group (else all of it) replaced."""
    if match.re.groups == 1 and match.start(1) >= 0:
        whole = match.group(0)
        start, end = match.start(1) - match.start(0), match.end(1) - match.start(0)
        return whole[:start] + MASK + whole[end:]
    return MASK
