"""The algorithm zoo against hand-worked fixtures, Flower's strategies as an independent oracle, a
Byzantine client, and contracts every registered algorithm must keep (fixed point, state round
trip, options)."""

import math

import numpy as np
import pytest
import torch

from fedtune.algorithms import (ADAPTER, ALGORITHMS, GLOBAL, Instruction, RoundContext, Setup, Update, get_algorithm,
                                parse_options)
from fedtune.errors import FedtuneError

CIDS = ["a", "b", "c", "d", "e", "f"]


def _setup(adapter, clients=CIDS, per_round=None):
    return Setup(list(clients), {c: 10 for c in clients}, 10, per_round or len(clients), adapter)


def _ctx(rnd=1, sampled=CIDS, clients=CIDS):
    return RoundContext(round=rnd, rounds=10, sampled=list(sampled), clients=list(clients),
                        num_train={c: 10 for c in clients}, config={"round": rnd}, eval_clients=list(clients))


def _round(alg, values, rnd=1, sizes=None, extra=None):
    """One server round with client adapters ``values`` ({cid: {name: tensor}}); the new global."""
    ctx = _ctx(rnd, sampled=list(values))
    acc = alg.begin(ctx)
    for cid, tensors in values.items():
        groups = {ADAPTER: tensors, **((extra or {}).get(cid, {}))}
        alg.fold(ctx, acc, Update(cid, groups, (sizes or {}).get(cid, 10)))
    metrics = alg.finish(ctx, acc)
    return alg.adapters()[GLOBAL], metrics


def _scalar_clients(points, name="w"):
    return {CIDS[i] if i < len(CIDS) else f"z{i}": {name: torch.tensor([float(p)])} for i, p in enumerate(points)}


def _alg(name, x0=1.0, clients=CIDS, **options):
    alg = get_algorithm(name, options)
    alg.init(_setup({"w": torch.tensor([x0])}, clients))
    return alg


# ---- FedAvg and the one weighting rule ---------------------------------------------------------
def _ups():
    return {"b": {"w": torch.tensor([4.0, 0.0])}, "a": {"w": torch.tensor([1.0, 2.0])}}


def test_fedavg_sample_weighted_by_hand():
    alg = get_algorithm("fedavg")
    alg.init(_setup({"w": torch.zeros(2)}))
    out, _ = _round(alg, _ups(), sizes={"a": 10, "b": 30})
    # (10*[1,2] + 30*[4,0]) / 40 = [3.25, 0.5]
    assert torch.allclose(out["w"], torch.tensor([3.25, 0.5]))


def test_fedavg_uniform_by_hand():
    alg = get_algorithm("fedavg", weighting="uniform")
    alg.init(_setup({"w": torch.zeros(2)}))
    out, _ = _round(alg, _ups(), sizes={"a": 10, "b": 30})
    assert torch.allclose(out["w"], torch.tensor([2.5, 1.0]))


def test_zero_weights_keep_the_global_adapter_and_uniform_still_averages():
    # the one rule: weight 0 contributes nothing; a round whose weights sum to 0 changes nothing
    g = {"w": torch.tensor([7.0, 7.0])}
    alg = get_algorithm("fedavg")
    alg.init(_setup(g))
    out, _ = _round(alg, _ups(), sizes={"a": 0, "b": 0})
    assert torch.equal(out["w"], g["w"])
    out, _ = _round(alg, _ups(), sizes={"a": 0, "b": 30})  # only b counts
    assert torch.equal(out["w"], torch.tensor([4.0, 0.0]))
    uni = get_algorithm("fedavg", weighting="uniform")
    uni.init(_setup(g))
    out, _ = _round(uni, _ups(), sizes={"a": 0, "b": 0})
    assert torch.allclose(out["w"], torch.tensor([2.5, 1.0]))


def test_fedavg_order_independent_bitwise():
    ups = {str(i): {"w": torch.randn(1000, generator=torch.Generator().manual_seed(i))} for i in range(7)}
    outs = []
    for order in (list(ups), list(reversed(ups))):
        alg = get_algorithm("fedavg")
        alg.init(_setup({"w": torch.zeros(1000)}, list(ups)))
        ctx = _ctx(sampled=list(ups), clients=list(ups))
        acc = alg.begin(ctx)
        for cid in sorted(ups):  # the server folds in the sampled order whatever the arrival order
            alg.fold(ctx, acc, Update(cid, {ADAPTER: ups[cid]}, int(cid) + 1))
        alg.finish(ctx, acc)
        outs.append(alg.adapter["w"])
    assert torch.equal(*outs)


