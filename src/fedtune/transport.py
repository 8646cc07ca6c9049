"""Transport: how the server's messages reach clients and replies come back.

The server only sees :class:`Transport`, so the in-process simulation and a networked runtime run
the same client and server code (Flower's in-memory vs gRPC ``Grid``). Every transport moves the
same bytes through the same two functions:

* :func:`handle_on_client` — on the client side: instruction bytes in, reply bytes out;
* :func:`parse_reply` — on the server side: reply bytes in, a strictly parsed :class:`Reply` out.

The in-process transport calls them directly, so byte counts are exact and the strict parsing
path runs in every simulation; a networked transport calls them on either end of the wire.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fedtune.codecs.base import TensorSpec
from fedtune.hardware import release_free_memory
from fedtune.messages import Message, MessageError, decode, encode

log = logging.getLogger(__name__)

#: name -> what a reply's tensor must be (:class:`~fedtune.codecs.base.TensorSpec`)
Spec = dict[str, TensorSpec]
#: a message kind: ``fit``, ``evaluate``, or one an algorithm adds (``Algorithm.exchanges``)
KIND_CHARS = set("abcdefghijklmnopqrstuvwxyz_")


@dataclass
class Reply:
    cid: str
    message: Message | None
    bytes_down: int
    bytes_up: int
    seconds: float
    error: str | None = None


class Transport(Protocol):
    def send(self, kind: str, instructions: dict[str, Message], *, expect: dict[str, Spec] | None = None,
             on_reply: Callable[[Reply], None] | None = None) -> list[Reply]:
        """Deliver ``instructions[cid]`` (``kind``: ``fit``, ``evaluate`` or an algorithm's own) and
        collect replies.

        ``expect[cid]`` is the tensor spec a reply from ``cid`` must match exactly. Replies
        come back in the order of ``instructions`` (a fixed, sampled order) so that aggregation is
        deterministic whatever the network does; ``on_reply`` is called for each as it is parsed.
        """
        ...


def handle_on_client(client, kind: str, data: bytes) -> bytes:
    """Client side of one exchange: parse the instruction strictly against what this client's
    algorithm half says it may hold (a compressed instruction may not expand past it either), run
    ``client.fit`` / ``evaluate`` / ``exchange``, encode the reply."""
    extra = tuple(getattr(getattr(getattr(client, "rt", None), "algorithm", None), "exchanges", ()))
    if kind not in ("fit", "evaluate", *extra):
        raise MessageError(f"unknown message kind '{kind[:40]}'")
    received = decode(data, expect=client.instruction_spec(kind))
    if kind == "fit":
        answer = client.fit(received)
    elif kind == "evaluate":
        answer = client.evaluate(received)
    else:
        answer = client.exchange(kind, received)
    release_free_memory()  # this client's activations are all free now (see fedtune.hardware)
    return encode(answer)


def check_reply_metrics(kind: str, metrics: dict[str, float]) -> None:
    """What the server reads from a reply's metrics beyond "finite numbers" (which
    :func:`~fedtune.messages.decode` ensures): token counts are non-negative integers, and a loss
    sum comes with the token count it is divided by. An evaluation reply holds nothing else
    (``<split>_loss_sum`` and ``<split>_tokens`` pairs); a fit reply's ``local_*`` evaluation of
    the client's own adapter comes in the same pairs."""
    for k, v in metrics.items():
        if k.endswith("_tokens") and (not isinstance(v, int) or v < 0):
            raise MessageError(f"metric '{k}' is {v!r}: a token count must be a non-negative integer")
    sums = {k[: -len("_loss_sum")] for k in metrics if k.endswith("_loss_sum")}
    counts = {k[: -len("_tokens")] for k in metrics if k.endswith("_tokens")}
    if kind == "evaluate":
        unpaired = set(metrics) ^ {f"{p}_{s}" for p in sums & counts for s in ("loss_sum", "tokens")}
    else:
        unpaired = {f"{p}_loss_sum" for p in sums - counts}
        unpaired |= {f"{p}_tokens" for p in counts if p.startswith("local_") and p not in sums}
    if unpaired:
        raise MessageError(f"{kind} reply metrics {sorted(unpaired)[:4]} are unpaired or unknown "
                           "(<name>_loss_sum and <name>_tokens go together; an evaluation holds only such pairs)")


def parse_reply(cid: str, kind: str, up: bytes | None, *, bytes_down: int, seconds: float,
                expect: Spec | None = None, error: str | None = None) -> Reply:
    """Server side: parse a client's reply strictly; a bad or missing reply becomes a rejected
    :class:`Reply` (logged with its reason) and the round goes on without it."""
    if up is None:
        log.warning("no %s reply from client %s: %s", kind, cid, error)
        return Reply(cid, None, bytes_down, 0, seconds, error=error or "no reply")
    try:
        # an evaluate reply carries metrics only: expecting no tensors also caps its size
        parsed = decode(up, expect={} if kind == "evaluate" else expect)
        check_reply_metrics(kind, parsed.metrics)
        return Reply(cid, parsed, bytes_down, len(up), seconds)
    except MessageError as e:
        log.warning("rejected %s reply from client %s: %s", kind, cid, e)
        return Reply(cid, None, bytes_down, len(up), seconds, error=str(e))


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
            up = handle_on_client(self.clients[cid], kind, down)
            reply = parse_reply(cid, kind, up, bytes_down=len(down), seconds=time.perf_counter() - t0,
                                expect=(expect or {}).get(cid))
            replies.append(reply)
            if on_reply is not None:
                on_reply(reply)
        return replies
