"""fedtune hpo: the study file's validation (before any trial), the samplers and pruners wired to
real runs on a tiny model, a killed study resumed (no finished trial rerun, the interrupted one
continued from its checkpoint, bit for bit), synchronous successive halving continuing survivors
from their checkpoints, and no adapter leaking from one trial into the next through the shared
base model."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("optuna")

from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.hpo import load_study
from fedtune.hpo.study import BaseCache, open_study, run_study, suggest
from fedtune.run import run
from fedtune.server import Server

from test_e2e import _write_data


@pytest.fixture
def base(tmp_path):
    """A tiny federated run (3 clients, tiny-llama) as a study's base config, plus a space."""
    data = _write_data(tmp_path / "toy.jsonl", n_per_cat=10)
    return {
        "seed": 3, "model": {"name": "tiny-llama"},
        "data": {"source": str(data), "splitter": "meta", "num_clients": 3, "label_field": "category",
                 "max_length": 48, "val_fraction": 0.2, "test_fraction": 0.1, "cache_dir": str(tmp_path / "tok")},
        "peft": {"method": "lora", "r": 2}, "train": {"lr": 0.01, "batch_size": 2, "local_steps": 1},
        "fl": {"rounds": 2}, "eval": {"every": 1, "splits": ["val"]}, "checkpoint": {"every": 1},
        "output": {"tensorboard": False, "progress": False},
        "hpo": {"space": {"train.lr": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True},
                          "peft.alpha": [4, 16]},
                "sampler": "random", "n_trials": 3, "dir": str(tmp_path / "study")},
    }


def _study(base, overrides=(), **hpo):
    d = copy.deepcopy(base)
    d["hpo"].update(hpo)
    return load_study(None, list(overrides), data=d)