def test_nobody_answering_keeps_the_global_for_every_algorithm():
    for name in sorted(ALGORITHMS):
        alg = get_algorithm(name)
        alg.init(_setup({"w": torch.ones(2)}))
        before = {k: {n: t.clone() for n, t in v.items()} for k, v in alg.adapters().items()}
        ctx = _ctx()
        alg.finish(ctx, alg.begin(ctx))
        for k, v in alg.adapters().items():
            assert all(torch.equal(v[n], before[k][n]) for n in v), name


# ---- server optimizers: hand values (shared/reference/federated-algorithms.md §10) ----------------
def test_fedavgm_by_hand():
    # x0 = 1; clients average 0.7 then 0.5; eta = 1, beta = 0.9: g = 0.3, v = 0.3, x1 = 0.7;
    # g = 0.2, v = 0.9*0.3 + 0.2 = 0.47, x2 = 0.7 - 0.47 = 0.23
    alg = _alg("fedavgm", server_lr=1.0, momentum=0.9)
    x1, _ = _round(alg, _scalar_clients([0.6, 0.8]))
    assert x1["w"].item() == pytest.approx(0.7, abs=1e-6)
    x2, _ = _round(alg, _scalar_clients([0.4, 0.6]), rnd=2)
    assert x2["w"].item() == pytest.approx(0.23, abs=1e-6)


@pytest.mark.parametrize("name,convention,beta1,want", [
    ("fedadam", "reddi", 0.9, 0.903277), ("fedadam", "flower", 0.9, 0.928149),
    ("fedyogi", "reddi", 0.9, 0.903278), ("fedadagrad", "reddi", 0.0, 0.900333),
])
def test_fedopt_first_round_by_hand(name, convention, beta1, want):
    # x = 1.0, delta = -0.3, eta = 0.1, beta = (0.9, 0.99), tau = 1e-3
    alg = _alg(name, server_lr=0.1, beta1=beta1, beta2=0.99, tau=1e-3, convention=convention)
    x1, _ = _round(alg, _scalar_clients([0.7, 0.7]))
    assert x1["w"].item() == pytest.approx(want, abs=2e-6)


