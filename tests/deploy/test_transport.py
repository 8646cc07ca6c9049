"""FlowerTransport, the ClientApp and the per-round client state, without processes: a fake Grid
delivers Flower messages to the real ClientApp in this process (as Flower's InMemoryGrid would)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fedtune.payload import flatten
from flwr.app import ConfigRecord, Context, Error, Message as FMessage, RecordDict

from fedtune.config import DeployConfig, load_config
from fedtune.flower import RECORD
from fedtune.flower.client_app import app as client_app
from fedtune.flower.node import NodeSpec, RoundStateStore
from fedtune.flower.wire import ask_worker, recv_frame, send_frame
from fedtune.flower.transport import FlowerTransport, RoundFailed, natural_key
from fedtune.messages import Message, encode
from fedtune.state import ClientState


@pytest.fixture(autouse=True)
def task_identity():
    """Flower's Message needs the process's task identity (set by flwr-serverapp/-clientapp)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


class FakeGrid:
    """Nodes are callables (Flower message -> reply or None for 'never answers')."""

    def __init__(self):
        self.nodes = {}
        self.names = {}  # node id -> registered name (fedtune deploy register --client-id)
        self.replies = {}
        self.pushed = []

    def get_node_ids(self):
        return list(self.nodes)

    def get_nodes(self):
        from flwr.proto.node_pb2 import NodeInfo

        return [NodeInfo(node_id=n, name=self.names.get(n, "")) for n in self.get_node_ids()]

    def push_messages(self, msgs):
        ids = []
        for i, m in enumerate(msgs):
            m.metadata.__dict__["_message_id"] = f"m{len(self.pushed)}"
            self.pushed.append(m)
            ids.append(m.metadata.message_id)
            fn = self.nodes.get(m.metadata.dst_node_id)
            r = fn(m) if fn else None
            if r is not None:
                self.replies[m.metadata.message_id] = r
        return ids

    def pull_messages(self, ids):
        # hand replies back in reverse order: the transport must restore the instruction order
        return [self.replies.pop(i) for i in reversed(list(ids)) if i in self.replies]


def echo_node(cids, scale=1.0):
    """A node whose clients reply with the received tensors times ``scale``."""
    def handle(m):
        rec = m.content[RECORD]
        if m.metadata.message_type == "query":
            return FMessage(RecordDict({RECORD: ConfigRecord({"clients": json.dumps({c: 10 for c in cids})})}), reply_to=m)
        from fedtune.messages import decode
        got = decode(bytes(rec["payload"]))
        out = Message({k: v * scale for k, v in got.tensors.items()}, metrics={"train_loss": 1.0})
        return FMessage(RecordDict({RECORD: ConfigRecord({"cid": rec["cid"], "payload": encode(out)})}), reply_to=m)
    return handle


def dcfg(**kw):
    return DeployConfig(poll_s=0.01, round_timeout_s=0.2, join_timeout_s=0.2, **kw)


def test_replies_in_instruction_order_and_missing_become_rejected():
    g = FakeGrid()
    g.nodes = {11: echo_node(["b"]), 12: echo_node(["a"], 2.0), 13: echo_node(["c"])}
    t = FlowerTransport(g, dcfg(min_clients=2), sleep=lambda s: None)
    cids, num = t.discover()
    assert cids == ["a", "b", "c"] and num == {"a": 10, "b": 10, "c": 10}
    del g.nodes[13]  # c's SuperNode vanishes
    x = torch.ones(2, 3)
    seen = []
    msg = Message({"w": x}, config={"round": 1})
    replies = t.send("fit", {"c": msg, "a": msg, "b": msg}, expect={k: {"w": ((2, 3), torch.float32)} for k in "abc"},
                     on_reply=lambda r: seen.append(r.cid))
    assert [r.cid for r in replies] == ["c", "a", "b"] == seen
    assert replies[0].message is None and "not connected" in replies[0].error
    assert torch.equal(replies[1].message.tensors["w"], 2 * x) and torch.equal(replies[2].message.tensors["w"], x)
    assert replies[1].bytes_down == len(encode(msg)) == replies[2].bytes_down


