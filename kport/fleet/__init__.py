"""The fleet: every host's events in one NATS JetStream stream, exported by a client of
each host's ports (``exporter.py``) and read back by the faces (``reader.py``); the
names both sides agree on are in ``subjects.py``."""