# ---- validation: one clear error each, before anything runs ---------------------------------------
@pytest.mark.parametrize("space,msg", [
    ({}, "hpo.space is empty"),
    ({"train.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}, "did you mean 'lr'"),
    ({"trian.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, "did you mean 'train'"),
    ({"train.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, "must be below high"),
    ({"train.lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, "log scale needs low > 0"),
    ({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True, "step": 1e-4}}, "exclude each other"),
    ({"train.local_steps": {"type": "int", "low": 1, "high": 4.5}}, "whole-number"),
    ({"train.local_steps": {"type": "int", "low": 1, "high": 4, "step": 2}}, "not a multiple of step"),
    ({"train.lr": {"type": "float", "low": 1e-4}}, "needs low and high"),
    ({"train.lr": {"type": "floaty", "low": 1e-4, "high": 1.0}}, "type"),
    ({"train.lr": {"type": "float", "low": 1e-4, "high": 1.0, "lo": 3}}, "did you mean 'low'"),
    ({"peft.alpha": []}, "no choices"),
    ({"peft.alpha": [8, 8]}, "repeat a value"),
    ({"peft.dropout": {"type": "float", "low": 0.0, "high": 1.5}}, "hpo.space.peft.dropout = 1.5 is not a valid"),
    ({"train.optimizer": ["adamw", "adagrad"]}, "hpo.space.train.optimizer = 'adagrad'"),
    ({"train": [1], "train.lr": [1e-3, 1e-2]}, "a section and a key inside it"),
    ({"output.dir": ["a", "b"]}, "not a hyperparameter"),
])
def test_bad_space_is_one_clear_error(base, space, msg):
    d = copy.deepcopy(base)
    d["hpo"]["space"] = space
    with pytest.raises(FedtuneError, match=msg):
        load_study(None, data=d)


@pytest.mark.parametrize("hpo,overrides,msg", [
    ({"sampler": "grid"}, (), "train.lr is continuous"),
    ({"objective": "test_loss"}, (), "add test to eval.splits"),
    ({"objective": "gsm8k_accuracy"}, (), "add the task to eval.tasks"),
    ({"objective": "val_los"}, (), "did you mean 'val_loss'"),
    ({"pruner": "asha"}, ("eval.every=0",), "nothing to prune on"),
    ({"pruner": "sync_sha", "min_rounds": 3}, (), "no rung below the full budget"),
    ({"pruner": "sync_sha"}, ("eval.every=2",), "set eval.every=1"),
    ({"pruner": "sync_sha", "n_trials": 2}, (), "cannot be halved"),
    ({"samplr": "tpe"}, (), "did you mean 'sampler'"),
    ({"pruner": "median"}, (), "hpo.pruner"),
    ({}, ("train.lr=0.1",), "also set by a command-line override"),
])
def test_bad_study_is_one_clear_error(base, hpo, overrides, msg):
    with pytest.raises(FedtuneError, match=msg):
        _study(base, overrides, **hpo)


def test_fl_rounds_cannot_be_searched_with_a_pruner(base):
    d = copy.deepcopy(base)
    d["hpo"]["space"]["fl.rounds"] = [2, 3]
    d["hpo"]["pruner"] = "asha"
    with pytest.raises(FedtuneError, match="fidelity is the federated round"):
        load_study(None, data=d)


def test_storage_that_cannot_be_opened(base, tmp_path):
    with pytest.raises(FedtuneError, match="cannot be opened"):
        open_study(_study(base, storage=f"sqlite:///{tmp_path}/no/such/dir/x.db"))
    with pytest.raises(FedtuneError, match="cannot be opened"):
        open_study(_study(base, storage="nosuchdb://x"))


def test_resuming_with_a_different_space_is_refused(base):
    open_study(_study(base))
    d = copy.deepcopy(base)
    d["hpo"]["space"]["peft.alpha"] = [4, 32]
    with pytest.raises(FedtuneError, match="different space"):
        open_study(load_study(None, data=d))
    with pytest.raises(FedtuneError, match="different base"):
        open_study(_study(base, ["train.batch_size=1"]))
    open_study(_study(base, n_trials=5))  # more trials: fine


def test_cli_bad_study_exits_2_with_one_line_and_no_study_dir(base, tmp_path, capsys):
    import yaml

    from fedtune.cli import main

    d = copy.deepcopy(base)
    d["hpo"]["sampler"] = "grid"
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    assert main(["hpo", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: hpo.sampler=grid")
    assert not (tmp_path / "study").exists()


# ---- samplers (no runs: a synthetic objective) -----------------------------------------------------
@pytest.mark.parametrize("sampler", ["random", "grid", "tpe", "gp"])
def test_every_sampler_draws_inside_the_space(base, sampler):
    import optuna

    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 4e-3, "step": 1e-3},
             "peft.alpha": [4, 16], "train.local_steps": {"type": "int", "low": 1, "high": 2}}
    d = copy.deepcopy(base)
    d["hpo"].update(space=space, sampler=sampler, n_trials=None, n_startup_trials=2)
    study = load_study(None, data=d)
    assert study.n_trials == (16 if sampler == "grid" else 10)
    ostudy = open_study(study)
    expected = {"random": optuna.samplers.RandomSampler, "grid": optuna.samplers.GridSampler,
                "tpe": optuna.samplers.TPESampler, "gp": optuna.samplers.GPSampler}[sampler]
    assert isinstance(ostudy.sampler, expected)
    seen = set()
    for _ in range(5 if sampler == "gp" else 16):
        t = ostudy.ask()
        p = suggest(t, study)
        assert round(p["train.lr"] * 1e3) in (1, 2, 3, 4) and p["peft.alpha"] in (4, 16)
        assert p["train.local_steps"] in (1, 2)
        seen.add(tuple(sorted(p.items())))
        ostudy.tell(t, p["train.lr"] * p["train.local_steps"])
    if sampler == "grid":
        assert len(seen) == 16 and ostudy.sampler.is_exhausted(ostudy)


def test_pruners_are_optunas_with_rounds_as_fidelity(base):
    import optuna

    from fedtune.hpo.study import _pruner

    asha = _pruner(_study(base, pruner="asha", min_rounds=1, reduction_factor=2))
    assert isinstance(asha, optuna.pruners.SuccessiveHalvingPruner)
    hb = _pruner(_study(base, pruner="hyperband", min_rounds=1, reduction_factor=3))
    assert isinstance(hb, optuna.pruners.HyperbandPruner) and hb._max_resource == 2


# ---- real runs on a tiny model ---------------------------------------------------------------------
def _closes(monkeypatch):
    """Count MetricsLogger.close calls (every run, pruned or crashed, must close its logger)."""
    from fedtune.metrics import MetricsLogger

    calls = []
    real = MetricsLogger.close

    def close(self):
        calls.append(self.dir)
        real(self)

    monkeypatch.setattr(MetricsLogger, "close", close)
    return calls


def test_asha_prunes_on_rounds_and_closes_every_logger(base, monkeypatch):
    study = _study(base, pruner="asha", min_rounds=1, reduction_factor=2, n_trials=3, sampler="grid",
                   space={"train.lr": [0.05, 1e-5, 0.02]}, seed=1)
    closes = _closes(monkeypatch)
    res = run_study(study, verbose=False)
    trials = sorted(res.study.trials, key=lambda t: t.number)
    states = [t.state.name for t in trials]
    assert sorted(t.params["train.lr"] for t in trials) == [1e-5, 0.02, 0.05]
    assert "PRUNED" in states and "COMPLETE" in states
    # ASHA at rung 0 (round 1), recomputed here: a trial continues only when its round-1 value is
    # within the best floor(n/2) of the n trials that have reached round 1 so far (n = 1: always)
    firsts = []
    for t in trials:
        v = t.intermediate_values[1]
        firsts.append(v)
        k = max(1, len(firsts) // 2)
        promoted = len(firsts) == 1 or v <= sorted(firsts)[k - 1]
        assert (t.state.name == "COMPLETE") == promoted, t.number  # (round 2 is the last: no rung there)
        if t.state.name == "PRUNED":
            assert t.user_attrs["rounds"] < 2 and t.value == t.intermediate_values[max(t.intermediate_values)]
            rows = [json.loads(l) for l in (res.dir / t.user_attrs["run_dir"] / "metrics.jsonl").read_text().splitlines()]
            assert max(r["round"] for r in rows) == t.user_attrs["rounds"]
        else:
            assert t.user_attrs["rounds"] == 2 and t.user_attrs["client_rounds"] == 6
    assert len(closes) == res.runs == 3  # one close per run, pruned ones included
    # outputs
    for f in ("trials.csv", "trials.md", "best.yaml", "summary.json", "history.png"):
        assert (res.dir / f).is_file(), f
    best = load_config(res.dir / "best.yaml")
    assert best.train.lr == res.study.best_trial.params["train.lr"]
    assert json.loads((res.dir / "summary.json").read_text())["states"]["pruned"] >= 1


def test_a_killed_study_resumes_without_rerunning_finished_trials(base, tmp_path, monkeypatch):
    study = _study(base, n_trials=2, sampler="random", seed=4, pruner="none")
    real = Server.run_round
    calls = {"n": 0}

    def killed_in_second_trial(self, rnd):
        calls["n"] += 1
        if calls["n"] == 4:  # trial 1, round 2 (trial 0 ran rounds 1-2): after its round-1 checkpoint
            raise KeyboardInterrupt
        return real(self, rnd)

    monkeypatch.setattr(Server, "run_round", killed_in_second_trial)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, verbose=False)
    monkeypatch.setattr(Server, "run_round", real)
    first = sorted(open_study(study).trials, key=lambda t: t.number)
    assert [t.state.name for t in first] == ["COMPLETE", "RUNNING"]
    t0_metrics = (study.dir / "trials" / "trial_00000" / "metrics.jsonl").read_text()

    rounds = []
    monkeypatch.setattr(Server, "run_round", lambda self, rnd: rounds.append((self.run_dir.name, rnd)) or real(self, rnd))
    res = run_study(_study(base, n_trials=2, sampler="random", seed=4, pruner="none"), verbose=False)
    trials = sorted(res.study.trials, key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    # trial 0 never ran again; trial 1 continued from its round-1 checkpoint (round 2 only)
    assert rounds == [("trial_00001", 2)]
    assert (study.dir / "trials" / "trial_00000" / "metrics.jsonl").read_text() == t0_metrics
    assert trials[1].params == first[1].params
    # the continued trial ends exactly where an uninterrupted run of its config does
    cfg = study.trial_config(trials[1].params, tmp_path / "straight")
    straight = run(cfg, verbose=False)
    a = load_file(str(study.dir / "trials" / "trial_00001" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(straight.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert trials[1].value == pytest.approx(straight.final("val_loss"), abs=0)


def test_sync_sha_continues_survivors_from_their_checkpoints(base, tmp_path, monkeypatch):
    d = copy.deepcopy(base)
    d["hpo"].update(pruner="sync_sha", n_trials=3, min_rounds=1, reduction_factor=2, sampler="grid",
                    space={"train.lr": [0.05, 1e-5, 0.02]})
    study = load_study(None, data=d)
    real = Server.run_round
    rounds = []
    monkeypatch.setattr(Server, "run_round", lambda self, rnd: rounds.append((self.run_dir.name, rnd)) or real(self, rnd))
    res = run_study(study, verbose=False)
    monkeypatch.setattr(Server, "run_round", real)
    trials = sorted(res.study.trials, key=lambda t: t.number)
    round1 = {t.number: t.intermediate_values[1] for t in trials}
    winner = min(round1, key=round1.get)  # independent: the best round-1 val loss survives (keep 3 // 2 = 1)
    assert [t.state.name == "COMPLETE" for t in trials] == [t.number == winner for t in trials]
    # every trial ran round 1 once; only the survivor ran round 2, continuing from its checkpoint
    assert sorted(rounds) == sorted([(f"trial_{t.number:05d}", 1) for t in trials] + [(f"trial_{winner:05d}", 2)])
    rows = [json.loads(l) for l in (res.dir / f"trials/trial_{winner:05d}/metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["kind"] == "round"] == [0, 1, 2]
    # ... and lands exactly on an uninterrupted 2-round run of its configuration
    straight = run(study.trial_config(trials[winner].params, tmp_path / "straight"), verbose=False)
    a = load_file(str(res.dir / f"trials/trial_{winner:05d}/adapter/adapter_model.safetensors"))
    b = load_file(str(straight.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert trials[winner].value == straight.final("val_loss")
    assert all(t.user_attrs["rounds"] == 1 for t in trials if t.number != winner)


def test_no_adapter_leaks_between_trials_on_the_shared_base(base, tmp_path):
    from fedtune.models import load_model

    d = {k: v for k, v in copy.deepcopy(base).items() if k != "hpo"}
    cache = BaseCache()
    from fedtune.config import config_from_dict

    def cfg(out, *extra):
        x = copy.deepcopy(d)
        x["fl"]["rounds"] = 1
        x["output"]["dir"] = str(tmp_path / out)
        for e in extra:
            k, _, v = e.partition("=")
            x.setdefault(k.split(".")[0], {})[k.split(".")[1]] = json.loads(v)
        return config_from_dict(x)

    a = cfg("a", "peft.r=4", "peft.alpha=32", 'train.lr=0.05')
    run(a, verbose=False, base=cache.get(a.model))
    model = cache.get(a.model)[0]
    assert cache.loads == 1 and not any("lora" in n for n, _ in model.named_parameters())
    fresh, _ = load_model(a.model)
    assert model.state_dict().keys() == fresh.state_dict().keys()
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    b = cfg("b")
    shared = run(b, verbose=False, base=cache.get(b.model))
    alone = run(cfg("c"), verbose=False)
    x = load_file(str(shared.adapter_dir / "adapter_model.safetensors"))
    y = load_file(str(alone.adapter_dir / "adapter_model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert cache.loads == 1


def test_study_file_is_read_as_strictly_as_a_run_config(tmp_path):
    """A second ``hpo:`` section would silently replace the first under plain YAML loading."""
    f = tmp_path / "s.yaml"
    f.write_text("hpo:\n  n_trials: 4\n  space: {train.lr: [0.1, 0.2]}\nhpo:\n  n_trials: 9\n")
    with pytest.raises(FedtuneError, match="hpo"):
        load_study(str(f), [])
    with pytest.raises(FedtuneError, match="not found"):
        load_study(str(tmp_path / "missing.yaml"), [])