def test_timeout_error_reply_and_min_clients():
    g = FakeGrid()
    silent = lambda m: None if m.metadata.message_type != "query" else echo_node(["s"])(m)  # noqa: E731
    failing = lambda m: (FMessage(Error(7, "ClientApp raised"), reply_to=m) if m.metadata.message_type != "query"  # noqa: E731
                         else echo_node(["f"])(m))
    g.nodes = {1: echo_node(["ok"]), 2: silent, 3: failing}
    t = FlowerTransport(g, dcfg(min_clients=1), sleep=lambda s: None)
    t.discover()
    msg = Message({"w": torch.zeros(1)}, config={"round": 1})
    r = {x.cid: x for x in t.send("fit", {c: msg for c in ("ok", "s", "f")})}
    assert r["ok"].message is not None
    assert "no reply within" in r["s"].error and "ClientApp raised" in r["f"].error
    t2 = FlowerTransport(g, dcfg(min_clients=2), sleep=lambda s: None)
    t2.discover()
    with pytest.raises(RoundFailed, match="1 of 3 clients answered"):
        t2.send("fit", {c: msg for c in ("ok", "s", "f")})


def test_a_restarted_node_is_found_again_and_a_short_round_fails_before_sending():
    g = FakeGrid()
    g.nodes = {1: echo_node(["a"]), 2: echo_node(["b"])}
    t = FlowerTransport(g, dcfg(clients=["a", "b"]), sleep=lambda s: None)
    assert t.discover()[0] == ["a", "b"]
    del g.nodes[2]
    msg = Message({"w": torch.zeros(1)}, config={"round": 2})
    n_pushed = len(g.pushed)
    with pytest.raises(RoundFailed, match="missing \\['b'\\]"):
        t.send("fit", {"a": msg, "b": msg})  # default min_clients: every sampled client
    assert len(g.pushed) == n_pushed  # nothing was sent for a round that cannot succeed
    g.nodes[7] = echo_node(["b"])  # b's SuperNode restarts under a new node id
    assert all(r.message is not None for r in t.send("fit", {"a": msg, "b": msg}))
    assert t.node_of["b"] == 7


class FakeClock:
    """Time that moves only when the transport sleeps."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def unavailable_once(cids):
    """A node just after a SuperLink restart: its first query gets the SuperLink's 'node unavailable'."""
    calls = []

    def handle(m):
        calls.append(m.metadata.message_type)
        if len(calls) == 1:
            return FMessage(Error(5, "Error: Node Unavailable"), reply_to=m)
        return echo_node(cids)(m)
    return handle


def test_a_node_whose_query_errs_is_asked_again_soon_not_after_the_join_timeout():
    g, clock = FakeGrid(), FakeClock()
    g.nodes = {1: echo_node(["a"]), 2: echo_node(["b"]), 3: unavailable_once(["c"])}
    t = FlowerTransport(g, DeployConfig(poll_s=0.2, join_timeout_s=240), sleep=clock.sleep, clock=clock)
    cids, _ = t.discover()
    assert cids == ["a", "b", "c"]  # not a run of a and b alone after 240 s
    assert clock.t < 10


def test_a_silent_node_costs_the_query_timeout_once_then_backs_off():
    """A SuperNode that connects but never answers: the run starts after deploy.query_timeout_s
    (not the 300 s join timeout), and it is asked again after 30, 60, 120 ... s, not before every
    exchange."""
    g, clock = FakeGrid(), FakeClock()
    g.nodes = {1: echo_node(["a"]), 2: echo_node(["b"]), 3: lambda m: None}
    t = FlowerTransport(g, DeployConfig(poll_s=0.2, join_timeout_s=300, query_timeout_s=30),
                        sleep=clock.sleep, clock=clock)
    assert t.discover()[0] == ["a", "b"]
    assert 30 <= clock.t < 35  # one query timeout, not the join timeout

    def queries_to_3():
        return sum(m.metadata.dst_node_id == 3 and m.metadata.message_type == "query" for m in g.pushed)
    msg = Message({"w": torch.zeros(1)}, config={"round": 1})
    asked_at = []
    for _ in range(40):  # exchanges every ~10 s of fake time
        before = queries_to_3()
        t.send("fit", {"a": msg, "b": msg})
        if queries_to_3() > before:
            asked_at.append(round(clock.t))
        clock.t += 10
    gaps = [b - a for a, b in zip(asked_at, asked_at[1:])]
    assert len(asked_at) >= 3 and all(b > a for a, b in zip(gaps, gaps[1:]))  # the back-off grows
    assert queries_to_3() < 10  # 40 exchanges, a handful of queries


def _reply(m, fields):
    return FMessage(RecordDict({RECORD: ConfigRecord(fields)}), reply_to=m)


