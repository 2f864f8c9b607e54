"""The web UI's HTTP API and live WebSocket over a :class:`~kport.ui.bridge.Bridge` (or,
for `kport ui --fleet`, a :class:`~kport.ui.fleet.FleetBridge`), and the page's own
files; the API is described by OpenAPI at ``/api/openapi.json``.

FastAPI, on Starlette and uvicorn: its OpenAPI document is made from the routes
themselves, so it cannot drift from what the server does. Its own docs pages load their
scripts from a CDN, so they are off: no request leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

from fastapi import FastAPI, HTTPException, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from kport.errors import AccessDenied, BadRequest, KportError, PortNotFound
from kport.ui.bridge import Bridge
from kport.version import __version__

if TYPE_CHECKING:  # imported by `kport ui --fleet` alone: a host's UI loads no NATS client
    from kport.ui.fleet import FleetBridge

STATIC: Final = Path(__file__).resolve().parent / "static"
#: events of one history page at most
HISTORY_LIMIT: Final = 5000
#: events of the first message at most; an opening page gets the rest in more of them
FIRST_CHUNK: Final = 2000
#: pages batch live events this often at most, so that a busy machine means few, larger
#: messages rather than many small ones
FLUSH_S: Final = 0.1


class Answer(BaseModel):
    """A person's answer to a prompt."""

    verdict: str = Field(description="allow or deny (and reject, for a connection)")
    remember: bool = Field(False, description="file: write a rule with this verdict")
    duration: str | float = Field(
        "once", description="connection: once, restart, always, or minutes (a number)"
    )


class RulesEdit(BaseModel):
    """kport's own rules file, replaced whole."""

    rules: list[dict[str, Any]]
    version: str = Field(description="the version the rules were read at")


def _json(value: Any) -> str:
    return json.dumps(value, default=_plain, separators=(",", ":"))


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def _refusal(err: Exception) -> HTTPException:
    if isinstance(err, PortNotFound):
        return HTTPException(503, f"the daemon's port is not there: {err}")
    if isinstance(err, AccessDenied):
        return HTTPException(403, f"the daemon refuses this UI's user: {err}")
    if isinstance(err, BadRequest | ValueError):
        return HTTPException(400, str(err))
    return HTTPException(502, f"the daemon did not answer: {err}")


def make_app(bridge: Bridge | FleetBridge, *, start_bridge: bool = True) -> FastAPI:
    """The API over this host's ports (:class:`Bridge`) or over the fleet's stream
    (:class:`~kport.ui.fleet.FleetBridge`, which refuses what is a host's own)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(bridge.run()) if start_bridge else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(
        title="kport ui",
        version=__version__,
        description="kport's events, prompts and rules, for the page and for scripts.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
        lifespan=lifespan,
    )

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/status", summary="The UI's connections to the daemon's ports and prompts")
    async def status() -> dict[str, Any]:
        return bridge.status()

    @app.get("/api/events", summary="Events from the journal, newest first")
    async def events(
        *,
        before: Annotated[int | None, Query(description="only events with a smaller seq")] = None,
        first: Annotated[int | None, Query(description="only events from this seq on")] = None,
        last: Annotated[int | None, Query(description="only events up to this seq")] = None,
        source: Annotated[list[str] | None, Query(description="proc, file, net, kport")] = None,
        kind: Annotated[list[str] | None, Query()] = None,
        pid: Annotated[list[int] | None, Query()] = None,
        uid: Annotated[list[int] | None, Query()] = None,
        text: Annotated[str | None, Query(description="a substring of any value")] = None,
        limit: Annotated[int, Query(ge=1, le=HISTORY_LIMIT)] = 1000,
        oldest_first: bool = False,
    ) -> Response:
        query: dict[str, Any] = {"limit": limit, "newest_first": not oldest_first}
        if before is not None:
            query["last"] = before - 1
        if last is not None:
            query["last"] = min(last, query.get("last", last))
        if first is not None:
            query["first"] = first
        for key, value in (("sources", source), ("kinds", kind), ("pids", pid), ("uids", uid)):
            if value:
                query[key] = value
        if text:
            query["text"] = text
        try:
            reply = await bridge.history(query)
        except (KportError, OSError, ValueError) as err:
            raise _refusal(err) from err
        body = {"events": reply.get("events", []), "more": reply.get("next") is not None}
        return Response(_json(body), media_type="application/json")  # encoded once

    @app.get("/api/processes", summary="Every process on the machine, for the tree")
    async def process_list() -> list[dict[str, Any]]:
        try:
            return await bridge.processes()
        except (KportError, OSError) as err:
            raise _refusal(err) from err

    @app.get("/api/rules/{domain}", summary="The rules in force for file or net decisions")
    async def rules(domain: str) -> dict[str, Any]:
        try:
            return await bridge.rules(domain)
        except (KportError, OSError) as err:
            raise _refusal(err) from err

    @app.put("/api/rules/{domain}", summary="Replace kport's own rules file; applied at once")
    async def save_rules(domain: str, edit: RulesEdit) -> dict[str, Any]:
        try:
            return await bridge.save_rules(domain, edit.rules, edit.version)
        except (KportError, OSError) as err:
            raise _refusal(err) from err

    @app.post("/api/prompts/{prompt_id}", summary="Answer a prompt")
    async def answer(prompt_id: int, reply: Answer) -> dict[str, Any]:
        try:
            return await bridge.answer(prompt_id, reply.model_dump())
        except (KportError, OSError) as err:
            raise _refusal(err) from err

    @app.websocket("/api/live")
    async def live(socket: WebSocket) -> None:
        """Live events, prompts, port states and rates. The page says from which seq it
        needs events (``?after=SEQ``, after a reconnect) and gets those first."""
        await socket.accept()
        after_text = socket.query_params.get("after")
        after = int(after_text) if after_text and after_text.isdigit() else None
        page = bridge.new_page()
        recent = bridge.attach(page, after)
        try:
            oldest = bridge.oldest_seq()
            await socket.send_text(
                _json(
                    {
                        "type": "hello",
                        "version": __version__,
                        # older than the ring: the page fetches them from the journal
                        "ring_first": oldest,
                        "status": bridge.status(),
                        "rates": list(bridge.rates),
                    }
                )
            )
            for start in range(0, max(len(recent), 1), FIRST_CHUNK):
                chunk = recent[start : start + FIRST_CHUNK]
                await socket.send_text(_json({"type": "events", "events": chunk, "gaps": []}))
            receiving = asyncio.create_task(_drain(socket))
            try:
                while not receiving.done():
                    waiting = asyncio.create_task(page.ready.wait())
                    await asyncio.wait({waiting, receiving}, return_when=asyncio.FIRST_COMPLETED)
                    waiting.cancel()
                    for message in page.take():
                        await socket.send_text(_json(message))
                    await asyncio.sleep(FLUSH_S)
            finally:
                receiving.cancel()
        except (WebSocketDisconnect, RuntimeError):
            pass  # the page went away
        finally:
            bridge.detach(page)

    return app


async def _drain(socket: WebSocket) -> None:
    """Read (and ignore) what the page sends, so that its going away is noticed."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            await socket.receive_text()
