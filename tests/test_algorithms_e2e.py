"""Every registered algorithm through the real run path on a small federation (6 clients, a tiny
model): it runs from the config with its default options, and a run killed in its last round and
resumed ends bit for bit on the same adapter(s) as an uninterrupted one (server state such as
moments, momentum and control variates, and client state such as SCAFFOLD's variates, survive).
Plus FedProx and SCAFFOLD's client procedures on a tiny model against independent computations."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune.algorithms import ALGORITHMS
from fedtune.config import load_config
from fedtune.run import run

from test_e2e import crash_then_resume

WORDS = ("apple", "banana", "cherry", "damson", "elder", "fig")


def _data(path, n=8):
    rows = [{"instruction": f"Say {w} {i} times", "input": "", "output": " ".join([w] * (1 + i % 4)),
             "category": f"c{j}"} for j, w in enumerate(WORDS) for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("six")
    data = _data(tmp / "six.jsonl")
    return ["seed=7", "model.name=tiny-llama", f"data.source={data}", "data.splitter=meta", "data.num_clients=6",
            "data.label_field=category", "data.max_length=48", "data.val_fraction=0.15", "data.test_fraction=0.1",
            f"data.cache_dir={tmp / 'tok'}", "peft.r=2", "train.lr=0.02", "train.batch_size=2", "train.local_steps=2",
            "fl.rounds=2", "eval.every=0", "checkpoint.every=1", "output.tensorboard=false", "output.progress=false"]


def _adapters(run_dir):
    """Every saved adapter of a run (the global one, or one per client)."""
    out = {}
    for f in sorted(run_dir.glob("adapter*/**/adapter_model.safetensors")):
        out[str(f.relative_to(run_dir))] = load_file(str(f))
    return out


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_and_resumes_bit_for_bit(six, tmp_path, monkeypatch, name):
    cfg = [*six, f"fl.algorithm={name}"]
    straight = run(load_config(None, [*cfg, f"output.dir={tmp_path / 's'}"]), verbose=False)
    rounds = [r for r in straight.rows if r["kind"] == "round" and r["round"] > 0]
    assert len(rounds) == 2 and all(r["rejected"] == 0 and r["clients"] == 6 for r in rounds)
    assert straight.final("val_loss") is not None

    resumed = crash_then_resume(monkeypatch, load_config(None, [*cfg, f"output.dir={tmp_path / 'c'}"]),
                                tmp_path / "c", 2)
    a, b = _adapters(straight.run_dir), _adapters(resumed.run_dir)
    assert a and a.keys() == b.keys()
    for path in a:
        assert all(torch.equal(a[path][k], b[path][k]) for k in a[path]), (name, path)
    # the adapter really moved away from its initialisation (LoRA B starts at 0)
    assert any(t.abs().max() > 0 for f in a.values() for k, t in f.items() if "lora_B" in k)


def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit(six, tmp_path):
    avg = run(load_config(None, [*six, "fl.algorithm=fedavg", f"output.dir={tmp_path / 'a'}"]), verbose=False)
    prox = run(load_config(None, [*six, "fl.algorithm=fedprox", "fl.options.mu=0", f"output.dir={tmp_path / 'p'}"]),
               verbose=False)
    a, p = _adapters(avg.run_dir), _adapters(prox.run_dir)
    assert all(torch.equal(a[f][k], p[f][k]) for f in a for k in a[f])


# ---- the client procedures on a tiny model --------------------------------------------------------
@pytest.fixture
def client(tmp_path):
    """One FedClient over tiny-llama + LoRA, with its own data and a fresh state store."""

    def make(algorithm, options=None, overrides=()):
        from fedtune.algorithms import get_algorithm
        from fedtune.client import ClientRuntime, FedClient
        from fedtune.run import build_adapter_model, load_client_data
        from fedtune.state import ClientStateStore

        data = _data(tmp_path / "d.jsonl")
        cfg = load_config(None, ["model.name=tiny-llama", f"data.source={data}", "data.splitter=iid",
                                 "data.num_clients=1", "data.max_length=48", f"data.cache_dir={tmp_path / 'tok'}",
                                 "peft.r=2", "peft.dropout=0", "train.local_steps=3", "train.batch_size=2",
                                 "fl.rounds=1", *overrides])
        am = build_adapter_model(cfg)
        tok = load_client_data(cfg, am.tokenizer)
        rt = ClientRuntime(model=am.model, pad_id=am.tokenizer.pad_token_id, cfg=cfg, device=am.device,
                           algorithm=get_algorithm(algorithm, options), store=ClientStateStore(None))
        (cid,) = tok
        return FedClient(cid, rt, **tok[cid]), am.init

    return make


def _fit(client, groups):
    from fedtune.messages import Message, decode, encode
    from fedtune.payload import flatten, unflatten

    reply = decode(encode(client.fit(Message(flatten(groups), config={"round": 1}))))
    return unflatten(reply.tensors)


def _dist(a, b):
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


def test_fedprox_pulls_the_local_adapter_towards_the_received_one(client):
    from fedtune.algorithms.fedprox import proximal_term

    moved = {}
    for mu in (0.0, 1.5):  # lr * mu < 2: the pull is a contraction, not a divergence
        c, init = client("fedprox", {"mu": mu}, ["train.optimizer=sgd", "train.lr=0.5", "train.max_grad_norm=null"])
        x = {k: v + 0.05 for k, v in init.items()}  # a received adapter away from the optimum
        y = _fit(c, {"adapter": x})["adapter"]
        moved[mu] = _dist(y, x)
    assert 0 < moved[1.5] < 0.5 * moved[0.0]
    # the term's gradient is mu * (w - x), over the adapter tensors only
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    term = proximal_term([("w", w)], {"w": torch.tensor([0.5, 0.5])}, mu=0.3)
    term(None).backward()
    assert torch.allclose(w.grad, 0.3 * torch.tensor([0.5, -2.5]))


def test_scaffold_client_variate_equals_option_ii_under_plain_sgd(client):
    """Under SGD with a constant learning rate and no clipping, the mean of the raw gradients seen
    equals the paper's option II, c_i - c + (x - y_i) / (K * lr): an independent formula."""
    from fedtune.state import ClientState

    lr, k = 0.05, 3
    c, init = client("scaffold", None, ["train.optimizer=sgd", f"train.lr={lr}", "train.max_grad_norm=null",
                                        f"train.local_steps={k}"])
    gen = torch.Generator().manual_seed(0)
    server_c = {n: 0.01 * torch.randn(v.shape, generator=gen) for n, v in init.items()}
    own = {n: 0.02 * torch.randn(v.shape, generator=gen) for n, v in init.items()}
    state = ClientState()
    state.set_group("scaffold", own)
    c.rt.store.put(c.cid, state)
    reply = _fit(c, {"adapter": init, "control": server_c})
    y, delta = reply["adapter"], reply["control"]
    for n in init:
        option_ii = own[n] - server_c[n] + (init[n] - y[n]) / (k * lr)
        torch.testing.assert_close(own[n] + delta[n], option_ii, rtol=1e-3, atol=1e-5)
    stored = c.rt.store.get(c.cid).group("scaffold")  # the new variate is kept for the next round
    assert all(torch.allclose(stored[n], own[n] + delta[n]) for n in init)