@pytest.mark.parametrize("fields,needle", [
    ({"cid": "a", "payload": [256]}, "payload"),
    ({"cid": "a", "payload": -1}, "payload"),
    ({"cid": "a", "payload": 10**15}, "payload"),  # bytes(10**15) would try to allocate a petabyte
    ({"cid": "a", "payload": 3 * 10**9}, "payload"),
    ({"cid": "a", "payload": "text"}, "payload"),
    ({"cid": 5, "payload": b""}, "names client"),
    ({"cid": "b", "payload": b""}, "names client 'b'"),
    ({"payload": b""}, "without a fedtune record"),
])
def test_hostile_record_fields_from_a_supernode_are_rejected(fields, needle):
    g = FakeGrid()
    ok = echo_node(["a"])
    g.nodes = {1: lambda m: ok(m) if m.metadata.message_type == "query" else _reply(m, fields)}
    t = FlowerTransport(g, dcfg(min_clients=1), sleep=lambda s: None)
    t.discover()
    (r,) = t.send("evaluate", {"a": Message(config={"round": 1})})
    assert r.message is None and needle in r.error


@pytest.mark.parametrize("clients", [
    "[" * 100_000 + "]" * 100_000,  # json.loads: RecursionError
    json.dumps({"a": 10**400}),  # FedAvg weight: OverflowError in float()
    json.dumps({"a": 2**53 + 1}), json.dumps({"a": -1}), json.dumps({"a": True}), json.dumps({"a": 1.5}),
    json.dumps({"": 1}), json.dumps({"x" * 200: 1}), json.dumps({"a\nb": 1}),
    json.dumps({f"c{i}": 1 for i in range(2000)}), "9" * 5000, "not json", " " * (2 << 20),
])
def test_hostile_client_lists_are_refused_and_logged(clients, caplog):
    g = FakeGrid()
    g.nodes = {1: echo_node(["ok"]),
               2: lambda m: _reply(m, {"clients": clients}) if m.metadata.message_type == "query" else None}
    t = FlowerTransport(g, dcfg(), sleep=lambda s: None)
    cids, num = t.discover()
    assert cids == ["ok"] and num == {"ok": 10}
    assert "SuperNode 2 sent an unusable client list" in caplog.text


def test_hostile_instruction_fields_are_refused_by_the_client_app():
    from fedtune.flower.client_app import _instruction
    from fedtune.messages import MessageError

    for fields in ({"cid": "a", "round": 1, "payload": 10**15}, {"cid": "a", "round": 1, "payload": [256]},
                   {"cid": "a", "round": "1", "payload": b""}, {"cid": "a", "round": True, "payload": b""},
                   {"cid": 7, "round": 1, "payload": b""}, {"cid": "a", "round": -1, "payload": b""}):
        m = FMessage(RecordDict({RECORD: ConfigRecord(fields)}), 5, "train")
        with pytest.raises(MessageError):
            _instruction(m)
    m = FMessage(RecordDict({RECORD: ConfigRecord({"cid": "a", "round": 3, "payload": b"xy"})}), 5, "train")
    assert _instruction(m) == ("a", 3, b"xy")


def test_a_client_id_stays_with_its_first_live_node(caplog):
    """A second SuperNode announcing a client id that a live node holds is refused (and logged); it
    takes over only once the holder has left the SuperLink's live list."""
    g = FakeGrid()
    g.nodes = {1: echo_node(["a"], scale=1.0), 2: echo_node(["b"])}
    t = FlowerTransport(g, dcfg(), sleep=lambda s: None)
    assert t.discover()[0] == ["a", "b"]
    g.nodes[9] = echo_node(["a"], scale=5.0)  # an impostor announcing 'a'
    msg = Message({"w": torch.ones(1)}, config={"round": 1})
    r = {x.cid: x for x in t.send("fit", {"a": msg, "b": msg})}
    assert t.node_of["a"] == 1 and torch.equal(r["a"].message.tensors["w"], torch.ones(1))
    assert "SuperNode 9 announces client a, which live SuperNode 1 holds: refused" in caplog.text
    n = len(g.pushed)
    t.send("fit", {"a": msg, "b": msg})
    assert len(g.pushed) == n + 2  # the refused claim is not probed again each exchange
    del g.nodes[1]  # the holder leaves: the other claimant takes over
    t.send("fit", {"a": msg, "b": msg})
    assert t.node_of["a"] == 9


