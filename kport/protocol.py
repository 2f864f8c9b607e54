"""The kport wire protocol, sans-IO: bytes in, events out; events in, bytes out.

A frame is a 4-byte big-endian body length followed by a msgpack array whose first
element is the frame type. The protocol object never touches a socket or an event loop:
``receive_data(bytes)`` feeds it (``b""`` for end of stream), ``next_event()`` returns
the next complete event or :data:`NEED_DATA`, and ``send(event)`` returns the bytes to
write. Which frame may follow which lives in one table, :data:`TRANSITIONS`.

Frames (fields after the type):

=============  ======  ================================================================
HELLO          c → s   version, port name, client pid, since (replay after this seq, or None)
WELCOME        s → c   version, port name, one_way, max_frame
NOTIFY         s → c   seqs (first seq of a contiguous run, or a list), items (list)
REQUEST        s → c   id, deadline (CLOCK_MONOTONIC ns, system-wide), data
REPLY          c → s   id, data
SEND           c → s   id, data
SEND_REPLY     s → c   id, data
LOST           s → c   count, first seq or None, last seq or None
ERROR          both    code, message, id (None: the connection ends)
BYE            both    reason
OBJECT         both    id, type, meta, fd count, reply_to (a SEND id, or None)
OBJECT_ACK     both    id, handle (None: refused), error code, message
RELEASE        c → s   handle (the server drops the reference this client gave it)
=============  ======  ================================================================

An OBJECT frame's fds travel beside its bytes as ``SCM_RIGHTS`` ancillary data; the
receiver takes ``fd count`` of them, in order, from the fds it has received. Objects
need both directions, so a one-way port carries none.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Final

import msgpack

from kport.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    VersionMismatch,
)

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024
MAX_MESSAGE_LEN: Final = 4096
#: fds one OBJECT frame may carry
MAX_OBJECT_FDS: Final = 8
_HEADER = struct.Struct(">I")
HEADER_SIZE: Final = _HEADER.size


class FrameType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    NOTIFY = 3
    REQUEST = 4
    REPLY = 5
    SEND = 6
    SEND_REPLY = 7
    LOST = 8
    ERROR = 9
    BYE = 10
    OBJECT = 11
    OBJECT_ACK = 12
    RELEASE = 13


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"

    __hash__ = object.__hash__  # members are singletons; Enum's hash runs Python code


class State(enum.Enum):
    START = "start"
    HELLO_SENT = "hello-sent"
    OPEN = "open"
    OPEN_ONE_WAY = "open-one-way"
    CLOSED = "closed"

    __hash__ = object.__hash__


class Key(enum.Enum):
    """What the state table keys on: the frame type, refined where it decides the next state."""

    HELLO = "hello"
    WELCOME = "welcome"
    WELCOME_ONE_WAY = "welcome-one-way"
    NOTIFY = "notify"
    REQUEST = "request"
    REPLY = "reply"
    SEND = "send"
    SEND_REPLY = "send-reply"
    LOST = "lost"
    ERROR_REPLY = "error-reply"  # answers one SEND; the connection goes on
    ERROR_FATAL = "error-fatal"  # ends the connection
    BYE = "bye"
    OBJECT = "object"
    OBJECT_ACK = "object-ack"
    RELEASE = "release"

    __hash__ = object.__hash__


S, R, K = State, Role, Key
#: (state, sender) -> {frame key: next state}. A frame not listed is a protocol error.
TRANSITIONS: Final[dict[tuple[State, Role], dict[Key, State]]] = {
    (S.START, R.CLIENT): {K.HELLO: S.HELLO_SENT},
    (S.START, R.SERVER): {K.ERROR_FATAL: S.CLOSED},
    (S.HELLO_SENT, R.CLIENT): {},
    (S.HELLO_SENT, R.SERVER): {
        K.WELCOME: S.OPEN,
        K.WELCOME_ONE_WAY: S.OPEN_ONE_WAY,
        K.ERROR_FATAL: S.CLOSED,
    },
    (S.OPEN, R.CLIENT): {
        K.REPLY: S.OPEN,
        K.SEND: S.OPEN,
        K.OBJECT: S.OPEN,
        K.OBJECT_ACK: S.OPEN,
        K.RELEASE: S.OPEN,
        K.BYE: S.CLOSED,
    },
    (S.OPEN, R.SERVER): {
        K.NOTIFY: S.OPEN,
        K.OBJECT: S.OPEN,
        K.OBJECT_ACK: S.OPEN,
        K.REQUEST: S.OPEN,
        K.SEND_REPLY: S.OPEN,
        K.LOST: S.OPEN,
        K.ERROR_REPLY: S.OPEN,
        K.ERROR_FATAL: S.CLOSED,
        K.BYE: S.CLOSED,
    },
    # One-way: the client may send nothing at all (the server even shuts its read side).
    (S.OPEN_ONE_WAY, R.CLIENT): {},
    (S.OPEN_ONE_WAY, R.SERVER): {
        K.NOTIFY: S.OPEN_ONE_WAY,
        K.LOST: S.OPEN_ONE_WAY,
        K.ERROR_FATAL: S.CLOSED,
        K.BYE: S.CLOSED,
    },
    (S.CLOSED, R.CLIENT): {},
    (S.CLOSED, R.SERVER): {},
}
del S, R, K


# --- events ---------------------------------------------------------------------------


@dataclass(slots=True)
class Hello:
    version: int
    port: str
    pid: int
    #: replay the port's history after this seq before live notifications (None: live only)
    since: int | None = None


@dataclass(slots=True)
class Welcome:
    version: int
    port: str
    one_way: bool
    max_frame: int


@dataclass(slots=True)
class Notify:
    """One or more notifications. ``seqs`` is the first seq of a contiguous run, or a list.

    With ``packed=True`` (sending only) each item is already msgpack bytes, so a producer
    that encoded an item once can queue it for many connections without encoding again.
    """

    seqs: int | list[int]
    items: list[Any]
    packed: bool = False

    def seq_list(self) -> list[int]:
        if isinstance(self.seqs, int):
            return list(range(self.seqs, self.seqs + len(self.items)))
        return self.seqs


@dataclass(slots=True)
class Request:
    id: int
    deadline_ns: int
    data: Any
    packed: bool = False


@dataclass(slots=True)
class Reply:
    id: int
    data: Any


@dataclass(slots=True)
class Send:
    id: int
    data: Any


@dataclass(slots=True)
class SendReply:
    id: int
    data: Any


@dataclass(slots=True)
class Lost:
    count: int
    first_seq: int | None
    last_seq: int | None


@dataclass(slots=True)
class Error:
    code: int
    message: str
    id: int | None = None


@dataclass(slots=True)
class Bye:
    reason: str


@dataclass(slots=True)
class Object:
    """An object passed by handle: ``fds`` fds travel beside this frame (``SCM_RIGHTS``)."""

    id: int
    type: str
    meta: dict[str, Any]
    fds: int
    reply_to: int | None = None


@dataclass(slots=True)
class ObjectAck:
    """The receiver's answer to an OBJECT: its handle for it, or why it refused it."""

    id: int
    handle: int | None
    code: int | None = None
    message: str = ""


