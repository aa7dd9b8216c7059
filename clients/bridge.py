"""The ClientApp's side of the site worker protocol: one request over a Unix socket.

In deployment the ClientApp process Flower starts for each message is a thin forwarder: it
sends the message's content and its ``Context.state`` to the site's long-lived worker
(``fedslm.clients.worker``), which holds the loaded model, the data, the policy and the ledger,
and returns the worker's reply content and state. This module imports neither torch nor the
fedslm library, so that process starts in a fraction of a second.

Wire format (the same for a request and its reply), all integers big-endian::

    MAGIC (4 bytes) | frame: header (UTF-8 JSON) | frame: content | frame: state
    frame = length (8 bytes, unsigned) | that many bytes

``content`` and ``state`` are Flower ``RecordDict`` objects serialised with Flower's own
protobuf serde (``flwr.common.serde.recorddict_to_proto``); nothing is ever pickled. A request
header is ``{"protocol": 1, "kind": "train"|"evaluate"|"query", "node_id": int, "run_id": int}``
(the kind is the Flower message type the ClientApp received, ``KINDS``); a reply header is
``{"protocol": 1, "ok": true}`` or ``{"protocol": 1, "ok": false, "code":
"bad-request"|"busy"|"failed", "error": "what went wrong"}`` (``ErrorCode``; then content and
state are empty). Every frame is bounded (``MAX_HEADER_BYTES``, ``MAX_FRAME_BYTES``) on both
sides.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from enum import StrEnum
from typing import Any

from flwr.app import MessageType, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from google.protobuf.message import DecodeError

from fedslm.errors import FedSLMError

PROTOCOL = 1
MAGIC = b"FSW1"
# the messages a site answers, by Flower's names (the coordinator sends them by these too)
KINDS = (MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY)
# A training request carries the global adapter and its reply the site's update: a few MB for
# LoRA on a small model. The bound keeps a broken or hostile peer from making the other side
# allocate without limit; raise it for adapters larger than a few hundred MB.
MAX_FRAME_BYTES = 512 * 2**20
MAX_HEADER_BYTES = 64 * 2**10
CONNECT_TIMEOUT_S = 10.0
_LENGTH = struct.Struct(">Q")
_U64 = 2**64


class ErrorCode(StrEnum):
    """The ``code`` of an error reply: why the worker did not answer."""

    BAD_REQUEST = "bad-request"  # malformed, or a request that cannot be answered as asked
    BUSY = "busy"  # another request held the site longer than this one could wait
    FAILED = "failed"  # answering it failed at the site (the error says how)


class WorkerError(FedSLMError):
    """The worker could not be reached, or answered with an error (its message says which)."""

    def __init__(self, message: str, code: str = ErrorCode.FAILED) -> None:
        super().__init__(message)
        self.code = code


class FrameError(WorkerError):
    """A message on the socket is malformed: wrong magic, a frame too large, bad header."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.BAD_REQUEST)


def encode_records(records: RecordDict) -> bytes:
    """A RecordDict as Flower's protobuf bytes."""
    return recorddict_to_proto(records).SerializeToString()


def decode_records(data: bytes, what: str) -> RecordDict:
    """Inverse of ``encode_records``; ``FrameError`` naming ``what`` for bytes that are not a
    Flower RecordDict."""
    try:
        return recorddict_from_proto(ProtoRecordDict.FromString(data))
    except (DecodeError, ValueError, TypeError) as exc:
        raise FrameError(f"the {what} is not a Flower RecordDict (protobuf): {exc}") from None


def send_message(sock: socket.socket, header: dict[str, Any], content: bytes, state: bytes) -> None:
    """Write one message (header, content, state) to ``sock``."""
    head = json.dumps(header, sort_keys=True).encode("utf-8")
    parts = [MAGIC]
    for data in (head, content, state):
        parts += [_LENGTH.pack(len(data)), data]
    # one sendall per part: no copy of a large content frame into one buffer. Empty parts are
    # skipped: a peer that has read everything may already have closed, and a send of nothing
    # to it would fail (EPIPE) although the message arrived whole.
    for part in parts:
        if part:
            sock.sendall(part)