def test_a_restarted_node_takes_over_from_its_silent_old_id():
    """A SuperNode restarted without authentication comes back under a new node id while the old
    one is still in the live list (until its heartbeat lapses): the old id is probed, does not
    answer within deploy.query_timeout_s, and the new node takes the client over."""
    g, clock = FakeGrid(), FakeClock()
    g.nodes = {1: echo_node(["a"]), 2: echo_node(["b"])}
    t = FlowerTransport(g, DeployConfig(poll_s=0.5, join_timeout_s=300, query_timeout_s=10),
                        sleep=clock.sleep, clock=clock)
    assert t.discover()[0] == ["a", "b"]
    g.nodes[1] = lambda m: None  # killed: still listed, never answers
    g.nodes[3] = echo_node(["a"])  # restarted
    t0 = clock.t
    msg = Message({"w": torch.ones(1)}, config={"round": 2})
    assert all(r.message is not None for r in t.send("fit", {"a": msg, "b": msg}))
    assert t.node_of["a"] == 3 and clock.t - t0 <= 10 + 2
    # killed mid-round: its fit times out, then its restart takes over at once (no probe needed)
    g.nodes[3] = lambda m: None if m.metadata.message_type != "query" else echo_node(["a"])(m)
    t = FlowerTransport(g, DeployConfig(poll_s=0.5, join_timeout_s=300, query_timeout_s=10, round_timeout_s=30,
                                        min_clients=1), sleep=clock.sleep, clock=clock)
    g.nodes.pop(1)
    assert t.discover()[0] == ["a", "b"] and t.node_of["a"] == 3
    r = {x.cid: x for x in t.send("fit", {"a": msg, "b": msg})}
    assert r["a"].message is None and "no reply within" in r["a"].error
    g.nodes[3] = lambda m: None  # dead, still listed
    g.nodes[4] = echo_node(["a"])
    t0 = clock.t
    assert all(x.message is not None for x in t.send("fit", {"a": msg, "b": msg}))
    assert t.node_of["a"] == 4 and clock.t - t0 < 10  # not even one query timeout spent on the old id


def test_a_key_registered_for_client_ids_binds_its_node_to_them(caplog):
    g = FakeGrid()
    g.nodes = {1: echo_node(["a", "b"]), 2: echo_node(["c"]), 3: echo_node(["d"])}
    g.names = {1: "a", 2: "c"}  # fedtune deploy register KEY.pub --client-id a
    t = FlowerTransport(g, dcfg(), sleep=lambda s: None)
    assert t.discover()[0] == ["a", "c", "d"]  # node 1 may not hold 'b'
    assert "registered for ['a'] but announces ['b']" in caplog.text
    t2 = FlowerTransport(g, dcfg(require_bound_clients=True), sleep=lambda s: None)
    assert t2.discover()[0] == ["a", "c"]  # the unregistered node 3 holds nothing


def test_a_resumed_run_waits_for_its_checkpointed_clients():
    """After a SuperLink restart the SuperNodes reconnect one by one: a resumed run must not start
    with whoever is back first (it would aggregate fewer clients than the run it continues)."""
    g, clock = FakeGrid(), FakeClock()
    g.nodes = {1: echo_node(["a"])}
    late = {2: echo_node(["b"]), 3: echo_node(["c"])}
    real_ids = g.get_node_ids

    def ids():  # b and c reconnect 5 s and 12 s later
        for n, at in ((2, 5.0), (3, 12.0)):
            if clock.t >= at:
                g.nodes.setdefault(n, late[n])
        return real_ids()
    g.get_node_ids = ids
    t = FlowerTransport(g, DeployConfig(poll_s=0.2, join_timeout_s=240), sleep=clock.sleep, clock=clock)
    cids, num = t.discover(["a", "b", "c"])
    assert cids == ["a", "b", "c"] and num == {"a": 10, "b": 10, "c": 10}
    assert 12 <= clock.t < 20
    g2 = FakeGrid()
    g2.nodes = {1: echo_node(["a"])}
    assert FlowerTransport(g2, dcfg(), sleep=lambda s: None).discover()[0] == ["a"]  # no list: whoever is there


def test_discover_names_missing_clients():
    g = FakeGrid()
    g.nodes = {1: echo_node(["a"])}
    with pytest.raises(Exception, match="missing \\['b'\\]"):
        FlowerTransport(g, dcfg(clients=["a", "b"]), sleep=lambda s: None).discover()