@dataclass(slots=True)
class Release:
    handle: int


@dataclass(slots=True)
class ConnectionClosed:
    """The peer ended the byte stream at a frame boundary."""


Event = (
    Hello
    | Welcome
    | Notify
    | Request
    | Reply
    | Send
    | SendReply
    | Lost
    | Error
    | Bye
    | Object
    | ObjectAck
    | Release
    | ConnectionClosed
)


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


def key_of(event: Event) -> Key:
    """The state-table key of an event."""
    cls = type(event)
    if cls is Welcome:
        return Key.WELCOME_ONE_WAY if event.one_way else Key.WELCOME  # type: ignore[union-attr]
    if cls is Error:
        return Key.ERROR_FATAL if event.id is None else Key.ERROR_REPLY  # type: ignore[union-attr]
    return _KEY_BY_CLASS[cls]


_KEY_BY_CLASS: dict[type, Key] = {
    Hello: Key.HELLO,
    Welcome: Key.WELCOME,
    Notify: Key.NOTIFY,
    Request: Key.REQUEST,
    Reply: Key.REPLY,
    Send: Key.SEND,
    SendReply: Key.SEND_REPLY,
    Lost: Key.LOST,
    Bye: Key.BYE,
    Object: Key.OBJECT,
    ObjectAck: Key.OBJECT_ACK,
    Release: Key.RELEASE,
}


# --- encoding -------------------------------------------------------------------------

_packer = msgpack.Packer(use_bin_type=True, autoreset=True)
_NOTIFY_HEAD: Final = _packer.pack_array_header(3) + _packer.pack(int(FrameType.NOTIFY))
_REQUEST_HEAD: Final = _packer.pack_array_header(4) + _packer.pack(int(FrameType.REQUEST))


def pack(data: Any) -> bytes:
    """msgpack-encode one value; a value msgpack cannot encode is a ``TypeError``."""
    try:
        return _packer.pack(data)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as err:
        raise TypeError(f"kport can only carry msgpack-encodable data: {err}") from err


