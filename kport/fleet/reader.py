"""Reading the fleet: the events of every host (or one), every source (or one), from the
JetStream stream, live or from a time or a stream sequence; each event once, though
JetStream may deliver one again after a server was killed (by host and seq)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from kport.errors import KportError
from kport.fleet import subjects
from kport.journal.query import Query

log = logging.getLogger("kport.fleet")

#: (host, seq) pairs remembered to drop a redelivery
SEEN_MAX: Final = 200_000


class FleetError(KportError):
    """The fleet cannot be read as asked (no broker there, no stream, refused)."""


class Seen:
    """The (host, journal, seq) of the last SEEN_MAX events: a redelivery is one of them
    (and a host whose journal was wiped, starting its seqs again, is not)."""

    def __init__(self, limit: int = SEEN_MAX) -> None:
        self.limit = limit
        self._keys: OrderedDict[tuple[str, str, int], None] = OrderedDict()
        #: events dropped as delivered before
        self.repeats = 0

    def first_time(self, event: dict[str, Any]) -> bool:
        key = (str(event.get("host")), str(event.get("journal", "")), int(event.get("seq") or 0))
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
    ``since_ns``, a time, if given), each with its ``host``, each once. A broker not
    there at the start is a :class:`FleetError`; one that goes away later is waited for,
    and reading goes on where it stopped."""
    options = {"error_cb": _quiet, **(options or {})}
    # there now, and taking us? (the reading's own client tries for ever, from its start)
    probe = await _connect(url, allow_reconnect=False, max_reconnect_attempts=1, **options)
    await probe.close()
    nc = await _connect(url, allow_reconnect=True, max_reconnect_attempts=-1, **options)
    try:
        js = nc.jetstream()
        wanted = subjects.host_filter(host, source)
        try:
            if since_seq is None and since_ns is not None:
                # by sequence, not by time: the client resumes an ordered consumer after a
                # broker restart by sequence, which the server refuses for one by time
                since_seq = await _first_at(js, stream, wanted, since_ns)
            if since_seq is not None:
                config = ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=since_seq
                )
            else:
                config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
            sub = await js.subscribe(wanted, stream=stream, ordered_consumer=True, config=config)
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


async def _first_at(js: JetStreamContext, stream: str, wanted: str, since_ns: int) -> int:
    """The stream sequence of the first message of ``wanted`` at ``since_ns`` or later;
    past the last one if there is none yet."""
    end = (await js.stream_info(stream)).state.last_seq
    start = dt.datetime.fromtimestamp(since_ns / 1e9, tz=dt.UTC)
    probe = await js.pull_subscribe(
        wanted,
        stream=stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start),
    )
    try:
        (msg,) = await probe.fetch(1, timeout=2)
        return int(msg.metadata.sequence.stream)
    except (nats.errors.TimeoutError, TimeoutError):
        return int(end) + 1
    finally:
        with contextlib.suppress(nats.errors.Error):
            await probe.unsubscribe()


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
    # one answer wanted: no reconnecting, so a refusal is raised as itself, not as "no
    # servers" after an error the client reports on its own time
    nc = await _connect(
        url,
        allow_reconnect=False,
        max_reconnect_attempts=1,
        **{"error_cb": _quiet, **(options or {})},
    )
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


async def _quiet(error: Exception) -> None:
    """The client's errors: what matters is said as a FleetError, or waited out."""
    log.debug("fleet: nats: %s", error)


async def _connect(url: str, **options: Any) -> Nats:
    """A client of the fleet's broker, or a :class:`FleetError` saying why not."""
    said: list[Exception] = []
    given = options.pop("error_cb", _quiet)

    async def heard(error: Exception) -> None:  # the last error: why no server would do
        said[:] = [error]
        await given(error)

    try:
        return await nats.connect(url, connect_timeout=2, error_cb=heard, **options)
    except nats.errors.Error as err:
        why = said[0] if said and isinstance(err, nats.errors.NoServersError) else err
        if "authorization" in str(why).lower() or "authentication" in str(why).lower():
            raise FleetError(
                f"the fleet at {url} refused the credentials ([export] in --config): {why}"
            ) from err
        if isinstance(err, nats.errors.NoServersError):
            raise FleetError(f"cannot reach the fleet at {url}: {err}") from err
        raise FleetError(f"cannot read the fleet at {url}: {err}") from err