def test_natural_order():
    assert sorted(["client_10", "client_2", "client_1"], key=natural_key) == ["client_1", "client_2", "client_10"]


def test_round_state_store_resumes_from_the_state_before_the_round(tmp_path):
    s = RoundStateStore(tmp_path, keep=3)
    for rnd in (1, 2, 3):
        s.at_round(rnd)
        assert s.get("c").meta.get("v") == (rnd - 1 if rnd > 1 else None)
        s.put("c", ClientState(tensors={"x": torch.full((1,), float(rnd))}, meta={"v": rnd}))
    # a server resumed from its round-1 checkpoint re-runs round 2: the client starts from round 1
    s.at_round(2)
    assert s.get("c").meta["v"] == 1
    s.put("c", ClientState(meta={"v": 20}))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["round_00001.safetensors", "round_00002.safetensors"]
    s.at_round(5)  # missed rounds 3-4 (not sampled or offline): the newest earlier state
    assert s.get("c").meta["v"] == 20


def test_node_spec_and_worker_frames(tmp_path):
    assert NodeSpec.from_node_config({"client-id": "a, b"}).cids == ["a", "b"]
    with pytest.raises(Exception, match="client-id"):
        NodeSpec.from_node_config({})
    import socket
    a, b = socket.socketpair()
    send_frame(a, {"op": "x"}, b"payload")
    assert recv_frame(b, 100) == ({"op": "x"}, b"payload")
    a.sendall((10**6).to_bytes(4, "little") + (1).to_bytes(8, "little"))
    with pytest.raises(ConnectionError, match="too large"):
        recv_frame(b, 100)
    with pytest.raises(OSError):
        ask_worker(str(tmp_path / "nobody.sock"), {"op": "describe"})


@pytest.fixture
def toy_cfg(tmp_path):
    from test_e2e import _write_data

    data = _write_data(tmp_path / "toy.jsonl")
    return load_config(None, ["seed=3", "model.name=tiny-llama", f"data.source={data}", "data.splitter=meta",
                              "data.num_clients=3", "data.max_length=64", f"data.cache_dir={tmp_path / 'tok'}",
                              "peft.r=4", "train.local_steps=2", "train.batch_size=2", "fl.rounds=2"])


def test_client_app_in_process_matches_the_simulated_client(toy_cfg, tmp_path):
    """The ClientApp (no worker) answers a fit with the same bytes FedClient gives in simulation."""
    from fedtune.client import ClientRuntime, FedClient
    from fedtune.algorithms import get_algorithm
    from fedtune.run import build_adapter_model, load_client_data
    from fedtune.models import load_model
    from fedtune.state import ClientStateStore
    from fedtune.transport import handle_on_client

    cfg_json = json.dumps(toy_cfg.to_dict())
    ctx = Context(run_id=1, node_id=5, node_config={"client-id": "beta", "state-dir": str(tmp_path / "st"),
                                                    "data-dir": str(tmp_path)},
                  state=RecordDict(), run_config={"fedtune-config": cfg_json})
    base = load_model(toy_cfg.model)
    tok = load_client_data(toy_cfg, base[1])
    am = build_adapter_model(toy_cfg, base)
    down = encode(Message(flatten({"adapter": am.init}), config={"round": 1}))
    q = FMessage(RecordDict({RECORD: ConfigRecord({"payload": b""})}), 5, "query")
    q.metadata.__dict__["_message_id"] = "q"
    assert json.loads(client_app(q, ctx).content[RECORD]["clients"]) == {"beta": len(tok["beta"]["train"])}
    m = FMessage(RecordDict({RECORD: ConfigRecord({"cid": "beta", "round": 1, "payload": down})}), 5, "train")
    m.metadata.__dict__["_message_id"] = "m"
    up = bytes(client_app(m, ctx).content[RECORD]["payload"])
    rt = ClientRuntime(model=am.model, pad_id=am.tokenizer.pad_token_id, cfg=toy_cfg, device=am.device,
                       algorithm=get_algorithm("fedavg"), store=ClientStateStore(None))
    sim = handle_on_client(FedClient("beta", rt, **tok["beta"]), "fit", down)
    from fedtune.messages import decode
    a, b = decode(up), decode(sim)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert (tmp_path / "st" / "beta" / "round_00001.safetensors").is_file()


