"""The names of named objects: which are valid, and the daemon's namespace port.

Both sides check a name: the client before it sends (a ``ValueError`` at the call that
made the mistake) and the namespace when it receives one.
"""

from __future__ import annotations

import re
from typing import Any, Final

#: the port of the daemon's namespace
DEFAULT_PORT: Final = "objects"
MAX_NAME: Final = 255
_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


def validate_name(name: Any) -> str:
    """A valid object name, or ValueError naming the rule it breaks."""
    if not isinstance(name, str):
        raise ValueError(f"an object name is a string, not {type(name).__name__}")
    if not 1 <= len(name) <= MAX_NAME:
        raise ValueError(f"object name {name!r} must be 1 to {MAX_NAME} characters long")
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"object name {name!r} may hold only letters, digits, '-', '_', '.' and '/' "
            "between parts (no leading, trailing or double '/')"
        )
    if any(part in (".", "..") for part in name.split("/")):
        raise ValueError(f"object name {name!r} may not have '.' or '..' as a part")
    return name
