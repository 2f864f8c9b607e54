"""Who may talk to the web UI: the token, the ``Host`` and the ``Origin`` of every request
and WebSocket, checked before any route runs, and the headers every answer carries.

The token comes in the URL that ``kport ui`` prints (``?token=``), once; the answer sets
it as a cookie (HttpOnly, SameSite=Strict) and sends the page on without it in the URL.
Scripts may send it as ``Authorization: Bearer TOKEN``. A ``Host`` that is not one of the
UI's own names is refused, which defeats DNS rebinding; an ``Origin`` that is not the UI's
own is refused, which defeats cross-site requests and WebSockets; a request that changes
something and comes with the cookie alone must name its ``Origin``.
"""

from __future__ import annotations

import hmac
import http.cookies
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Final

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE: Final = "kport_ui_token"
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
HEADERS: Final = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


def own_hosts(host: str, port: int) -> frozenset[str]:
    """The ``Host`` values the UI answers to: its listen address (an IPv6 one in
    brackets) and loopback's names."""
    names = {host, "127.0.0.1", "localhost", "[::1]"}
    return frozenset(f"{name}:{port}" for name in names if name not in ("0.0.0.0", "::"))


class Guard:
    """ASGI middleware: refuse what fails a check, add the security headers to the rest."""

    def __init__(self, app: ASGIApp, *, token: str, hosts: Iterable[str]) -> None:
        self.app = app
        self.token = token
        self.hosts = frozenset(h.lower() for h in hosts)
        self.origins = frozenset(f"http://{h}" for h in self.hosts)

    def check(self, scope: Scope) -> tuple[int, str] | None:
        """(status, reason) when the request must be refused, None when it may go on."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "").lower()
        if host not in self.hosts:
            return 403, f"kport ui: unknown Host {host!r:.80}; open the URL kport ui printed"
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self.origins:
            return 403, f"kport ui: requests from {origin!r:.80} are refused"
        supplied, by_cookie = self._token_of(scope, headers)
        if supplied is None or not hmac.compare_digest(supplied, self.token):
            why = "a token is needed" if supplied is None else "the token is wrong"
            return 403, f"kport ui: {why}; open the URL that kport ui printed (it has ?token=)"
        if scope["type"] == "websocket" and origin is None:
            return 403, "kport ui: a WebSocket must name its Origin"
        method = scope.get("method", "GET")
        if by_cookie and method not in _SAFE_METHODS and origin is None:
            return 403, f"kport ui: a {method} with the cookie alone must name its Origin"
        return None

    def _token_of(self, scope: Scope, headers: dict[str, str]) -> tuple[str | None, bool]:
        """The token the request brings and whether it came as the cookie alone."""
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "token" in query:
            return query["token"][0], False
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        cookie = http.cookies.SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except http.cookies.CookieError:
            return None, False
        morsel = cookie.get(COOKIE)
        return (morsel.value, True) if morsel is not None else (None, False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.check(scope)
        if refusal is not None:
            status, reason = refusal
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
                return
            await _plain(send, status, reason)
            return
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if scope["type"] == "http" and "token" in query and scope["path"] == "/":
            # Trade the token in the URL for a cookie, and show the page without it.
            morsel = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
            await send(
                {
                    "type": "http.response.start",
                    "status": 303,
                    "headers": [
                        *HEADERS,
                        (b"location", b"/"),
                        (b"set-cookie", morsel.encode()),
                        (b"content-length", b"0"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _plain(send: Send, status: int, text: str) -> None:
    body = (text + "\n").encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *HEADERS,
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
