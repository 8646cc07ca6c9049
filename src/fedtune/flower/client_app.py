"""The Flower ClientApp: fedtune's client behind Flower's ``train``/``evaluate``/``query`` handlers.

Each handler takes fedtune's message bytes out of the ``fedtune`` ConfigRecord, has them answered by
:func:`fedtune.flower.node.answer` — in the SuperNode's warm worker when its node config names one,
else in this process — and puts the reply bytes back. The handler itself holds no training code.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtune.errors import MessageError
from fedtune.flower import RECORD
from fedtune.flower.wire import MAX_CID, MAX_MESSAGE_BYTES, PolicyError, ask_worker

app = ClientApp()
_cache = None  # the in-process NodeHandler cache (Flower 1.41 starts one process per message)
# Only light imports at module level: with a warm worker this process just forwards bytes (see
# fedtune.flower.wire); the in-process path below imports the training code when it needs it.


def _answer(header: dict, payload: bytes, context: Context) -> tuple[dict, bytes]:
    header = dict(header, config=context.run_config["fedtune-config"], node_config=dict(context.node_config))
    worker = context.node_config.get("worker")
    if worker:
        return ask_worker(str(worker), header, payload)
    global _cache
    from fedtune.flower.node import HandlerCache, answer

    if _cache is None:
        _cache = HandlerCache()
    return answer(_cache, header, payload)


def _instruction(msg: Message) -> tuple[str, int, bytes]:
    """``(client id, round, message bytes)`` of a fit/evaluate instruction, with the types fedtune
    sends and nothing converted (``bytes(10**15)`` would allocate a petabyte)."""
    rec = msg.content[RECORD]
    cid, rnd, payload = rec["cid"], rec["round"], rec["payload"]
    if not isinstance(cid, str) or not 0 < len(cid) <= MAX_CID:
        raise MessageError("instruction without a client id")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or not 0 <= rnd < 2**31:
        raise MessageError("instruction without a round number")
    if not isinstance(payload, bytes) or len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(f"instruction payload is not a message of at most {MAX_MESSAGE_BYTES} bytes")
    return cid, rnd, payload


def _exchange(msg: Message, context: Context, op: str) -> Message:
    cid, rnd, payload = _instruction(msg)
    _, out = _answer({"op": op, "cid": cid, "round": rnd}, payload, context)
    return Message(RecordDict({RECORD: ConfigRecord({"cid": cid, "payload": out})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    # a fit, or an algorithm's own kind of exchange (its name in the record; checked by the handler)
    kind = msg.content[RECORD].get("kind", "fit")
    if not isinstance(kind, str) or not 0 < len(kind) <= 32 or not kind.replace("_", "").isalpha():
        raise MessageError("instruction with a malformed message kind")
    return _exchange(msg, context, kind)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _exchange(msg, context, "evaluate")


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which fedtune clients this node holds and their training-set sizes, or why this node refuses
    the run (its own policy: see :class:`fedtune.flower.node.NodePolicy`) — said once, plainly,
    rather than as a ClientApp exception the server would keep retrying."""
    try:
        reply, _ = _answer({"op": "describe"}, b"", context)
    except PolicyError as e:
        return Message(RecordDict({RECORD: ConfigRecord({"refused": str(e)})}), reply_to=msg)
    return Message(RecordDict({RECORD: ConfigRecord({"clients": json.dumps(reply["clients"])})}), reply_to=msg)
