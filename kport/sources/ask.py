"""How a kernel source asks about what its rules leave open: the ``ask`` callback it is
given, and the ``done`` callback it passes along.

The source neither knows nor cares who answers (the daemon's decision ports, a test,
a policy). Its side of the bargain: ``done`` is called exactly once for every ask, from
any thread, and the source bounds how many of its asks are in flight at once (the
``max_asks`` it is given), applying its default verdict beyond that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: done(verdict, why): why is "decided" when a client answered; called exactly once,
#: from any thread
Done = Callable[[str, str], None]
#: a source's way to ask: ask(request, done)
Ask = Callable[[dict[str, Any], Done], None]
