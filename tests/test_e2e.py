"""End-to-end: a few rounds on a tiny random model, through the real run path and the CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

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


def crash_then_resume(monkeypatch, cfg, run_dir, crash_round: int):
    """Run ``cfg`` until it dies at the start of round ``crash_round`` (a simulated crash), then
    resume it from ``run_dir``; returns the resumed run's result."""
    import pytest

    from fedtune.run import run
    from fedtune.server import Server

    real = Server.run_round

    def crash(self, rnd):
        if rnd == crash_round:
            raise RuntimeError("simulated crash")
        return real(self, rnd)

    monkeypatch.setattr(Server, "run_round", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, verbose=False)
    monkeypatch.setattr(Server, "run_round", real)
    return run(cfg, resume=run_dir, verbose=False)


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


def test_fed_run_end_to_end(cfg_file, tmp_path, monkeypatch):
    # every adapter directory is complete when it is renamed into place, and a checkpoint's adapter
    # is there before `latest` names that checkpoint
    renames = []
    real_replace = os.replace

    def spy_replace(src, dst):
        src, dst = Path(src), Path(dst)
        if dst.name == "adapter":
            latest = dst.parents[1] / "latest"
            renames.append((dst, (src / "fedtune_template.json").is_file(),
                            latest.read_text().strip() if latest.is_file() else None))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy_replace)
    cfg = load_config(cfg_file, [f"output.dir={tmp_path / 'run'}"])
    res = run(cfg, verbose=False)
    monkeypatch.setattr(os, "replace", real_replace)
    d = res.run_dir
    ckpt_renames = [r for r in renames if r[0].parent.name.startswith("round_")]
    assert [r[0].parent.name for r in ckpt_renames] == ["round_00001", "round_00002"]
    assert all(has_template for _, has_template, _ in renames) and len(renames) == 3  # + run_dir/adapter
    assert [latest for _, _, latest in ckpt_renames] == [None, "round_00001"]
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
    evaluated = [r for r in rows if r["kind"] == "client" and "val_loss" in r]
    assert len(evaluated) == 9  # 3 clients x rounds 0..2, each with its own perplexity
    for r in evaluated:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["test_ppl"] == pytest.approx(math.exp(r["test_loss"]))
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
    import random

    import numpy as np

    real = Server.run_round
    at_round_3 = []  # the global RNG states when round 3 starts: the resumed run must have them too

    def record(self, rnd):
        if rnd == 3:
            at_round_3.append((torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()))
        return real(self, rnd)

    monkeypatch.setattr(Server, "run_round", record)
    straight = run(load_config(cfg_file, [f"output.dir={tmp_path / 's'}", "fl.rounds=3"]), verbose=False)

    def crash_in_round_3(self, rnd):
        if rnd == 3:
            raise RuntimeError("simulated crash")
        return real(self, rnd)

    monkeypatch.setattr(Server, "run_round", crash_in_round_3)
    cfg = load_config(cfg_file, [f"output.dir={tmp_path / 'c'}", "fl.rounds=3"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, verbose=False)
    monkeypatch.setattr(Server, "run_round", record)
    resumed = run(cfg, resume=tmp_path / "c", verbose=False)
    ta, tb = _adapter(straight.run_dir), _adapter(resumed.run_dir)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    (t1, n1, p1), (t2, n2, p2) = at_round_3
    assert torch.equal(t1, t2) and (n1 == n2).all() and p1 == p2
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
    """Through the installed console command (exit status and stderr of a real process); the
    in-process test below covers the rest of the bad settings without a process each."""
    _assert_user_error(_cli(["run", str(cfg_file), "train.lrr=1"], tmp_path), "did you mean 'lr'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{broken\n')
    _assert_user_error(_cli(["run", str(cfg_file), f"data.source={bad}", "data.splitter=iid"], tmp_path),
                       "bad.jsonl", "2")
    _assert_user_error(_cli(["run", str(tmp_path / "nope.yaml")], tmp_path), "not found")
    assert not (tmp_path / "runs").exists()  # no output.dir: nothing was made under runs/ either


@pytest.mark.parametrize("overrides,needles", [
    (["model.name=no-such-model"], ["unknown model"]),
    (["data.source=/nonexistent/x.jsonl"], ["x.jsonl"]),
    (["data.splitter=iid", "data.num_clients=500"], ["client"]),
    (["data.label_field=colour"], ["data.label_field", "colour"]),
    (["data.num_clients=5"], ["5 clients", "data.num_clients"]),  # meta: 3 categories cannot make 5 clients
    (["eval.tasks=[nosuch]"], ["nosuch"]),
    (["peft.target_modules=[nosuch]"], ["nosuch", "q_proj"]),
    (["train.device=foo"], ["train.device", "foo"]),
    (["fl.algorithm=fedproxx"], ["fl.algorithm", "did you mean 'fedprox'"]),
    (["fl.algorithm=fedprox", "fl.options.muu=0.1"], ["fl.options.muu", "did you mean 'mu'"]),
    (["fl.algorithm=fedprox", "fl.options.mu=-1"], ["fl.options.mu", "greater than or equal to 0"]),
    (["fl.algorithm=krum"], ["krum", "2f + 2 = 4", "3 are sampled"]),  # 3 clients cannot outvote f = 1
    (["fl.scenario=local", "fl.algorithm=scaffold"], ["fl.scenario=local", "scaffold"]),
    pytest.param(["train.device=cuda"], ["train.device=cuda", "CUDA"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_input_is_one_message_and_leaves_no_run_directory(cfg_file, tmp_path, monkeypatch, capsys,
                                                              overrides, needles):
    """In process (fast): each mistake is one `error:` message, exit 2, and no directory is made,
    neither the default runs/<name>-<time> nor an output.dir."""
    from fedtune.cli import main

    monkeypatch.chdir(tmp_path)
    for extra in ([], [f"output.dir={tmp_path / 'out' / 'run'}"]):
        assert main(["run", str(cfg_file), "-q", *overrides, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "Traceback" not in err
        assert all(n in err for n in needles), err
        assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_failed_setup_removes_only_what_it_made(cfg_file, tmp_path, monkeypatch):
    """A failure after the run directory is made but before round 1 takes back a fresh run's
    directory, puts back a run that output.overwrite was replacing, and never touches a resumed run."""
    import fedtune.run as run_mod

    quick = ["fl.rounds=1", "eval.every=0", "train.local_steps=1"]
    done = run(load_config(cfg_file, [f"output.dir={tmp_path / 'a'}", *quick]), verbose=False).run_dir
    before = _adapter(done)
    (done / "marker").write_text("the old run")

    def broken_logger(*a, **k):
        raise RuntimeError("setup failed")

    monkeypatch.setattr(run_mod, "MetricsLogger", broken_logger)
    for cfg, resume in [(load_config(cfg_file, [f"output.dir={tmp_path / 'new' / 'b'}", *quick]), None),
                        (load_config(cfg_file, [f"output.dir={done}", "output.overwrite=true", *quick]), None),
                        (load_config(cfg_file, [f"output.dir={done}", "fl.rounds=2", "eval.every=0",
                                                "train.local_steps=1"]), done)]:
        with pytest.raises(RuntimeError, match="setup failed"):
            run(cfg, resume=resume, verbose=False)
    assert not (tmp_path / "new").exists()
    assert (done / "marker").is_file() and (done / "checkpoints" / "round_00001").is_dir()
    assert not list(tmp_path.glob(".a.*"))  # the replaced run was put back, not left aside
    after = _adapter(done)
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.undo()
    # without output.overwrite an existing run is refused; with it, replaced
    from fedtune.errors import FedtuneError

    with pytest.raises(FedtuneError, match="output.overwrite=true"):
        run(load_config(cfg_file, [f"output.dir={done}", *quick]), verbose=False)
    again = run(load_config(cfg_file, [f"output.dir={done}", "output.overwrite=true", *quick]), verbose=False)
    assert again.run_dir == done and not (done / "marker").exists() and (done / "adapter").is_dir()
    assert not list(tmp_path.glob(".a.*"))


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

    from fedtune.checkpoint import load_checkpoint
    from fedtune.state import ClientStateStore

    _, server_state, _ = load_checkpoint(straight.run_dir / "checkpoints" / "round_00002", ClientStateStore(None))
    master = server_state["global"]  # FedAvg's server state: the exact fp32 global adapter
    saved = _adapter(straight.run_dir)
    n = sum(t.numel() for t in saved.values())
    assert all(u < 0.5 * 4 * n for *_, u in fits) and all(d < 0.6 * 4 * n for _, _, d, _ in fits)
    # the saved adapter is what clients hold (the bf16 image of the server's exact fp32 master)
    assert len(master) == len(saved)
    for name, t in master.items():
        peft_name = name.replace(".default", "")
        assert torch.equal(saved[peft_name], t.to(torch.bfloat16).float())
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in master.values())
    state = load_file(str(straight.run_dir / "checkpoints" / "round_00002" / "clients" / "alpha.safetensors"))
    assert any(k.startswith("ef/") for k in state)  # error-feedback residual is checkpointed

    cfg = load_config(cfg_file, [f"output.dir={tmp_path / 'c'}", *LOSSY])
    resumed = crash_then_resume(monkeypatch, cfg, tmp_path / "c", 2)
    ta, tb = _adapter(straight.run_dir), _adapter(resumed.run_dir)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
