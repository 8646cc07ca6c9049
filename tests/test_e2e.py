"""End-to-end: a few rounds on a tiny random model, through the real run path and the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.run import run
from fedtune.server import Server


def _write_data(path, n_per_cat=14):
    rows = []
    for cat, word in (("alpha", "apple"), ("beta", "banana"), ("gamma", "cherry")):
        for i in range(n_per_cat):
            rows.append({"instruction": f"Say {word} {i} times", "input": "" if i % 2 else f"n={i}",
                         "output": " ".join([word] * (1 + i % 5)), "category": cat})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def cfg_file(tmp_path):
    data = _write_data(tmp_path / "toy.jsonl")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
seed: 3
model: {{name: tiny-llama}}
data: {{source: {data}, splitter: meta, num_clients: 3, label_field: category, max_length: 64,
        val_fraction: 0.15, test_fraction: 0.15, cache_dir: {tmp_path / 'tok'}}}
peft: {{method: lora, r: 4}}
train: {{lr: 0.01, batch_size: 2, local_steps: 3, scheduler: linear, warmup_steps: 1}}
fl: {{rounds: 2}}
eval: {{every: 1}}
checkpoint: {{every: 1}}
output: {{tensorboard: true, progress: false}}
""")
    return cfg


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_fed_run_end_to_end(cfg_file, tmp_path):
    cfg = load_config(cfg_file, [f"output.dir={tmp_path / 'run'}"])
    res = run(cfg, verbose=False)
    d = res.run_dir
    # metrics: per client and per round, for rounds 0..2
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    clients = {r["client"] for r in rows if r["kind"] == "client"}
    assert clients == {"alpha", "beta", "gamma"}
    r2 = rounds[-1]
    for key in ("train_loss", "val_loss", "test_loss", "val_ppl", "bytes_up", "bytes_down", "peak_rss_mb",
                "tokens_per_s"):
        assert r2[key] is not None, key
    assert r2["val_loss"] < rounds[0]["val_loss"]  # learning happened
    # bytes: the exact size of the serialised adapter, 3 clients each way
    c2 = [r for r in rows if r["kind"] == "client" and r["round"] == 2]
    assert len({c["bytes_down"] for c in c2}) == 1  # one broadcast, same size to each
    assert r2["bytes_down"] == 3 * c2[0]["bytes_down"]
    assert r2["bytes_up"] == sum(c["bytes_up"] for c in c2)
    n_params = sum(t.numel() for t in _adapter(d).values())
    assert 4 * n_params < c2[0]["bytes_down"] < 4 * n_params + 64 * 1024  # fp32 payload + header
    assert (d / "metrics_rounds.csv").is_file() and (d / "metrics_clients.csv").is_file()
    assert (d / "losses.png").stat().st_size > 1000
    assert (d / "config.yaml").is_file()
    assert any((d / "tensorboard").iterdir())
    # the final adapter loads with plain peft and reproduces our forward pass
    from peft import PeftModel

    from fedtune.config import ModelConfig
    from fedtune.models import load_model

    base, tok = load_model(ModelConfig(name="tiny-llama"))
    pm = PeftModel.from_pretrained(base, str(d / "adapter"))
    ids = torch.tensor([[5, 6, 7, 8]])
    base2, _ = load_model(ModelConfig(name="tiny-llama"))
    assert not torch.allclose(pm(input_ids=ids).logits, base2(input_ids=ids).logits)
    assert (d / "adapter" / "fedtune_template.json").is_file()
    assert json.loads((d / "adapter" / "fedtune_adapter.json").read_text())["round"] == 2