def test_a_node_with_its_own_data_file_trains_on_that_file_only(toy_cfg, tmp_path):
    from fedtune.flower.node import NodeHandler

    own = tmp_path / "hospital.jsonl"
    own.write_text("".join(json.dumps({"instruction": f"Say kiwi {i}", "input": "", "output": "kiwi " * (i % 3 + 1),
                                       "category": "own"}) + "\n" for i in range(20)))
    h = NodeHandler(toy_cfg, NodeSpec.from_node_config({"client-id": "hospital-a", "data": str(own)}))
    client = h.clients["hospital-a"]
    n_val = len(client.splits["val"]) if client.splits["val"] is not None else 0
    n_test = len(client.splits["test"]) if client.splits["test"] is not None else 0
    assert client.num_train + n_val + n_test == 20  # every record of the file, none of the run's data
    assert h.describe() == {"hospital-a": client.num_train}
    with pytest.raises(Exception, match="exactly one client-id"):
        NodeSpec.from_node_config({"client-id": "a,b", "data": str(own)})
    with pytest.raises(Exception, match="not a client of this run's data split"):
        NodeHandler(toy_cfg, NodeSpec.from_node_config({"client-id": "delta"}))


def test_a_clustered_node_trains_each_client_on_two_processes_like_one(toy_cfg, tmp_path):
    """train.world_size=2 on a SuperNode: its fit answer equals the single-process node's (within
    float tolerance, as in tests/test_distributed.py). The node trains on its own data file, so the
    follower must build the node's clients, not the run's data split."""
    from fedtune.adapters import get_adapter_state
    from fedtune.flower.node import NodeHandler
    from fedtune.messages import decode

    own = tmp_path / "hospital.jsonl"
    own.write_text("".join(json.dumps({"instruction": f"Say kiwi {i}", "input": "", "output": "kiwi " * (i % 3 + 1),
                                       "category": "own"}) + "\n" for i in range(20)))
    # 3 examples per step over 2 ranks: micro-batches of 2 and 1 per step, uneven slices
    cfg = toy_cfg.model_copy(update={"train": toy_cfg.train.model_copy(update={"batch_size": 3, "local_steps": 3}),
                                     "peft": toy_cfg.peft.model_copy(update={"dropout": 0.0})})
    out = {}
    for world in (1, 2):
        c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"world_size": world})})
        spec = NodeSpec.from_node_config({"client-id": "hospital-a", "data": str(own),
                                          "state-dir": str(tmp_path / f"state{world}")})
        h = NodeHandler(c, spec)
        try:
            down = encode(Message(flatten({"adapter": get_adapter_state(h.clients["hospital-a"].rt.model)}),
                                  config={"round": 1}))
            out[world] = decode(h.handle("fit", "hospital-a", 1, down))
        finally:
            h.close()
    a, b = out[1], out[2]
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        torch.testing.assert_close(b.tensors[k], a.tensors[k], rtol=1e-4, atol=1e-5)
    assert max(a.tensors[k].abs().max().item() for k in a.tensors if "lora_B" in k) > 1e-4  # B starts at 0: it trained
    assert b.metrics["train_tokens"] == a.metrics["train_tokens"]  # counted over both ranks
    assert b.metrics["train_loss"] == pytest.approx(a.metrics["train_loss"], rel=1e-4)


# ---- the SuperNode's own policy: what a submitted run may do on the organisation's machine -------
def _node(nc=None, **kw):
    return NodeSpec.from_node_config({"client-id": "alpha", **(nc or {})})


