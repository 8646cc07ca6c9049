"""The interface is general, proven with small algorithms that exist only here (not shipped), each
run end to end through the real run path (tiny model, in-process transport, real bytes):

* per-client instruction shapes, and a reply shaped differently from its instruction;
* extra tensor groups both ways, and an extra message kind (a handshake before the fit);
* personal tensors that never travel (checked in the encoded bytes of every message);
* a two-pass local procedure (Ditto-like: the global adapter, then a personal one);
* a procedure with no backward pass (zeroth order, MeZO-style).
"""

import json

import pytest
import torch

from fedtune.algorithms import (ADAPTER, ALGORITHMS, GLOBAL, Algorithm, ClientResult, Group, Instruction, TensorSpec,
                                register)
from fedtune.algorithms.fedavg import FedAvg, WeightedMean
from fedtune.algorithms.fedprox import proximal_term
from fedtune.config import load_config
from fedtune.run import run

from test_e2e import _write_data


@pytest.fixture
def toy(tmp_path):
    data = _write_data(tmp_path / "toy.jsonl")
    return ["seed=3", "model.name=tiny-llama", f"data.source={data}", "data.splitter=meta", "data.num_clients=3",
            "data.label_field=category", "data.max_length=64", "data.val_fraction=0.15", "data.test_fraction=0.15",
            f"data.cache_dir={tmp_path / 'tok'}", "peft.r=4", "train.lr=0.01", "train.batch_size=2",
            "train.local_steps=2", "fl.rounds=2", "eval.every=1", "checkpoint.every=1",
            "output.tensorboard=false", "output.progress=false"]


@pytest.fixture
def registered():
    """Register test-only algorithms for one test, then forget them."""
    added = []

    def add(cls):
        register(cls)
        added.append(cls.name)
        return cls

    yield add
    for name in added:
        ALGORITHMS.pop(name, None)


def _run(toy, tmp_path, name, *extra):
    return run(load_config(None, [*toy, f"fl.algorithm={name}", f"output.dir={tmp_path / name}", *extra]),
               verbose=False)


def _client_rows(res):
    return [r for r in res.rows if r["kind"] == "client" and r.get("train_loss") is not None]


# ---- per-client shapes, a differently shaped reply, extra groups both ways ------------------------
class PerClientShapes(FedAvg):
    """Client i gets a ``probe`` of length i+1 (each its own instruction) and must answer with an
    ``echo`` of length 2(i+1) holding the probe twice: a shape its instruction does not have."""

    name = "contract_shapes"
    groups = {ADAPTER: Group(delta=True), "probe": Group(lossy=False), "echo": Group(lossy=False)}
    checked: list = []

    def configure_fit(self, ctx):
        out = {}
        for i, cid in enumerate(ctx.sampled):
            probe = {"p": torch.arange(i + 1, dtype=torch.float32) + 10 * ctx.round}
            reply = {ADAPTER: {k: TensorSpec.of(t) for k, t in self.adapter.items()},
                     "echo": {"p": TensorSpec((2 * (i + 1),))}}
            out[cid] = Instruction({ADAPTER: self.adapter, "probe": probe}, dict(ctx.config), reply=reply)
        self.sent = out
        return out

    def fold(self, ctx, acc, update):
        want = self.sent[update.cid].groups["probe"]["p"].repeat(2)
        PerClientShapes.checked.append((update.cid, torch.equal(update.groups["echo"]["p"], want)))
        super().fold(ctx, acc, update)

    def instruction_spec(self, c, kind):
        spec = {ADAPTER: c.adapter_spec()}
        return {**spec, "probe": {"p": TensorSpec((16,), variable=True)}} if kind == "fit" else spec

    def client_fit(self, c, ins):
        result = super().client_fit(c, ins)
        result.groups["echo"] = {"p": ins.groups["probe"]["p"].repeat(2)}
        return result


def test_per_client_instructions_and_differently_shaped_replies(toy, tmp_path, registered):
    registered(PerClientShapes)
    PerClientShapes.checked = []
    res = _run(toy, tmp_path, "contract_shapes", "comm.up=[int8]", "comm.down=[int8]")  # lossy: probe/echo exact
    assert len(PerClientShapes.checked) == 6 and all(ok for _, ok in PerClientShapes.checked)
    assert not any(r.get("rejected") for r in res.rows if r["kind"] == "client")
    by_client = {}
    for r in _client_rows(res):
        by_client.setdefault(r["client"], set()).add(r["bytes_down"])
    assert len({next(iter(v)) for v in by_client.values()}) == 3  # three different instructions