def recv_message(
    sock: socket.socket, max_frame: int = MAX_FRAME_BYTES
) -> tuple[dict[str, Any], bytes, bytes]:
    """Read one message from ``sock``: (header, content bytes, state bytes).

    Raises ``FrameError`` (before reading any further) when the magic is wrong, a frame is
    larger than its bound, or the header is not a JSON object; ``ConnectionError`` when the
    peer closes the connection in the middle.
    """
    magic = _recv_exact(sock, len(MAGIC))
    if magic != MAGIC:
        raise FrameError(
            f"not a fedslm worker message (starts with {magic!r}, expected {MAGIC!r}); "
            "is the other side a fedslm of the same protocol version?"
        )
    head = _recv_frame(sock, MAX_HEADER_BYTES, "header")
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"the header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError(f"the header is a JSON {type(header).__name__}, not an object")
    content = _recv_frame(sock, max_frame, "content")
    state = _recv_frame(sock, max_frame, "state")
    return header, content, state


def _recv_frame(sock: socket.socket, limit: int, what: str) -> bytes:
    (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    if length > limit:
        raise FrameError(
            f"the {what} frame is {length:,} bytes, more than the limit of {limit:,} "
            "(fedslm.clients.bridge.MAX_FRAME_BYTES / MAX_HEADER_BYTES)"
        )
    return _recv_exact(sock, length)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"the peer closed the connection after {got} of {n} bytes")
        got += k
    return bytes(buf)


def request_header(kind: str, node_id: int, run_id: int) -> dict[str, Any]:
    """The header of a request."""
    return {"protocol": PROTOCOL, "kind": kind, "node_id": int(node_id), "run_id": int(run_id)}


def validate_request_header(header: dict[str, Any]) -> tuple[str, int, int]:
    """(kind, node_id, run_id) of a request header; ``FrameError`` naming what is wrong."""
    if header.get("protocol") != PROTOCOL:
        raise FrameError(
            f"protocol version {header.get('protocol')!r} is not {PROTOCOL}: the ClientApp and "
            "the site worker come from different fedslm versions; install one version at the site"
        )
    unknown = sorted(set(header) - {"protocol", "kind", "node_id", "run_id"})
    if unknown:
        raise FrameError(f"unknown header keys {unknown}")
    kind = header.get("kind")
    if kind not in KINDS:
        raise FrameError(f"header kind {kind!r} is not one of {list(KINDS)}")
    ids = {}
    for key in ("node_id", "run_id"):
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _U64:
            raise FrameError(f"header {key} must be an integer in [0, 2^64), got {value!r}")
        ids[key] = value
    return str(kind), ids["node_id"], ids["run_id"]


def call_worker(
    path: str,
    kind: str,
    content: RecordDict,
    state: RecordDict,
    *,
    node_id: int,
    run_id: int,
    timeout: float | None = None,
    max_frame: int = MAX_FRAME_BYTES,
) -> tuple[RecordDict, RecordDict]:
    """Send one message to the worker listening at ``path``; return its (content, state).

    ``timeout`` bounds the wait for the reply (None: as long as the round takes; Flower's own
    heartbeats and round timeout bound it from outside). Raises ``WorkerError`` with the
    worker's own message when it answers with an error (bad request, busy, failed), and with
    what to check when it cannot be reached.
    """
    body, st = encode_records(content), encode_records(state)
    for what, data in (("content", body), ("state", st)):
        if len(data) > max_frame:
            raise WorkerError(
                f"the {what} of this {kind} message is {len(data):,} bytes, more than the "
                f"worker protocol's limit of {max_frame:,} (MAX_FRAME_BYTES)"
            )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise WorkerError(
                f"no site worker socket at {path}: is `fedslm site start` running on this site?"
            ) from None
        except ConnectionRefusedError:
            raise WorkerError(
                f"the site worker at {path} does not accept connections (a stale socket "
                "file?): restart `fedslm site start`"
            ) from None
        except PermissionError:
            raise WorkerError(
                f"no permission to connect to {path}: the SuperNode's user must be in the "
                "group that owns the worker's socket (mode 0660)"
            ) from None
        sock.settimeout(timeout)
        # the worker may have answered early (an error) and closed: its reply is read below
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            send_message(sock, request_header(kind, node_id, run_id), body, st)
        try:
            header, reply, reply_state = recv_message(sock, max_frame)
        except FrameError as exc:
            raise WorkerError(f"malformed reply from the site worker: {exc}") from None
        except (ConnectionError, OSError) as exc:
            raise WorkerError(f"the site worker at {path} did not answer: {exc}") from None
    finally:
        sock.close()
    if not header.get("ok"):
        code = str(header.get("code", ErrorCode.FAILED))
        raise WorkerError(f"site worker ({code}): {header.get('error', 'no reason given')}", code)
    return decode_records(reply, "reply content"), decode_records(reply_state, "reply state")
