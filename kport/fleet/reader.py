"""Reading the fleet: the events of every host (or one), every source (or one), from the
JetStream stream, live or from a time or a stream sequence; each event once, though
JetStream may deliver one again after a server was killed (by host and seq)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Final

import nats
import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from kport.errors import KportError
from kport.fleet import subjects
from kport.journal.query import Query

#: (host, seq) pairs remembered to drop a redelivery
SEEN_MAX: Final = 200_000


class FleetError(KportError):
    """The fleet cannot be read as asked (no broker there, no stream, refused)."""


class Seen:
    """The (host, seq) of the last SEEN_MAX events: a redelivery is one of them."""

    def __init__(self, limit: int = SEEN_MAX) -> None:
        self.limit = limit
        self._keys: OrderedDict[tuple[str, int], None] = OrderedDict()
        #: events dropped as delivered before
        self.repeats = 0

    def first_time(self, event: dict[str, Any]) -> bool:
        key = (str(event.get("host")), int(event.get("seq") or 0))
        if key in self._keys:
            self.repeats += 1
            return False
        self._keys[key] = None
        if len(self._keys) > self.limit:
            self._keys.popitem(last=False)
        return True


async def follow(
    url: str,
    *,
    host: str | None = None,
    source: str | None = None,
    stream: str = subjects.DEFAULT_STREAM,
    since_seq: int | None = None,
    since_ns: int | None = None,
    options: dict[str, Any] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """The fleet's events as they come (from ``since_seq``, a stream sequence, or
    ``since_ns``, a time, if given), each with its ``host``, each once."""
    try:
        nc = await nats.connect(
            url,
            allow_reconnect=True,
            connect_timeout=2,
            max_reconnect_attempts=-1,
            **(options or {}),
        )
    except nats.errors.NoServersError as err:
        raise FleetError(f"cannot reach the fleet at {url}: {err}") from err
    try:
        js = nc.jetstream()
        if since_seq is not None:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=since_seq
            )
        elif since_ns is not None:
            start = dt.datetime.fromtimestamp(since_ns / 1e9, tz=dt.UTC)
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start
            )
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
        try:
            sub = await js.subscribe(
                subjects.host_filter(host, source),
                stream=stream,
                ordered_consumer=True,
                config=config,
            )
        except nats.js.errors.NotFoundError as err:
            raise FleetError(f"no stream {stream} at {url}: nothing exported yet?") from err
        seen = Seen()
        async for msg in sub.messages:
            try:
                event = json.loads(msg.data)
            except ValueError:
                continue  # not one of ours
            if isinstance(event, dict) and seen.first_time(event):
                yield event
    finally:
        await nc.close()


async def history(
    url: str,
    query: Query,
    *,
    host: str | None = None,
    stream: str = subjects.DEFAULT_STREAM,
    since_seq: int | None = None,
    options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The fleet's events that pass ``query``, from the stream as it stands now: from a
    stream sequence (``since_seq``), from ``query.since_ns``, or from the start; each
    (host, seq) once; oldest first, or newest first as the query says."""
    try:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1, **(options or {}))
    except nats.errors.NoServersError as err:
        raise FleetError(f"cannot reach the fleet at {url}: {err}") from err
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError as err:
            raise FleetError(f"no stream {stream} at {url}: nothing exported yet?") from err
        end = info.state.last_seq
        if not info.state.messages:
            return []
        if since_seq is not None:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=since_seq
            )
        elif query.since_ns is not None:
            start = dt.datetime.fromtimestamp(query.since_ns / 1e9, tz=dt.UTC)
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start
            )
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        sub = await js.subscribe(
            subjects.host_filter(host, None), stream=stream, ordered_consumer=True, config=config
        )
        seen = Seen()
        found: list[dict[str, Any]] = []
        while True:
            try:
                msg = await sub.next_msg(timeout=5)
            except nats.errors.TimeoutError:
                break  # nothing more within reach: what there is
            with contextlib.suppress(ValueError):
                event = json.loads(msg.data)
                if isinstance(event, dict) and query.matches(event) and seen.first_time(event):
                    found.append(event)
                    if not query.newest_first and len(found) >= query.limit:
                        break
            if msg.metadata.sequence.stream >= end:
                break
        if query.newest_first:
            found = found[::-1][: query.limit]
        return found
    finally:
        await nc.close()
