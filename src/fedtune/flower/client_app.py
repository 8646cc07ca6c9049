"""The Flower ClientApp: fedtune's client behind Flower's ``train``/``evaluate``/``query`` handlers.

Each handler takes fedtune's message bytes out of the ``fedtune`` ConfigRecord, has them answered by
:func:`fedtune.flower.node.answer` — in the SuperNode's warm worker when its node config names one,
else in this process — and puts the reply bytes back. The handler itself holds no training code.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtune.flower import RECORD

app = ClientApp()
_cache = None  # the in-process NodeHandler cache (Flower 1.41 starts one process per message)


def _answer(header: dict, payload: bytes, context: Context) -> tuple[dict, bytes]:
    header = dict(header, config=context.run_config["fedtune-config"], node_config=dict(context.node_config))
    worker = context.node_config.get("worker")
    if worker:
        from fedtune.flower.node import ask_worker

        return ask_worker(str(worker), header, payload)
    global _cache
    from fedtune.flower.node import HandlerCache, answer

    if _cache is None:
        _cache = HandlerCache()
    return answer(_cache, header, payload)


def _exchange(msg: Message, context: Context, op: str) -> Message:
    rec = msg.content[RECORD]
    header = {"op": op, "cid": str(rec["cid"]), "round": int(rec["round"])}
    _, out = _answer(header, bytes(rec["payload"]), context)
    return Message(RecordDict({RECORD: ConfigRecord({"cid": header["cid"], "payload": out})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _exchange(msg, context, "fit")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _exchange(msg, context, "evaluate")


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which fedtune clients this node holds and their training-set sizes."""
    reply, _ = _answer({"op": "describe"}, b"", context)
    return Message(RecordDict({RECORD: ConfigRecord({"clients": json.dumps(reply["clients"])})}), reply_to=msg)