def test_a_reply_outside_the_declared_spec_is_rejected_and_the_round_goes_on(toy, tmp_path, registered):
    class Liar(PerClientShapes):
        name = "contract_liar"

        def client_fit(self, c, ins):
            result = super().client_fit(c, ins)
            if c.cid == "beta":
                result.groups["echo"] = {"p": torch.zeros(7)}  # not the length the server asked for
            return result

    registered(Liar)
    res = _run(toy, tmp_path, "contract_liar")
    rejected = {r["client"]: r["rejected"] for r in res.rows if r["kind"] == "client" and r.get("rejected")}
    assert set(rejected) == {"beta"} and "echo/p" in rejected["beta"]
    assert all(r["rejected"] == 1 for r in res.rows if r["kind"] == "round" and r["round"] > 0)


class Handshake(FedAvg):
    """Before each fit, an exchange of the algorithm's own kind: the server sends a nonce, the
    client returns it doubled (exactly: a lossless group)."""

    name = "contract_handshake"
    exchanges = ("hello",)
    groups = {ADAPTER: Group(delta=True), "nonce": Group(lossy=False)}
    seen: list = []

    def configure_fit(self, ctx):
        hello = {cid: Instruction({"nonce": {"x": torch.tensor([float(ctx.round), float(i)])}}, {"round": ctx.round})
                 for i, cid in enumerate(ctx.sampled)}
        for u in ctx.exchange("hello", hello):
            Handshake.seen.append(torch.equal(u.groups["nonce"]["x"], 2 * hello[u.cid].groups["nonce"]["x"]))
        return super().configure_fit(ctx)

    def instruction_spec(self, c, kind):
        return {"nonce": {"x": TensorSpec((2,))}} if kind == "hello" else super().instruction_spec(c, kind)

    def client_exchange(self, kind, c, ins):
        return ClientResult({"nonce": {"x": 2 * ins.groups["nonce"]["x"]}})


def test_an_algorithm_can_add_its_own_message_kind(toy, tmp_path, registered):
    registered(Handshake)
    Handshake.seen = []
    res = _run(toy, tmp_path, "contract_handshake", "comm.up=[int4]")
    assert Handshake.seen == [True] * 6
    fit_bytes = sum(r["bytes_down"] for r in _client_rows(res))
    assert sum(r["bytes_down"] for r in res.rows if r["kind"] == "round" and r["round"] > 0) > fit_bytes


# ---- personal tensors never travel -------------------------------------------------------------
class Personal(Algorithm):
    """FedPer-style: the ``lora_B`` tensors are personal (they stay in each client's state, start
    at 0 as LoRA's B does); only ``lora_A`` is sent and averaged."""

    name = "contract_personal"

    def init(self, setup):
        self.full = dict(setup.adapter)
        self.adapter = {k: v for k, v in setup.adapter.items() if "lora_A" in k}

    def begin(self, ctx):
        return WeightedMean()

    def fold(self, ctx, acc, update):
        acc.add(update.tensors, 1.0)

    def finish(self, ctx, acc):
        self.adapter = acc.result() or self.adapter
        return {}

    def adapters(self):
        return {GLOBAL: {**self.full, **self.adapter}}

    def instruction_spec(self, c, kind):
        return {ADAPTER: {k: s for k, s in c.adapter_spec().items() if "lora_A" in k}}

    def _load(self, c, shared):
        personal = c.state.group("personal") or {k: torch.zeros_like(p.detach().cpu()) for k, p in c.params()
                                                  if "lora_B" in k}
        c.set_adapter({**shared, **personal})

    def client_fit(self, c, ins):
        self._load(c, ins.groups[ADAPTER])
        stats = c.train()
        now = c.adapter()
        c.state.set_group("personal", {k: v for k, v in now.items() if "lora_B" in k})
        return ClientResult({ADAPTER: {k: v for k, v in now.items() if "lora_A" in k}}, c.fit_metrics(stats))

    def client_evaluate(self, c, ins):
        self._load(c, ins.groups[ADAPTER])
        return c.evaluate(list(ins.config.get("splits", ["val"])))