def test_same_config_same_result(cfg_file, tmp_path):
    a = run(load_config(cfg_file, [f"output.dir={tmp_path / 'a'}", "fl.rounds=1"]), verbose=False)
    b = run(load_config(cfg_file, [f"output.dir={tmp_path / 'b'}", "fl.rounds=1"]), verbose=False)
    ta, tb = _adapter(a.run_dir), _adapter(b.run_dir)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_after_crash_reaches_same_adapter(cfg_file, tmp_path, monkeypatch):
    straight = run(load_config(cfg_file, [f"output.dir={tmp_path / 's'}", "fl.rounds=3"]), verbose=False)

    real = Server.run_round

    def crash_in_round_3(self, rnd):
        if rnd == 3:
            raise RuntimeError("simulated crash")
        return real(self, rnd)

    monkeypatch.setattr(Server, "run_round", crash_in_round_3)
    cfg = load_config(cfg_file, [f"output.dir={tmp_path / 'c'}", "fl.rounds=3"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, verbose=False)
    monkeypatch.setattr(Server, "run_round", real)
    resumed = run(cfg, resume=tmp_path / "c", verbose=False)
    ta, tb = _adapter(straight.run_dir), _adapter(resumed.run_dir)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    rounds = [json.loads(l)["round"] for l in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()
              if json.loads(l)["kind"] == "round"]
    assert rounds == [0, 1, 2, 3]


@pytest.mark.parametrize("scenario", ["global", "local"])
def test_scenarios(cfg_file, tmp_path, scenario):
    res = run(load_config(cfg_file, [f"output.dir={tmp_path / scenario}", f"fl.scenario={scenario}",
                                     "fl.rounds=1"]), verbose=False)
    rows = res.rows
    trained = {r["client"] for r in rows if r["kind"] == "client" and r.get("train_loss") is not None}
    evaluated = {r["client"] for r in rows if r["kind"] == "client" and r.get("val_loss") is not None}
    assert evaluated == {"alpha", "beta", "gamma"}
    if scenario == "global":
        assert trained == {"global"}
        assert (res.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    else:
        assert trained == {"alpha", "beta", "gamma"}
        assert res.final("val_loss_mean_of_clients") is not None
        for c in ("alpha", "beta", "gamma"):
            assert (res.run_dir / "adapters" / c / "adapter_model.safetensors").is_file()


def test_client_sampling_and_uniform_weighting(cfg_file, tmp_path):
    res = run(load_config(cfg_file, [f"output.dir={tmp_path / 'x'}", "fl.clients_per_round=2",
                                     "fl.weighting=uniform", "fl.rounds=2"]), verbose=False)
    per_round = {}
    for r in res.rows:
        if r["kind"] == "client" and r.get("train_loss") is not None:
            per_round.setdefault(r["round"], set()).add(r["client"])
    assert all(len(v) == 2 for v in per_round.values()) and len(per_round) == 2


def _cli(args, cwd, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def _assert_user_error(p, *needles):
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.startswith("error:")
    for n in needles:
        assert n in p.stderr, p.stderr


def test_cli_bad_inputs(cfg_file, tmp_path):
    _assert_user_error(_cli(["run", str(cfg_file), "train.lrr=1"], tmp_path), "did you mean 'lr'")
    _assert_user_error(_cli(["run", str(cfg_file), "model.name=no-such-model"], tmp_path), "unknown model")
    _assert_user_error(_cli(["run", str(cfg_file), "data.source=/nonexistent/x.jsonl"], tmp_path), "x.jsonl")
    _assert_user_error(_cli(["run", str(cfg_file), "data.splitter=iid", "data.num_clients=500"], tmp_path),
                       "client")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{broken\n')
    _assert_user_error(_cli(["run", str(cfg_file), f"data.source={bad}", "data.splitter=iid"], tmp_path),
                       "bad.jsonl", "2")
    _assert_user_error(_cli(["run", str(tmp_path / "nope.yaml")], tmp_path), "not found")


def test_cli_resume_with_other_config_is_refused(cfg_file, tmp_path):
    out = tmp_path / "r"
    p = _cli(["run", str(cfg_file), f"output.dir={out}", "fl.rounds=1", "-q"], tmp_path)
    assert p.returncode == 0, p.stderr
    _assert_user_error(_cli(["run", str(cfg_file), "train.lr=0.5", f"output.dir={out}", "--resume", str(out)],
                            tmp_path), "different config", "train.lr")
    # a second fresh run into the same directory would clobber it: refused
    _assert_user_error(_cli(["run", str(cfg_file), f"output.dir={out}"], tmp_path), "--resume")
    # extending a finished run with more rounds is allowed
    p = _cli(["run", str(cfg_file), f"output.dir={out}", "fl.rounds=2", "-q", "--resume", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "round 2" in p.stdout or (out / "checkpoints" / "round_00002").is_dir()


def test_bad_client_update_is_rejected_and_round_goes_on(cfg_file, tmp_path, monkeypatch):
    from fedtune.client import FedClient

    real_fit = FedClient.fit

    def fit(self, msg):
        out = real_fit(self, msg)
        if self.cid == "beta":  # a broken (or hostile) client: NaN in its update
            k = next(iter(out.tensors))
            out.tensors[k] = torch.full_like(out.tensors[k], float("nan"))
        if self.cid == "gamma":  # wrong shape
            k = next(iter(out.tensors))
            out.tensors[k] = torch.zeros(3)
        return out

    monkeypatch.setattr(FedClient, "fit", fit)
    res = run(load_config(cfg_file, [f"output.dir={tmp_path / 'bad'}", "fl.rounds=1"]), verbose=False)
    r1 = [r for r in res.rows if r["kind"] == "round" and r["round"] == 1][0]
    assert r1["rejected"] == 2
    reasons = {r["client"]: r["rejected"] for r in res.rows if r["kind"] == "client" and r["round"] == 1}
    assert "NaN" in reasons["beta"] and "expected" in reasons["gamma"] and reasons["alpha"] is None
    assert all(torch.isfinite(t).all() for t in _adapter(res.run_dir).values())


LOSSY = ["comm.up=[topk,int4,zstd]", "comm.down=[bf16,gzip]", "comm.topk_fraction=0.25", "comm.block_size=32"]


def test_lossy_codecs_both_ways_end_to_end_and_resume(cfg_file, tmp_path, monkeypatch):
    """2 rounds x 3 clients with a lossy up and down codec: bytes counted exactly, the saved adapter
    is what clients hold, and a crash + resume (error-feedback residuals included) ends the same."""
    import fedtune.transport as transport

    travelled = []
    real_handle = transport.handle_on_client

    def spy(client, kind, data):  # measures what really crosses the transport
        out = real_handle(client, kind, data)
        travelled.append((client.cid, kind, len(data), len(out)))
        return out

    monkeypatch.setattr(transport, "handle_on_client", spy)
    straight = run(load_config(cfg_file, [f"output.dir={tmp_path / 's'}", *LOSSY]), verbose=False)
    rows = straight.rows
    fits = [t for t in travelled if t[1] == "fit"]
    client_rows = [r for r in rows if r["kind"] == "client" and r.get("train_loss") is not None]
    assert [(r["client"], r["bytes_down"], r["bytes_up"]) for r in client_rows] == [(c, d, u) for c, _, d, u in fits]
    rounds = [r for r in rows if r["kind"] == "round"]
    assert rounds[-1]["val_loss"] < rounds[0]["val_loss"]  # it still learns
    assert all(0 < r["up_rel_error"] < 1 for r in client_rows)

    master = load_file(str(straight.run_dir / "checkpoints" / "round_00002" / "server.safetensors"))
    saved = _adapter(straight.run_dir)
    n = sum(t.numel() for t in saved.values())
    assert all(u < 0.5 * 4 * n for *_, u in fits) and all(d < 0.6 * 4 * n for _, _, d, _ in fits)
    # the saved adapter is what clients hold (the bf16 image of the server's exact fp32 master)
    assert len(master) == len(saved)
    for name, t in master.items():
        peft_name = name.removeprefix("global/").replace(".default", "")
        assert torch.equal(saved[peft_name], t.to(torch.bfloat16).float())
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in master.values())
    state = load_file(str(straight.run_dir / "checkpoints" / "round_00002" / "clients" / "alpha.safetensors"))
    assert any(k.startswith("ef/") for k in state)  # error-feedback residual is checkpointed

    real = Server.run_round

    def crash_in_round_2(self, rnd):
        if rnd == 2:
            raise RuntimeError("simulated crash")
        return real(self, rnd)

    monkeypatch.setattr(Server, "run_round", crash_in_round_2)
    cfg = load_config(cfg_file, [f"output.dir={tmp_path / 'c'}", *LOSSY])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, verbose=False)
    monkeypatch.setattr(Server, "run_round", real)
    resumed = run(cfg, resume=tmp_path / "c", verbose=False)
    ta, tb = _adapter(straight.run_dir), _adapter(resumed.run_dir)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