#: packers for :func:`pack_new` and the ``*_packed`` encoders, which any thread may call
#: (msgpack.packb makes one per call: a third of the time of packing an event). A call
#: borrows one and puts it back; ``list.pop`` and ``list.append`` are atomic, so no two
#: threads ever hold the same packer, and the pool grows to the most calls at once.
_spare_packers: list[msgpack.Packer] = []


def _borrow_packer() -> msgpack.Packer:
    """A packer no other thread is using; give it back to ``_spare_packers`` after use."""
    try:
        return _spare_packers.pop()
    except IndexError:
        return msgpack.Packer(use_bin_type=True, autoreset=True)


def pack_new(data: Any) -> bytes:
    """:func:`pack` for any thread: with a packer of its own (the shared packer is one
    buffer, for the thread that packs frames)."""
    packer = _borrow_packer()
    try:
        return packer.pack(data)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as err:  # the packer has reset itself
        raise TypeError(f"kport can only carry msgpack-encodable data: {err}") from err
    finally:
        _spare_packers.append(packer)


def _frame(body: bytes) -> bytes:
    return _HEADER.pack(len(body)) + body


def _frame_parts(head: bytes, parts: list[bytes]) -> bytes:
    size = len(head) + sum(map(len, parts))
    return b"".join([_HEADER.pack(size), head, *parts])


def encode_notify_packed(seqs: int | list[int], packed_items: list[bytes]) -> bytes:
    """A NOTIFY frame from items that are already msgpack bytes (the producer's fast path);
    for any thread."""
    head = _NOTIFY_HEAD + pack_new(seqs) + _array_header(len(packed_items))
    return _frame_parts(head, packed_items)


def encode_request_packed(request_id: int, deadline_ns: int, packed_data: bytes) -> bytes:
    """A REQUEST frame from data that is already msgpack bytes; for any thread."""
    packer = _borrow_packer()
    try:
        head = _REQUEST_HEAD + packer.pack(request_id) + packer.pack(deadline_ns)
    finally:
        _spare_packers.append(packer)
    return _frame_parts(head, [packed_data])


def _array_header(length: int) -> bytes:
    """msgpack's array header for ``length`` items; for any thread."""
    packer = _borrow_packer()
    try:
        return packer.pack_array_header(length)  # type: ignore[no-any-return]
    finally:
        _spare_packers.append(packer)


_FIELDS: dict[type, tuple[int, Callable[[Any], tuple[Any, ...]]]] = {
    Notify: (int(FrameType.NOTIFY), attrgetter("seqs", "items")),
    Request: (int(FrameType.REQUEST), attrgetter("id", "deadline_ns", "data")),
    Hello: (int(FrameType.HELLO), attrgetter("version", "port", "pid", "since")),
    Welcome: (int(FrameType.WELCOME), attrgetter("version", "port", "one_way", "max_frame")),
    Reply: (int(FrameType.REPLY), attrgetter("id", "data")),
    Send: (int(FrameType.SEND), attrgetter("id", "data")),
    SendReply: (int(FrameType.SEND_REPLY), attrgetter("id", "data")),
    Lost: (int(FrameType.LOST), attrgetter("count", "first_seq", "last_seq")),
    Error: (int(FrameType.ERROR), lambda e: (int(e.code), e.message[:MAX_MESSAGE_LEN], e.id)),
    Bye: (int(FrameType.BYE), lambda e: (e.reason[:MAX_MESSAGE_LEN],)),
    Object: (int(FrameType.OBJECT), attrgetter("id", "type", "meta", "fds", "reply_to")),
    ObjectAck: (
        int(FrameType.OBJECT_ACK),
        lambda e: (e.id, e.handle, e.code, e.message[:MAX_MESSAGE_LEN]),
    ),
    Release: (int(FrameType.RELEASE), lambda e: (e.handle,)),
}


def encode(event: Event) -> bytes:
    """The frame bytes for one event (no state checks: see :meth:`Connection.send`)."""
    if type(event) is Notify and event.packed:
        return encode_notify_packed(event.seqs, event.items)
    if type(event) is Request and event.packed:
        return encode_request_packed(event.id, event.deadline_ns, event.data)
    try:
        ftype, fields = _FIELDS[type(event)]
    except KeyError:
        raise LocalProtocolError(
            f"{type(event).__name__} is not a frame that can be sent"
        ) from None
    return _frame(pack([ftype, *fields(event)]))


# --- decoding -------------------------------------------------------------------------