def test_node_policy_refuses_what_the_node_did_not_allow(tmp_path, monkeypatch):
    from fedtune.flower.node import PolicyError

    monkeypatch.delenv("FEDTUNE_DATA_DIR", raising=False)
    data_dir, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data_dir / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (data_dir / "sub" / "toy.jsonl").write_text("{}\n")
    (elsewhere / "secret.jsonl").write_text("{}\n")
    (data_dir / "link.jsonl").symlink_to(elsewhere / "secret.jsonl")  # a link may not lead outside
    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    (tmp_path / "other-model").mkdir()

    def cfg(*over):
        return load_config(None, ["model.name=tiny-llama", "data.source=sub/toy.jsonl", "data.num_clients=3",
                                  *over])
    spec = _node({"data-dir": str(data_dir)})
    for over, needle in [(["model.trust_remote_code=true"], "--allow-remote-code"),
                         ([f"model.name={tmp_path / 'other-model'}"], "--model-dir"),
                         ([f"model.name={models / 'm'}"], "--model-dir"),  # no model dirs allowed yet
                         (["train.world_size=2"], "--max-world-size"),
                         ([f"data.source={elsewhere / 'secret.jsonl'}"], "--data-dir"),
                         (["data.source=../elsewhere/secret.jsonl"], "--data-dir"),
                         (["data.source=link.jsonl"], "--data-dir"),
                         (["data.source=/etc/passwd"], "--data-dir")]:
        with pytest.raises(PolicyError, match=needle):
            spec.policy.apply(cfg(*over), spec)
    # the node's own options allow them; paths the server names are replaced by the node's
    ok = _node({"data-dir": str(data_dir), "allow-remote-code": "true", "model-dirs": str(models),
                "max-world-size": "2", "cache-dir": str(tmp_path / "cache")})
    got = ok.policy.apply(cfg("model.trust_remote_code=true", f"model.name={models / 'm'}", "train.world_size=2",
                              "data.data_dir=/srv/server-chose-this", "data.cache_dir=/tmp/server-cache",
                              "model.cache_dir=/tmp/server-models"), ok)
    assert got.data.source == str((data_dir / "sub" / "toy.jsonl").resolve())
    assert got.data.data_dir == str(data_dir) and got.data.cache_dir == str(tmp_path / "cache" / "tokenized")
    assert got.model.cache_dir == str(tmp_path / "cache" / "models") and got.train.world_size == 2
    plain = _node()  # no options: built-in names and hub ids only; caches and data dir are the node's defaults
    got = plain.policy.apply(load_config(None, ["model.name=HuggingFaceTB/SmolLM2-135M", "data.preset=fed-dolly",
                                                "data.cache_dir=/tmp/x", "data.data_dir=/tmp/y"]), plain)
    assert got.data.cache_dir is None and got.data.data_dir is None and got.model.cache_dir is None
    own = _node({"data": str(elsewhere / "secret.jsonl")})  # a node with its own file ignores data.source
    assert own.policy.apply(cfg("data.source=/etc/passwd"), own).data.source == "/etc/passwd"
    with pytest.raises(Exception, match="max-world-size"):
        _node({"max-world-size": "zero"})


def test_a_refusing_node_answers_the_query_with_its_reason(toy_cfg, tmp_path, caplog):
    """Through the real ClientApp (in process and over the warm worker's socket): the refusal is
    the query's answer, before any model is loaded; the server logs it and does not wait for it."""
    import threading

    from fedtune.flower.node import PolicyError, serve_worker

    bad = json.dumps(toy_cfg.model_copy(update={"model": toy_cfg.model.model_copy(
        update={"trust_remote_code": True})}).to_dict())
    ctx = Context(run_id=1, node_id=5, node_config={"client-id": "beta", "data-dir": str(tmp_path)},
                  state=RecordDict(), run_config={"fedtune-config": bad})
    q = FMessage(RecordDict({RECORD: ConfigRecord({"payload": b""})}), 5, "query")
    q.metadata.__dict__["_message_id"] = "q"
    reply = client_app(q, ctx)
    assert "trust_remote_code" in reply.content[RECORD]["refused"]
    sock = str(tmp_path / "w.sock")
    threading.Thread(target=serve_worker, args=(sock,), kwargs={"ready_file": sock + ".ready"}, daemon=True).start()
    import time as _t
    while not os.path.exists(sock + ".ready"):
        _t.sleep(0.05)
    with pytest.raises(PolicyError, match="allow-remote-code"):
        ask_worker(sock, {"op": "describe", "config": bad, "node_config": {"client-id": "beta"}})
    g = FakeGrid()
    g.nodes = {1: echo_node(["a"]), 2: lambda m: client_app(m, ctx) if m.metadata.message_type == "query" else None}
    t = FlowerTransport(g, dcfg(), sleep=lambda s: None)
    assert t.discover()[0] == ["a"]
    assert "SuperNode 2 refuses this run" in caplog.text and "allow-remote-code" in caplog.text


def test_the_clientapp_module_imports_no_torch():
    """Flower 1.41 starts a fresh ClientApp process for every message, and with a warm worker it
    only forwards bytes: importing torch (or pydantic) there cost over a second per message."""
    code = ("import sys, fedtune.flower.client_app; "
            "print(sorted(m for m in ('torch', 'pydantic', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
