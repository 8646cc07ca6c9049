"""Transport: how the server's messages reach clients and replies come back.

The server only sees this interface, so the in-process simulation and a networked runtime run the
same client and server code (Flower's in-memory vs gRPC ``Grid``). The in-process transport still
serialises every message to bytes and parses replies strictly, so byte counts are exact and the
parsing path is exercised in every simulation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fedtune.messages import Message, MessageError, decode, encode

log = logging.getLogger(__name__)


@dataclass
class Reply:
    cid: str
    message: Message | None
    bytes_down: int
    bytes_up: int
    seconds: float
    error: str | None = None


class Transport(Protocol):
    def send(self, kind: str, instructions: dict[str, Message], *, expect=None,
             on_reply: Callable[[Reply], None] | None = None) -> list[Reply]:
        """Deliver ``instructions[cid]`` (``kind`` is ``fit`` or ``evaluate``) and collect replies.

        ``expect[cid]`` is the tensor spec a ``fit`` reply from ``cid`` must match exactly.
        """
        ...


class InProcessTransport:
    """Clients live in this process; calls run one after another on the shared model."""

    def __init__(self, clients: dict):
        self.clients = clients

    def send(self, kind, instructions, *, expect=None, on_reply=None):
        replies = []
        cache: dict[int, bytes] = {}  # a broadcast message is encoded once
        for cid, msg in instructions.items():
            if id(msg) not in cache:
                cache = {id(msg): encode(msg)}  # keep only the current broadcast's bytes
            down = cache[id(msg)]
            t0 = time.perf_counter()
            received = decode(down)
            client = self.clients[cid]
            answer = client.fit(received) if kind == "fit" else client.evaluate(received)
            up = encode(answer)
            try:
                parsed = decode(up, expect=expect.get(cid) if (expect and kind == "fit") else None)
                reply = Reply(cid, parsed, len(down), len(up), time.perf_counter() - t0)
            except MessageError as e:
                log.warning("rejected %s reply from client %s: %s", kind, cid, e)
                reply = Reply(cid, None, len(down), len(up), time.perf_counter() - t0, error=str(e))
            replies.append(reply)
            if on_reply is not None:
                on_reply(reply)
        return replies