def _no_ext(code: int, data: bytes) -> Any:
    raise RemoteProtocolError(f"msgpack extension type {code} is not allowed in kport frames")


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_opt_int(value: Any) -> bool:
    return value is None or type(value) is int


def _is_str(value: Any) -> bool:
    return type(value) is str


def _is_bool(value: Any) -> bool:
    return type(value) is bool


def _is_seqs(value: Any) -> bool:
    return type(value) is int or (type(value) is list and all(type(s) is int for s in value))


def _any(value: Any) -> bool:
    return True


_FIELD_CHECKS: dict[FrameType, tuple[tuple[str, Any], ...]] = {
    FrameType.HELLO: (
        ("version", _is_int),
        ("port", _is_str),
        ("pid", _is_int),
        ("since", _is_opt_int),
    ),
    FrameType.WELCOME: (
        ("version", _is_int),
        ("port", _is_str),
        ("one_way", _is_bool),
        ("max_frame", _is_int),
    ),
    FrameType.NOTIFY: (("seqs", _is_seqs), ("items", lambda v: type(v) is list and v)),
    FrameType.REQUEST: (("id", _is_int), ("deadline", _is_int), ("data", _any)),
    FrameType.REPLY: (("id", _is_int), ("data", _any)),
    FrameType.SEND: (("id", _is_int), ("data", _any)),
    FrameType.SEND_REPLY: (("id", _is_int), ("data", _any)),
    FrameType.LOST: (("count", _is_int), ("first_seq", _is_opt_int), ("last_seq", _is_opt_int)),
    FrameType.ERROR: (("code", _is_int), ("message", _is_str), ("id", _is_opt_int)),
    FrameType.BYE: (("reason", _is_str),),
    FrameType.OBJECT: (
        ("id", _is_int),
        ("type", _is_str),
        ("meta", lambda v: type(v) is dict),
        ("fds", lambda v: type(v) is int and 0 <= v <= MAX_OBJECT_FDS),
        ("reply_to", _is_opt_int),
    ),
    FrameType.OBJECT_ACK: (
        ("id", _is_int),
        ("handle", _is_opt_int),
        ("code", _is_opt_int),
        ("message", _is_str),
    ),
    FrameType.RELEASE: (("handle", _is_int),),
}


def decode_body(body: bytes | memoryview) -> Event:
    """One frame body → its event. Anything malformed raises :class:`RemoteProtocolError`."""
    try:
        obj = msgpack.unpackb(
            body, raw=False, strict_map_key=False, ext_hook=_no_ext, use_list=True
        )
    except RemoteProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as err:
        raise RemoteProtocolError(f"frame body is not valid msgpack: {err}") from err
    if type(obj) is not list or not obj or type(obj[0]) is not int:
        raise RemoteProtocolError("frame body must be a msgpack array starting with a frame type")
    # the frames of a round trip, checked in line (the same checks as the table below)
    size = len(obj)
    if size == 4 and obj[0] == _REQUEST and type(obj[1]) is int and type(obj[2]) is int:
        return Request(obj[1], obj[2], obj[3])
    if size == 3 and obj[0] == _REPLY and type(obj[1]) is int:
        return Reply(obj[1], obj[2])
    ftype = _TYPE_BY_INT.get(obj[0])  # a dict: FrameType(n) runs the enum machinery
    if ftype is None:
        raise RemoteProtocolError(f"unknown frame type {obj[0]}")
    if ftype is FrameType.HELLO and len(obj) >= 2 and obj[1] != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"client speaks protocol version {obj[1]!r}, this server speaks {PROTOCOL_VERSION}"
        )
    if ftype is FrameType.WELCOME and len(obj) >= 2 and obj[1] != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"server speaks protocol version {obj[1]!r}, this client speaks {PROTOCOL_VERSION}"
        )
    checks, build = _DECODERS[ftype]
    fields = obj[1:]
    if len(fields) != len(checks):
        raise RemoteProtocolError(
            f"{ftype.name} frame has {len(fields)} fields, expected {len(checks)}"
        )
    for (name, check), value in zip(checks, fields, strict=True):
        if not check(value):
            raise RemoteProtocolError(
                f"{ftype.name} frame field {name!r} is invalid: {value!r:.80}"
            )
    if ftype is FrameType.NOTIFY:
        seqs, items = fields
        if type(seqs) is list and len(seqs) != len(items):
            raise RemoteProtocolError("NOTIFY frame has a different number of seqs and items")
    return build(*fields)  # type: ignore[no-any-return]


