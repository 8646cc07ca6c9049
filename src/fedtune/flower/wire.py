"""The SuperNode's local wire: length-prefixed frames between Flower's per-message ClientApp
process and the node's warm worker, plus the limits both ends enforce.

Kept free of torch, pydantic and fedtune's training code on purpose: Flower 1.41 starts a fresh
``flwr-clientapp`` process for every message, and all it does with a warm worker is forward bytes.
Importing torch there cost ~1.1 s (more on a busy node) per message, for nothing.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

from fedtune.errors import FedtuneError
from fedtune.limits import MAX_MESSAGE_BYTES
#: the longest client id a SuperNode may announce
MAX_CID = 128
MAX_HEADER = 1 << 16
_FRAME = struct.Struct("<IQ")


class PolicyError(FedtuneError):
    """The run's config asks for something this SuperNode's own policy does not allow."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("worker connection closed mid-frame")
        buf += chunk
    return bytes(buf)


def send_frame(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    h = json.dumps(header).encode()
    sock.sendall(_FRAME.pack(len(h), len(payload)) + h)
    if payload:  # the frame is complete without it: a peer that has answered and closed may be gone
        sock.sendall(payload)  # (a second sendall of b"" then raised BrokenPipeError under load)


def recv_frame(sock: socket.socket, max_payload: int) -> tuple[dict[str, Any], bytes]:
    hlen, plen = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if hlen > MAX_HEADER or plen > max_payload:
        raise ConnectionError(f"frame too large (header {hlen}, payload {plen} bytes)")
    header = json.loads(_recv_exact(sock, hlen))
    if not isinstance(header, dict):
        raise ConnectionError("frame header is not an object")
    return header, _recv_exact(sock, plen)


def ask_worker(path: str, header: dict[str, Any], payload: bytes = b"", timeout: float | None = None) -> tuple[dict[str, Any], bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        send_frame(s, header, payload)
        reply, data = recv_frame(s, MAX_MESSAGE_BYTES)
    if "error" in reply:
        raise (PolicyError if reply.get("refused") else FedtuneError)(f"fedtune worker at {path}: {reply['error']}")
    return reply, data