def test_personal_tensors_never_appear_in_any_message(toy, tmp_path, registered, monkeypatch):
    import fedtune.transport as transport

    registered(Personal)
    seen = []
    real = transport.handle_on_client

    def spy(client, kind, data):
        out = real(client, kind, data)
        seen.append((data, out))
        return out

    monkeypatch.setattr(transport, "handle_on_client", spy)
    res = _run(toy, tmp_path, "contract_personal", "comm.up=[int8,zstd]")
    assert seen and all(b"lora_B" not in down and b"lora_B" not in up for down, up in seen)
    assert any(b"lora_A" in down for down, _ in seen)  # the shared half does travel (uncompressed down)
    store = tmp_path / "contract_personal" / "checkpoints" / "round_00002" / "clients" / "alpha.safetensors"
    from safetensors.torch import load_file

    personal = {k: v for k, v in load_file(str(store)).items() if k.startswith("personal/")}
    assert personal and all("lora_B" in k for k in personal)
    assert max(v.abs().max().item() for v in personal.values()) > 0  # trained, kept, checkpointed
    assert res.final("val_loss") is not None


# ---- a two-pass local procedure -------------------------------------------------------------------
class TwoPass(FedAvg):
    """Ditto-like: train the received global adapter (sent back, averaged), then a personal adapter
    (kept in the state, never sent) with a proximal pull towards the received global, on its own
    optimizer state."""

    name = "contract_ditto"

    def client_fit(self, c, ins):
        received = ins.groups[ADAPTER]
        c.set_adapter(received)
        stats = c.train()
        global_result = c.adapter()
        c.set_adapter(c.state.group("ditto") or received)
        c.train(optimizer="opt_personal", extra_loss=proximal_term(c.params(), received, 0.1))
        c.state.set_group("ditto", c.adapter())  # the personal one stays in the model: eval_local sees it
        return ClientResult({ADAPTER: global_result}, c.fit_metrics(stats))


def test_a_two_pass_procedure(toy, tmp_path, registered):
    registered(TwoPass)
    res = _run(toy, tmp_path, "contract_ditto", "eval.local_models=true")
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "contract_ditto" / "checkpoints" / "round_00002" / "clients" / "beta.safetensors"))
    groups = {k.split("/", 1)[0] for k in state}
    assert {"opt", "opt_personal", "ditto"} <= groups  # two optimizers, a personal adapter
    saved = load_file(str(tmp_path / "contract_ditto" / "adapter" / "adapter_model.safetensors"))
    personal = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("ditto/")}
    b_key = next(k for k in personal if "lora_B" in k)
    assert not torch.equal(personal[b_key], saved[b_key.replace(".default", "")])
    assert all(r.get("local_val_loss") is not None for r in res.rows if r["kind"] == "client"
               and r.get("train_loss") is not None and r["round"] == 2)


# ---- no backward pass --------------------------------------------------------------------------
class ZeroOrder(FedAvg):
    """MeZO-style (Malladi et al. 2023): per step, a seeded direction z, two forward passes at
    w ± εz, w ← w − lr·g·z with g = (L₊ − L₋)/2ε. No gradient is ever computed."""

    name = "contract_zo"

    def client_fit(self, c, ins):
        c.set_adapter(ins.groups[ADAPTER])
        eps, lr = 1e-3, 1e-2
        params = [p for _, p in c.params()]
        losses = []
        for step in range(c.steps()):
            batch = c.next_batch()
            gen = torch.Generator().manual_seed(1000 * c.round + step)
            z = [torch.randn(p.shape, generator=gen) for p in params]
            with torch.no_grad():
                for p, d in zip(params, z):
                    p.add_(eps * d)
                plus = c.loss(batch)
                for p, d in zip(params, z):
                    p.sub_(2 * eps * d)
                minus = c.loss(batch)
                g = (plus - minus) / (2 * eps)
                for p, d in zip(params, z):
                    p.add_(eps * d - lr * g * d)
            losses.append((plus + minus) / 2)
        return ClientResult({ADAPTER: c.adapter()}, {"zo_loss": sum(losses) / len(losses), "steps": len(losses)})


def test_a_procedure_without_backward(toy, tmp_path, registered, monkeypatch):
    registered(ZeroOrder)

    def no_backward(*a, **k):
        raise AssertionError("a zeroth-order procedure ran a backward pass")

    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "backward", no_backward)
    res = _run(toy, tmp_path, "contract_zo")
    rows = [r for r in res.rows if r["kind"] == "client" and r.get("zo_loss") is not None]
    assert len(rows) == 6 and all(r["steps"] == 2 for r in rows)
    rounds = [r for r in res.rows if r["kind"] == "round"]
    assert rounds[-1].get("zo_loss") is not None  # an algorithm's own metric reaches the round row
    a = json.loads((tmp_path / "contract_zo" / "adapter" / "fedtune_adapter.json").read_text())
    assert a["round"] == 2