_TYPE_BY_INT: dict[int, FrameType] = {int(t): t for t in FrameType}
_REQUEST: Final = int(FrameType.REQUEST)
_REPLY: Final = int(FrameType.REPLY)
_BUILDERS: dict[FrameType, Callable[..., Any]] = {
    FrameType.HELLO: Hello,
    FrameType.WELCOME: Welcome,
    FrameType.NOTIFY: Notify,
    FrameType.REQUEST: Request,
    FrameType.REPLY: Reply,
    FrameType.SEND: Send,
    FrameType.SEND_REPLY: SendReply,
    FrameType.LOST: Lost,
    FrameType.ERROR: Error,
    FrameType.BYE: Bye,
    FrameType.OBJECT: Object,
    FrameType.OBJECT_ACK: ObjectAck,
    FrameType.RELEASE: Release,
}
_DECODERS: dict[FrameType, tuple[tuple[tuple[str, Any], ...], Callable[..., Any]]] = {
    ftype: (_FIELD_CHECKS[ftype], _BUILDERS[ftype]) for ftype in FrameType
}


# --- the connection state machine -----------------------------------------------------


class Connection:
    """One end of a kport connection: frames bytes, parses bytes, enforces the state table."""

    def __init__(self, our_role: Role, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 64:
            raise ValueError(f"max_frame must be at least 64 bytes, not {max_frame}")
        self.our_role = our_role
        self.their_role = Role.SERVER if our_role is Role.CLIENT else Role.CLIENT
        self.max_frame = max_frame
        self.state = State.START
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._error: RemoteProtocolError | None = None

    # receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed the stream."""
        if data:
            if self._eof:
                raise LocalProtocolError("receive_data() after end of stream")
            self._buf += data
        else:
            self._eof = True

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed into events."""
        return len(self._buf) - self._pos

    def next_event(self) -> Event | NeedData:
        """The next complete event, :data:`NEED_DATA`, or :class:`ConnectionClosed` at EOF."""
        if self._error is not None:
            raise self._error
        try:
            event = self._parse_one()
        except RemoteProtocolError as err:
            self._error = err
            self.state = State.CLOSED
            raise
        return event

    def events(self) -> list[Event]:
        """Every complete event now buffered (stops after ConnectionClosed)."""
        out: list[Event] = []
        while True:
            event = self.next_event()
            if event is NEED_DATA:
                return out
            assert not isinstance(event, NeedData)
            out.append(event)
            if isinstance(event, ConnectionClosed):
                return out

    def _parse_one(self) -> Event | NeedData:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < HEADER_SIZE:
            self._compact()
            if self._eof:
                if avail:
                    raise RemoteProtocolError("connection ended inside a frame header")
                return ConnectionClosed()
            return NEED_DATA
        (size,) = _HEADER.unpack_from(buf, pos)
        if size > self.max_frame:
            raise RemoteProtocolError(
                f"frame of {size} bytes exceeds the limit of {self.max_frame} bytes"
            )
        start = pos + HEADER_SIZE
        end = start + size
        if len(buf) < end:
            self._compact()
            if self._eof:
                raise RemoteProtocolError("connection ended inside a frame")
            return NEED_DATA
        with memoryview(buf) as view:
            event = decode_body(view[start:end])
        self._pos = end
        self._advance(event, self.their_role, RemoteProtocolError)
        return event

    def _compact(self) -> None:
        # Parsing moves an offset; the consumed prefix is dropped only when a frame is
        # incomplete, so a buffer full of small frames is not copied once per frame.
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0

    # sending

    def send(self, event: Event) -> bytes:
        """The bytes for ``event``; raises LocalProtocolError if it may not be sent now."""
        self._advance(event, self.our_role, LocalProtocolError)
        data = encode(event)
        if len(data) - HEADER_SIZE > self.max_frame:
            raise LocalProtocolError(
                f"{type(event).__name__} frame of {len(data) - HEADER_SIZE} bytes exceeds "
                f"the limit of {self.max_frame} bytes"
            )
        return data

    def allowed(self, key: Key, sender: Role | None = None) -> bool:
        """Whether a frame with ``key`` may be sent by ``sender`` (default: us) now."""
        return key in TRANSITIONS[(self.state, sender or self.our_role)]

    def _advance(
        self,
        event: Event,
        sender: Role,
        error: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> None:
        if isinstance(event, ConnectionClosed):
            self.state = State.CLOSED
            return
        key = key_of(event)
        allowed = TRANSITIONS[(self.state, sender)]
        try:
            self.state = allowed[key]
        except KeyError:
            raise error(
                f"the {sender.value} may not send {key.value} in state {self.state.value}"
            ) from None
