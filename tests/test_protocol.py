"""The sans-IO protocol, byte by byte: round trips, the state table, limits, and fuzzing."""

from __future__ import annotations

import contextlib
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kport import protocol
from kport.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    VersionMismatch,
)
from kport.protocol import (
    NEED_DATA,
    TRANSITIONS,
    Bye,
    Connection,
    ConnectionClosed,
    Error,
    Hello,
    Key,
    Lost,
    Notify,
    Reply,
    Request,
    Role,
    Send,
    SendReply,
    State,
    Welcome,
)

V = protocol.PROTOCOL_VERSION


def pair(*, one_way: bool = False) -> tuple[Connection, Connection]:
    """A client and a server protocol object, handshake done."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(client.send(Hello(V, "p", 42)))
    assert server.next_event() == Hello(V, "p", 42)
    client.receive_data(server.send(Welcome(V, "p", one_way, protocol.DEFAULT_MAX_FRAME)))
    assert isinstance(client.next_event(), Welcome)
    return client, server


def deliver(sender: Connection, receiver: Connection, event: Any) -> Any:
    receiver.receive_data(sender.send(event))
    return receiver.next_event()


def test_handshake_reaches_open_states() -> None:
    client, server = pair()
    assert client.state is server.state is State.OPEN
    client, server = pair(one_way=True)
    assert client.state is server.state is State.OPEN_ONE_WAY


@pytest.mark.parametrize(
    "event",
    [
        Notify(7, [{"a": 1}, [1, 2], "x", None]),
        Notify([3, 9, 10], [1, 2, 3]),
        Request(5, 123456789, {"path": "/etc/passwd"}),
        SendReply(2, b"\x00bytes"),
        Lost(10, 1, 10),
        Lost(3, None, None),
        Error(6, "queue full", 4),
    ],
)
def test_server_events_round_trip(event: Any) -> None:
    client, server = pair()
    assert deliver(server, client, event) == event


@pytest.mark.parametrize("event", [Reply(1, {"verdict": "allow"}), Send(9, [1.5, True])])
def test_client_events_round_trip(event: Any) -> None:
    client, server = pair()
    assert deliver(client, server, event) == event


def test_packed_notify_equals_plain_notify() -> None:
    items = [{"k": i} for i in range(5)]
    packed = protocol.encode(Notify(1, [protocol.pack(i) for i in items], packed=True))
    assert packed == protocol.encode(Notify(1, items))


@given(
    st.integers(min_value=0, max_value=2**64 - 1),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.integers(min_value=0, max_value=70_000),
)
def test_frames_for_other_threads_equal_the_shared_packers(
    ident: int, deadline: int, count: int
) -> None:
    """The frames a source's thread builds without the shared packer are byte for byte
    the ones the protocol encodes: the same shortest integer and array forms."""
    item = protocol.pack({"k": 1})
    assert protocol.encode_request_packed(ident, deadline, item) == protocol.encode(
        Request(ident, deadline, {"k": 1})
    )
    items = [item] * (count % 40)
    for seqs in (ident, [ident, deadline]):
        assert protocol.encode_notify_packed(seqs, items) == protocol.encode(
            Notify(seqs, [{"k": 1}] * len(items))
        )
    assert protocol._array_header(count) == msgpack.Packer().pack_array_header(count)


def test_threads_packing_at_once_never_share_a_packer() -> None:
    """pack_new from several threads at once: each value comes out whole (a packer two
    threads wrote into would mix their bytes)."""

    def pack_many(worker: int) -> bool:
        values = [{"worker": worker, "i": i, "pad": "x" * (i % 300)} for i in range(3000)]
        packed = [protocol.pack_new(v) for v in values]
        return [msgpack.unpackb(p) for p in packed] == values

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(pack_many, range(8)))


def test_bytes_fed_one_at_a_time() -> None:
    client, server = pair()
    data = server.send(Notify(1, ["a"])) + server.send(Request(1, 5, "q"))
    events = []
    for i in range(len(data)):
        client.receive_data(data[i : i + 1])
        events.extend(client.events())
    assert events == [Notify(1, ["a"]), Request(1, 5, "q")]
    assert client.next_event() is NEED_DATA


def test_end_of_stream() -> None:
    client, server = pair()
    client.receive_data(server.send(Bye("done")))
    client.receive_data(b"")
    assert client.events() == [Bye("done"), ConnectionClosed()]
    assert client.state is State.CLOSED


def test_end_of_stream_inside_a_frame_is_an_error() -> None:
    client, server = pair()
    client.receive_data(server.send(Notify(1, ["x"]))[:-1])
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        client.next_event()


def test_oversized_frame_is_refused_from_its_header() -> None:
    server = Connection(Role.SERVER, max_frame=1024)
    server.receive_data(struct.pack(">I", 1025))
    with pytest.raises(RemoteProtocolError, match="exceeds the limit of 1024"):
        server.next_event()


def test_oversized_frame_cannot_be_sent() -> None:
    client, server = Connection(Role.CLIENT, max_frame=100), Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError, match="exceeds"):
        client.send(Hello(V, "x" * 200, 1))
    del server


def test_unknown_version_is_a_version_mismatch() -> None:
    server = Connection(Role.SERVER)
    body = msgpack.packb([protocol.FrameType.HELLO, 99, "p", 1])
    server.receive_data(struct.pack(">I", len(body)) + body)
    with pytest.raises(VersionMismatch, match="version 99"):
        server.next_event()


def test_error_sticks_once_raised() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b"\x00\x00\x00\x01\xc1")
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    assert server.state is State.CLOSED


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ([], "array starting"),
        ({"a": 1}, "array starting"),
        ([99], "unknown frame type"),
        ([protocol.FrameType.NOTIFY, 1], "fields"),
        ([protocol.FrameType.NOTIFY, "x", [1]], "seqs"),
        ([protocol.FrameType.NOTIFY, [1, 2], [1]], "different number"),
        ([protocol.FrameType.NOTIFY, 1, []], "items"),
        ([protocol.FrameType.ERROR, 1, 2, None], "message"),
        ([protocol.FrameType.OBJECT, 1, "event", {}, 9, None], "'fds' is invalid"),
        ([protocol.FrameType.OBJECT, 1, "event", [], 1, None], "'meta' is invalid"),
    ],
)
def test_malformed_frames_name_what_is_wrong(body: Any, match: str) -> None:
    client, _ = pair()
    raw = msgpack.packb(body)
    client.receive_data(struct.pack(">I", len(raw)) + raw)
    with pytest.raises(RemoteProtocolError, match=match):
        client.next_event()


_SAMPLE: dict[Key, Any] = {
    Key.HELLO: Hello(V, "p", 1),
    Key.WELCOME: Welcome(V, "p", False, 1 << 20),
    Key.WELCOME_ONE_WAY: Welcome(V, "p", True, 1 << 20),
    Key.NOTIFY: Notify(1, [1]),
    Key.REQUEST: Request(1, 0, None),
    Key.REPLY: Reply(1, None),
    Key.SEND: Send(1, None),
    Key.SEND_REPLY: SendReply(1, None),
    Key.LOST: Lost(1, 1, 1),
    Key.ERROR_REPLY: Error(1, "e", 1),
    Key.ERROR_FATAL: Error(1, "e", None),
    Key.BYE: Bye("b"),
    Key.OBJECT: protocol.Object(1, "event", {"manual_reset": True}, 1, None),
    Key.OBJECT_ACK: protocol.ObjectAck(1, 7, None, ""),
    Key.RELEASE: protocol.Release(7),
}


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("sender", list(Role))
@pytest.mark.parametrize("key", list(Key))
def test_state_table_walk(state: State, sender: Role, key: Key) -> None:
    """Every (state, sender, frame) cell: allowed ones move as the table says, others raise."""
    event = _SAMPLE[key]
    assert protocol.key_of(event) is key
    allowed = TRANSITIONS[(state, sender)]
    # Sending side: our own misuse is a LocalProtocolError.
    ours = Connection(sender)
    ours.state = state
    # Receiving side: the peer's misuse is a RemoteProtocolError.
    theirs = Connection(Role.SERVER if sender is Role.CLIENT else Role.CLIENT)
    theirs.state = state
    if key in allowed:
        data = ours.send(event)
        assert ours.state is allowed[key]
        theirs.receive_data(data)
        assert theirs.next_event() == event
        assert theirs.state is allowed[key]
    else:
        with pytest.raises(LocalProtocolError):
            ours.send(event)
        theirs.receive_data(protocol.encode(event))
        with pytest.raises(RemoteProtocolError):
            theirs.next_event()


def test_one_way_client_may_send_nothing() -> None:
    client, _ = pair(one_way=True)
    for event in (Reply(1, None), Send(1, None), Bye("x")):
        assert not client.allowed(protocol.key_of(event))
        with pytest.raises(LocalProtocolError):
            client.send(event)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(list(Role)), st.booleans())
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes, role: Role, opened: bool) -> None:
    conn = Connection(role, max_frame=4096)
    if opened:
        conn.state = State.OPEN
    conn.receive_data(data)
    conn.receive_data(b"")
    with contextlib.suppress(ProtocolError):
        conn.events()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=60), max_size=8))
def test_framed_garbage_raises_only_protocol_errors(bodies: list[bytes]) -> None:
    conn = Connection(Role.CLIENT)
    conn.state = State.OPEN
    for body in bodies:
        conn.receive_data(struct.pack(">I", len(body)) + body)
    with contextlib.suppress(ProtocolError):
        conn.events()


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_values, min_size=1, max_size=5), st.integers(0, 2**40))
def test_notify_round_trips_any_msgpack_value(items: list[Any], seq: int) -> None:
    client, server = pair()
    assert deliver(server, client, Notify(seq, items)) == Notify(seq, items)


@settings(max_examples=200, deadline=None)
@given(_values, st.integers(0, 2**31))
def test_send_and_reply_round_trip(data: Any, ident: int) -> None:
    client, server = pair()
    assert deliver(client, server, Send(ident, data)) == Send(ident, data)
    assert deliver(server, client, SendReply(ident, data)) == SendReply(ident, data)


def test_unencodable_data_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="msgpack-encodable"):
        protocol.pack(object())