def test_fedadam_reddi_by_formula_over_three_rounds():
    # independent replay of Reddi et al. Algorithm 2 in plain Python floats
    x, m, v = 1.0, 0.0, 1e-6
    alg = _alg("fedadam", server_lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
    for rnd, target in enumerate([0.8, 0.95, 0.7], start=1):
        d = target - x
        m = 0.9 * m + 0.1 * d
        v = 0.99 * v + 0.01 * d * d
        x = x + 0.05 * m / (math.sqrt(v) + 1e-3)
        out, _ = _round(alg, _scalar_clients([target, target]), rnd=rnd)
        assert out["w"].item() == pytest.approx(x, abs=1e-6)


# ---- robust rules: hand values -------------------------------------------------------------------
def test_median_and_trimmed_mean_by_hand():
    pts = [1, 2, 10, 3, 100]
    assert _round(_alg("trimmed_mean", beta=0.2), _scalar_clients(pts))[0]["w"].item() == pytest.approx(5.0)
    assert _round(_alg("median"), _scalar_clients(pts))[0]["w"].item() == pytest.approx(3.0)
    # an even count takes the mean of the two middle values (numpy's median), not the lower one
    assert _round(_alg("median"), _scalar_clients([1, 2, 10, 3]))[0]["w"].item() == pytest.approx(2.5)


def test_krum_and_multi_krum_by_hand():
    # f = 1, points [0, 0.1, 0.2, 5, 10]: scores [0.05, 0.02, 0.05, 47.05, 121.04]
    from fedtune.algorithms.krum import krum_scores

    ups = [Update(c, {ADAPTER: t}, 10) for c, t in _scalar_clients([0, 0.1, 0.2, 5, 10]).items()]
    assert krum_scores(ups, 1).tolist() == pytest.approx([0.05, 0.02, 0.05, 47.05, 121.04])
    assert _round(_alg("krum", f=1), _scalar_clients([0, 0.1, 0.2, 5, 10]))[0]["w"].item() == pytest.approx(0.1)
    # multi-krum keeps the m = 3 best (0.1, then 0 and 0.2 tied): their mean is 0.1
    out, _ = _round(_alg("multi_krum", f=1, m=3), _scalar_clients([0, 0.1, 0.2, 5, 10]))
    assert out["w"].item() == pytest.approx(0.1)


def test_norm_bounding_by_hand():
    # x = 0; changes [3, 4] (norm 5), [0.6, 0.8] (norm 1), [0, 0]; bound 1 (also the median norm):
    # clipped [0.6, 0.8], [0.6, 0.8], [0, 0]: mean [0.4, 0.5333]
    want = torch.tensor([0.4, 1.6 / 3])
    for opts in ({"max_norm": 1.0}, {}):
        alg = get_algorithm("norm_bounding", opts)
        alg.init(_setup({"w": torch.zeros(2)}))
        out, m = _round(alg, {"a": {"w": torch.tensor([3.0, 4.0])}, "b": {"w": torch.tensor([0.6, 0.8])},
                              "c": {"w": torch.zeros(2)}})
        assert torch.allclose(out["w"], want, atol=1e-6) and m["norm_bound"] == pytest.approx(1.0)


def test_krum_refuses_too_few_clients_before_the_run():
    with pytest.raises(FedtuneError, match=r"more than 2f \+ 2 = 4 clients per round, but 4 are sampled"):
        get_algorithm("krum").check(_setup({"w": torch.zeros(1)}, CIDS[:4]))
    get_algorithm("krum").check(_setup({"w": torch.zeros(1)}, CIDS[:5]))  # 5 > 4
    with pytest.raises(FedtuneError, match="more than 2f"):  # sampling 4 of 6 is not enough either
        get_algorithm("multi_krum", {"f": 1}).check(_setup({"w": torch.zeros(1)}, CIDS, per_round=4))
    with pytest.raises(FedtuneError, match="fl.options.m=9"):
        get_algorithm("multi_krum", {"m": 9}).check(_setup({"w": torch.zeros(1)}, CIDS))


def test_a_byzantine_client_drags_fedavg_but_not_the_robust_rules():
    """1 of 5 clients sends a scaled, sign-flipped update and claims a huge training set."""
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(64)
    honest_dir = torch.randn(64, generator=gen)
    values = {c: {"w": x + honest_dir + 0.1 * torch.randn(64, generator=gen)} for c in "abcd"}
    values["e"] = {"w": x - 50.0 * honest_dir}
    sizes = {c: 100 for c in "abcd"} | {"e": 10**9}
    honest = torch.stack([v["w"] for c, v in values.items() if c != "e"]).mean(0)
    five = list("abcde")

    def err(name, **o):
        alg = get_algorithm(name, o)
        alg.init(_setup({"w": x.clone()}, five))
        out, _ = _round(alg, values, sizes=sizes)
        return (out["w"] - honest).norm().item() / honest.norm().item()

    assert err("fedavg") > 10  # dragged to the attacker (its claimed size buys all the weight)
    for name in ("median", "trimmed_mean", "krum", "multi_krum"):
        assert err(name) < 0.3, name
    # norm bounding only bounds the attacker's pull: clipped to the median norm M (about the honest
    # change's), its vote moves the mean of 5 by at most 2M/5 (a relative error of about 0.4)
    assert err("norm_bounding") < 0.45


# ---- Flower's strategies as an oracle on the same arrays -------------------------------------------
def _flower_round(strategy, current, values, rnd):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # as flwr-serverapp sets it
    replies = []
    for i, (cid, t) in enumerate(values.items()):
        content = RecordDict({"arrays": ArrayRecord({"w": Array(t["w"].double().numpy())}),
                              "metrics": MetricRecord({"num-examples": 10})})
        msg = Message(RecordDict(), dst_node_id=i + 1, message_type="train")
        msg.metadata.__dict__["_message_id"] = f"m{i}"
        replies.append(Message(content, reply_to=msg))
    if hasattr(strategy, "momentum_vector") or hasattr(strategy, "m_t"):
        strategy.current_arrays = (ArrayRecord({"w": Array(current.double().numpy())})
                                   if hasattr(strategy, "momentum_vector") else {"w": current.double().numpy()})
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return torch.from_numpy(np.asarray(arrays["w"].numpy()))


@pytest.mark.parametrize("ours,theirs", [
    (("fedavgm", {"server_lr": 0.7, "momentum": 0.9}), ("FedAvgM", {"server_learning_rate": 0.7, "server_momentum": 0.9})),
    (("fedadam", {"server_lr": 0.1, "convention": "flower"}), ("FedAdam", {"eta": 0.1})),
    (("fedyogi", {"server_lr": 0.1, "convention": "flower"}), ("FedYogi", {"eta": 0.1})),
    (("fedadagrad", {"server_lr": 0.1, "convention": "flower"}), ("FedAdagrad", {"eta": 0.1})),
    (("median", {}), ("FedMedian", {})),
    (("trimmed_mean", {"beta": 0.2}), ("FedTrimmedAvg", {"beta": 0.2})),
    (("krum", {"f": 1}), ("Krum", {"num_malicious_nodes": 1})),
    (("multi_krum", {"f": 1, "m": 3}), ("MultiKrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 3})),
])
def test_flower_strategies_agree_over_three_rounds(ours, theirs):
    """Flower 1.41's strategies are an independent implementation of the same rules (equal client
    sizes, so the size weighting Flower's Multi-Krum applies and ours ignores coincide)."""
    import flwr.serverapp.strategy as fs

    name, opts = ours
    strategy = getattr(fs, theirs[0])(**theirs[1])
    gen = torch.Generator().manual_seed(3)
    alg = get_algorithm(name, opts)
    x = torch.randn(40, generator=gen)
    alg.init(_setup({"w": x.clone()}))
    flower_x = x.double()
    for rnd in (1, 2, 3):
        values = {c: {"w": alg.adapter["w"] + 0.3 * torch.randn(40, generator=gen)} for c in CIDS}
        values["f"] = {"w": alg.adapter["w"] + 5.0 * torch.randn(40, generator=gen)}  # an outlier
        ours_x, _ = _round(alg, values, rnd=rnd)
        flower_x = _flower_round(strategy, flower_x, values, rnd)
        assert torch.allclose(ours_x["w"].double(), flower_x, atol=1e-5, rtol=1e-5), (name, rnd)
        flower_x = ours_x["w"].double()  # both go on from the same point (our float32 master)


# ---- SCAFFOLD's server rule ---------------------------------------------------------------------
def test_scaffold_server_by_hand():
    # N = 4 clients, 2 sampled; c = 0; delta c: a [1, 2], b [3, -2]: c = (1+3)/4, (2-2)/4 = [1, 0]
    alg = get_algorithm("scaffold", {"server_lr": 0.5})
    four = CIDS[:4]
    alg.init(_setup({"w": torch.zeros(2)}, four))
    ctx = _ctx(sampled=["a", "b"], clients=four)
    ins = alg.configure_fit(ctx)
    assert set(ins["a"].groups) == {"adapter", "control"} and torch.equal(ins["a"].groups["control"]["w"], torch.zeros(2))
    acc = alg.begin(ctx)
    alg.fold(ctx, acc, Update("a", {ADAPTER: {"w": torch.tensor([2.0, 0.0])}, "control": {"w": torch.tensor([1.0, 2.0])}}, 10))
    alg.fold(ctx, acc, Update("b", {ADAPTER: {"w": torch.tensor([0.0, 4.0])}, "control": {"w": torch.tensor([3.0, -2.0])}}, 30))
    alg.finish(ctx, acc)
    assert torch.allclose(alg.control["w"], torch.tensor([1.0, 0.0]))
    # x = 0 + 0.5 * ((10*[2,0] + 30*[0,4]) / 40 - 0) = 0.5 * [0.5, 3] = [0.25, 1.5]
    assert torch.allclose(alg.adapter["w"], torch.tensor([0.25, 1.5]))


# ---- contracts over every registered algorithm ---------------------------------------------------
def _echo_round(alg, rnd, sampled, noise=0.0, gen=None):
    """Clients that return what they were sent (plus ``noise``); ``update`` groups come back as 0."""
    ctx = _ctx(rnd, sampled=sampled)
    instructions = alg.configure_fit(ctx)
    acc = alg.begin(ctx)
    for cid in sampled:
        groups = {}
        for g, tensors in instructions[cid].groups.items():
            upd = alg.groups.get(g) is not None and alg.groups[g].update
            groups[g] = {k: (torch.zeros_like(t) if upd else t.clone()) + (noise * torch.randn(t.shape, generator=gen)
                                                                            if noise else 0) for k, t in tensors.items()}
        alg.fold(ctx, acc, Update(cid, groups, 10 + len(cid)))
    return alg.finish(ctx, acc)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_contract_clients_that_change_nothing_leave_the_adapter(name):
    alg = get_algorithm(name)
    init = {"w": torch.randn(3, 3), "v": torch.randn(4)}
    alg.init(_setup(init))
    _echo_round(alg, 1, CIDS)
    for key, adapter in alg.adapters().items():
        assert all(torch.allclose(adapter[k], init[k], atol=1e-6) for k in init), (name, key)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_contract_state_dict_round_trip_continues_bit_for_bit(name):
    """Every piece of server state is in state_dict: a fresh instance loaded from it goes on exactly
    as the original does (moments, momentum, control variates, per-client adapters)."""
    from fedtune.checkpoint import _pack, _unpack

    def make():
        a = get_algorithm(name)
        a.init(_setup({"w": torch.zeros(5), "v": torch.zeros(2, 2)}))
        return a

    alg = make()
    gen = torch.Generator().manual_seed(1)
    _echo_round(alg, 1, CIDS, noise=0.1, gen=gen)
    tensors, meta = alg.state_dict()
    flat, groups = _pack(tensors)
    restored = make()
    restored.load_state_dict(_unpack(flat, groups), meta)
    for a in (alg, restored):
        _echo_round(a, 2, CIDS[:5], noise=0.1, gen=torch.Generator().manual_seed(2))
    for key, adapter in alg.adapters().items():
        other = restored.adapters()[key]
        assert all(torch.equal(adapter[k], other[k]) for k in adapter), (name, key)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_contract_options_are_typed_and_unknown_keys_rejected(name):
    cls = ALGORITHMS[name]
    fields = list(cls.Options.model_fields)
    with pytest.raises(FedtuneError, match=f"unknown option 'fl.options.nonsense_key' for {name}"):
        parse_options(name, {"nonsense_key": 1})
    if fields:  # a misspelt option gets the right suggestion
        with pytest.raises(FedtuneError, match=f"did you mean '{fields[0]}'"):
            parse_options(name, {fields[0] + "x": 1})


def test_option_values_are_checked():
    with pytest.raises(FedtuneError, match=r"fl.options.mu \(fedprox\): Input should be greater than or equal to 0"):
        parse_options("fedprox", {"mu": -1})
    with pytest.raises(FedtuneError, match="fl.options.beta"):
        parse_options("trimmed_mean", {"beta": 0.5})
    with pytest.raises(FedtuneError, match="fl.options.convention"):
        parse_options("fedadam", {"convention": "openfedllm"})
    assert parse_options("fedprox", {"mu": 0.5}).mu == 0.5


def test_unknown_algorithm():
    with pytest.raises(FedtuneError, match="did you mean 'fedavg'"):
        get_algorithm("fedavgg")


def test_every_algorithm_module_names_its_paper_and_rule():
    import importlib

    for name, cls in ALGORITHMS.items():
        doc = importlib.import_module(cls.__module__).__doc__ or ""
        assert any(src in doc for src in ("arxiv.org", "papers.nips.cc", "FS-LLM")), name
        assert "rule" in doc.lower() and "Options" in doc, name


def test_the_round_loop_has_no_algorithm_or_scenario_branches():
    import inspect
    import io
    import tokenize

    import fedtune.server as server

    names = {t.string for t in tokenize.generate_tokens(io.StringIO(inspect.getsource(server)).readline)
             if t.type == tokenize.NAME}
    assert not names & {"scenario", "local", "fedavg", "scaffold", "fedprox", "krum", "median", "GLOBAL_ONLY"}


def test_the_worked_example_in_the_architecture_doc_runs_and_is_right():
    """docs/architecture.md's example algorithm, executed from the doc itself: FedNova-lite with
    x = 0, clients (y=[2], 1 step, 10 examples) and (y=[4], 3 steps, 30 examples):
    tau_eff = (10*1 + 30*3)/40 = 2.5; normalised mean = (10*2/1 + 30*4/3)/40 = 1.5; x = 2.5 * 1.5."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    try:
        exec(compile(code, "architecture.md", "exec"), {"__name__": "fednova_lite_doc"})
        alg = get_algorithm("fednova_lite")
        alg.init(_setup({"w": torch.zeros(1)}, ["a", "b"]))
        ctx = _ctx(sampled=["a", "b"], clients=["a", "b"])
        acc = alg.begin(ctx)
        alg.fold(ctx, acc, Update("a", {ADAPTER: {"w": torch.tensor([2.0])}}, 10, {"steps": 1}))
        alg.fold(ctx, acc, Update("b", {ADAPTER: {"w": torch.tensor([4.0])}}, 30, {"steps": 3}))
        alg.finish(ctx, acc)
        assert alg.adapter["w"].item() == pytest.approx(3.75)
    finally:
        ALGORITHMS.pop("fednova_lite", None)


# ---- the round loop against a fake transport -------------------------------------------------------
class _FakeTransport:
    """Answers each instruction with a scripted reply through the real parser; records what it sent."""

    def __init__(self, answer):
        self.answer, self.sent = answer, []

    def send(self, kind, instructions, *, expect=None, on_reply=None):
        from fedtune.messages import decode, encode
        from fedtune.transport import parse_reply

        out = []
        for cid, msg in instructions.items():
            down = encode(msg)
            self.sent.append((kind, cid, decode(down), (expect or {}).get(cid)))
            r = parse_reply(cid, kind, encode(self.answer(kind, cid, decode(down))), bytes_down=len(down),
                            seconds=0.0, expect=(expect or {}).get(cid))
            out.append(r)
            if on_reply is not None:
                on_reply(r)
        return out


def test_the_round_loop_with_a_fake_transport(tmp_path):
    """configure → exchange → fold (in the sampled order) → finish → evaluate → log → checkpoint,
    with per-client instructions, one reply outside its spec (rejected, the round goes on), and a
    metric nobody whitelisted (logged)."""
    from fedtune.config import load_config
    from fedtune.messages import Message
    from fedtune.metrics import MetricsLogger
    from fedtune.server import Server
    from fedtune.state import ClientStateStore

    folded = []

    class Spy(get_algorithm("fedavg").__class__):
        name = "spy"

        def configure_fit(self, ctx):
            return {cid: Instruction({ADAPTER: {"w": self.adapter["w"] + i}}, dict(ctx.config))
                    for i, cid in enumerate(ctx.sampled)}

        def fold(self, ctx, acc, update):
            folded.append(update.cid)
            super().fold(ctx, acc, update)

    def answer(kind, cid, msg):
        if kind == "evaluate":
            return Message(metrics={"val_loss_sum": 6.0 if cid == "a" else 2.0, "val_tokens": 3 if cid == "a" else 1})
        w = msg.tensors["adapter/w"]
        if cid == "c":
            return Message({"adapter/w": torch.zeros(3)}, metrics={"train_loss": 1.0})  # wrong shape
        return Message({"adapter/w": w + 1}, metrics={"train_loss": 2.0, "train_label_tokens": 4, "wobble": 0.5})

    cfg = load_config(None, ["fl.rounds=1", "eval.splits=[val]", "checkpoint.every=1", "output.tensorboard=false",
                             "output.progress=false"])
    alg = Spy()
    alg.init(_setup({"w": torch.zeros(2)}, ["a", "b", "c"]))
    transport = _FakeTransport(answer)
    saved = []
    server = Server(cfg=cfg, algorithm=alg, transport=transport, train_clients=["a", "b", "c"],
                    eval_clients=["a", "b"], num_train={"a": 1, "b": 3, "c": 5}, store=ClientStateStore(None),
                    logger=MetricsLogger(tmp_path, tensorboard=False), run_dir=tmp_path,
                    save_adapters=lambda rnd, adapters, final: saved.append((rnd, final, adapters)))
    row = server.run_round(1)
    fits = [(cid, m.tensors["adapter/w"].tolist()) for kind, cid, m, _ in transport.sent if kind == "fit"]
    assert fits == [("a", [0.0, 0.0]), ("b", [1.0, 1.0]), ("c", [2.0, 2.0])]  # per-client instructions
    assert folded == ["a", "b"]  # c's reply had the wrong shape: rejected before the fold
    # FedAvg of a's [1, 1] (weight 1) and b's [2, 2] (weight 3) = [1.75, 1.75]
    assert torch.allclose(alg.adapter["w"], torch.tensor([1.75, 1.75]))
    assert row["rejected"] == 1 and row["val_loss"] == pytest.approx(8.0 / 4)  # pooled over tokens
    assert row["val_loss_mean_of_clients"] == pytest.approx((2.0 + 2.0) / 2)
    assert row["wobble"] == 0.5 and row["server_step_norm"] == pytest.approx(1.75 * 2 ** 0.5)
    rows = [__import__("json").loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    by = {r.get("client"): r for r in rows if r["kind"] == "client"}
    assert by["a"]["wobble"] == 0.5 and "adapter/w" in by["c"]["rejected"]
    assert saved and saved[0][:2] == (1, True) and (tmp_path / "checkpoints" / "latest").is_file()
    evals = [cid for kind, cid, _, _ in transport.sent if kind == "evaluate"]
    assert evals == ["a", "b"]
