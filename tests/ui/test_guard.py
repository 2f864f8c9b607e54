"""The UI's guard: token, Host and Origin checks on byte-level ASGI scopes."""

from __future__ import annotations

from typing import Any

from kport.ui.guard import COOKIE, Guard, own_hosts


async def _app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("a refused request must not reach the app")


GUARD = Guard(_app, token="s3cret", hosts=own_hosts("127.0.0.1", 8787))


def scope(
    *,
    kind: str = "http",
    method: str = "GET",
    host: str = "127.0.0.1:8787",
    query: str = "",
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    raw = [(b"host", host.encode())] + [
        (k.encode(), v.encode()) for k, v in (headers or {}).items()
    ]
    return {
        "type": kind,
        "method": method,
        "path": "/",
        "query_string": query.encode(),
        "headers": raw,
    }


def test_own_hosts_are_the_listen_address_and_loopback_names() -> None:
    assert own_hosts("127.0.0.1", 8787) == {"127.0.0.1:8787", "localhost:8787", "[::1]:8787"}
    assert "[::1]:9000" in own_hosts("[::1]", 9000)
    assert "0.0.0.0:1" not in own_hosts("0.0.0.0", 1)


def test_the_token_may_come_in_the_url_a_header_or_the_cookie() -> None:
    assert GUARD.check(scope(query="token=s3cret")) is None
    assert GUARD.check(scope(headers={"authorization": "Bearer s3cret"})) is None
    assert GUARD.check(scope(headers={"cookie": f"{COOKIE}=s3cret"})) is None


def test_no_token_or_a_wrong_one_is_refused_with_a_reason() -> None:
    status, reason = GUARD.check(scope())  # type: ignore[misc]
    assert status == 403 and "a token is needed" in reason
    status, reason = GUARD.check(scope(query="token=guess"))  # type: ignore[misc]
    assert status == 403 and "the token is wrong" in reason
    assert GUARD.check(scope(headers={"cookie": "garbage;;=\x7f"}))


def test_a_foreign_host_is_refused_even_with_the_token() -> None:
    status, reason = GUARD.check(scope(host="evil.example:8787", query="token=s3cret"))  # type: ignore[misc]
    assert status == 403 and "unknown Host" in reason


def test_a_foreign_origin_is_refused() -> None:
    ok = {"cookie": f"{COOKIE}=s3cret"}
    refused = GUARD.check(scope(headers={**ok, "origin": "http://evil.example"}))
    assert refused is not None and "http://evil.example" in refused[1]
    assert GUARD.check(scope(headers={**ok, "origin": "http://localhost:8787"})) is None


def test_a_change_by_cookie_alone_must_name_its_origin() -> None:
    cookie = {"cookie": f"{COOKIE}=s3cret"}
    own = {**cookie, "origin": "http://127.0.0.1:8787"}
    assert GUARD.check(scope(method="POST", headers=cookie))
    assert GUARD.check(scope(method="POST", headers=own)) is None
    assert GUARD.check(scope(method="POST", headers={"authorization": "Bearer s3cret"})) is None


def test_a_websocket_must_name_its_origin() -> None:
    cookie = {"cookie": f"{COOKIE}=s3cret"}
    own = {**cookie, "origin": "http://127.0.0.1:8787"}
    assert GUARD.check(scope(kind="websocket", headers=cookie))
    assert GUARD.check(scope(kind="websocket", headers=own)) is None
