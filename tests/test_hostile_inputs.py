"""Hostile and careless input, one class at a time (issue 13): every bad input is one ``error:`` line
and exit 2 from the CLI, checked before anything is written, with nothing half-made left behind.

Classes: config; config against the model and the federation; data files and client names; run
directories (damaged checkpoints, resume fallback) and concurrency (a lock per run directory, real
processes); the file system; a run that trained nothing; the wire decoder without ``expect``.

Runs use tiny random models and tiny data; most cases stop before a model is loaded. The CLI is
called in process (``fedtune.cli.main``); real subprocesses only where a second process is the point
(the lock, SIGTERM).
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch

import fedtune.run
from fedtune import cli
from fedtune.config import Config, _Section, load_config
from fedtune.errors import FedtuneError, MessageError

SRC = Path(fedtune.run.__file__).resolve().parents[1]  # .../src: for the subprocesses


# ---- helpers ------------------------------------------------------------------------------------
def _main(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error(err: str, *needles: str) -> str:
    """``err`` ends in one clean user error (an ``error:`` line, continued by indented detail lines
    when there are several problems) naming each needle; no traceback. (Libraries' progress bars may
    come before it.)"""
    assert "Traceback" not in err, err
    assert err.count("error: ") == 1, err
    msg = err[err.index("error: "):]  # the message with its detail lines
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _tree(d: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``d`` with its size and mtime (the lock file excepted: taking a lock and
    giving it back rewrites it)."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != "run.lock"}


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))


def _write_config(path: Path, data: Path, tmp: Path, **extra) -> Path:
    lines = {
        "model": "{name: tiny-llama}",
        "data": (f"{{source: {data}, splitter: meta, num_clients: 2, label_field: category, max_length: 32, "
                 f"val_fraction: 0.1, test_fraction: 0.0, cache_dir: {tmp / 'tok'}}}"),
        "peft": "{method: lora, r: 2}",
        "train": "{lr: 0.01, batch_size: 2, local_steps: 1}",
        "fl": "{rounds: 2}",
        "eval": "{every: 1, splits: [val], batch_size: 8}",
        "checkpoint": "{every: 1, keep: 2}",
        "output": "{tensorboard: false, progress: false}",
    }
    lines.update(extra)
    path.write_text("seed: 5\n" + "".join(f"{k}: {v}\n" for k, v in lines.items()))
    return path


CATEGORIES = [f"category-number-{i:03d}" for i in range(200)]


def _write_data(path: Path) -> Path:
    # 200 categories grouped into 2 clients by the meta splitter: each client's name joins 100 of
    # them with '+' (~2,000 characters), far past the 255 bytes a file name may have
    rows = [{"instruction": f"Name item {i}", "output": f"item {i} of {c}", "category": c}
            for i, c in enumerate(CATEGORIES)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data, a config, and one finished 2-round run (checkpoints of rounds 1 and 2 kept)."""
    tmp = tmp_path_factory.mktemp("hostile")
    data = _write_data(tmp / "data.jsonl")
    cfg = _write_config(tmp / "cfg.yaml", data, tmp)
    run_dir = tmp / "base-run"
    fedtune.run.run(load_config(cfg, [f"output.dir={run_dir}"]), verbose=False)
    return {"tmp": tmp, "data": data, "cfg": cfg, "run": run_dir}


@pytest.fixture
def run_copy(world, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(world["run"], d)
    return d


# ---- 1. config ------------------------------------------------------------------------------------
def test_duplicate_section_and_key_are_errors_with_their_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 0.1\n  batch_size: 4\ntrain:\n  lr: 0.2\n")
    code, _, err = _main(capsys, "run", cfg)
    assert code == 2
    _one_error(err, f"{cfg}':4:1", "duplicate key 'train'", "first given on line 1")
    cfg.write_text("fl: {rounds: 2}\ntrain: {lr: 0.1, batch_size: 4, lr: 0.2}\n")
    code, _, err = _main(capsys, "run", cfg)
    assert code == 2
    _one_error(err, f"{cfg}':2:", "duplicate key 'lr'")
    assert not (tmp_path / "runs").exists()
    # a merge key may still be overridden, as YAML intends
    cfg.write_text("eval:\n  task_options:\n    a: &o {x: 1, y: 2}\n    b: {<<: *o, y: 3}\n")
    assert load_config(cfg).eval.task_options == {"a": {"x": 1, "y": 2}, "b": {"x": 1, "y": 3}}


def test_yaml_alias_bomb_and_recursive_alias_are_refused(tmp_path, capsys):
    levels = ["      l0: &l0 [" + ", ".join(["'lol'"] * 9) + "]"]
    levels += [f"      l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    cfg = tmp_path / "bomb.yaml"  # 9**10 ~ 3.5e9 values once expanded; a few hundred bytes here
    cfg.write_text("eval:\n  task_options:\n    humaneval:\n" + "\n".join(levels) + "\n")
    assert cfg.stat().st_size < 1000
    code, _, err = _main(capsys, "run", cfg)
    assert code == 2
    _one_error(err, str(cfg), "expands to more than 100000 values")
    cfg.write_text("eval: {task_options: {humaneval: {x: &a [1, *a]}}}\n")
    code, _, err = _main(capsys, "run", cfg)
    assert code == 2
    _one_error(err, "recursive")
    cfg.write_text("fl: {rounds: 2}\n")
    code, _, err = _main(capsys, "run", cfg, "eval.task_options={a: {x: &x [1, 2]}, b: {y: *x, z: *x}}", "fl.rounds=x")
    assert code == 2
    _one_error(err, "fl.rounds")  # a few aliases are fine: only the bad value is reported


def test_invalid_utf8_and_huge_numbers_in_a_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"fl:\n  rounds: 2\n# caf\xe9 au lait\n")
    code, _, err = _main(capsys, "run", cfg)
    assert code == 2
    _one_error(err, f"{cfg}':3", "not valid UTF-8")
    cfg.write_text("fl:\n  rounds: 2\nseed: " + "7" * 5000 + "\n")
    code, _, err = _main(capsys, "run", cfg)
    assert code == 2
    _one_error(err, f"{cfg}':3", "5000 digits")


def _float_fields(model: type, prefix: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, _Section):
            out += _float_fields(ann, f"{prefix}{name}.")
        elif ann is float or float in typing.get_args(ann):
            out.append(prefix + name)
    return out


FLOAT_FIELDS = _float_fields(Config)


def test_every_float_field_is_found():
    assert {"train.lr", "data.alpha", "peft.dropout", "comm.topk_fraction", "fl.clients_per_round",
            "train.max_grad_norm", "train.local_epochs", "deploy.round_timeout_s"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf", ".nan"])
def test_non_finite_numbers_are_rejected_for_every_float_field(value):
    for key in FLOAT_FIELDS:
        with pytest.raises(FedtuneError) as e:
            load_config(None, [f"{key}={value}"])
        assert key in str(e.value), (key, str(e.value))


def test_train_lr_inf_from_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(capsys, "run", _write_config(tmp_path / "c.yaml", tmp_path / "none.jsonl", tmp_path),
                         "train.lr=inf")
    assert code == 2
    _one_error(err, "train.lr", "finite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


@pytest.mark.parametrize("override, setting", [
    ("seed=1000000000000000000000000000000", "seed"),  # 10**30
    ("seed=10**30", "seed"),
    ("seed=-1", "seed"),
    (f"seed={2**63}", "seed"),
    ("peft.r=1000000000", "peft.r"),
    ("train.batch_size=1000000000", "train.batch_size"),
    ("data.max_length=1000000000", "data.max_length"),
    ("peft.num_virtual_tokens=1000000000", "peft.num_virtual_tokens"),
    ("fl.rounds=1000000000000", "fl.rounds"),
    ("deploy.round_timeout_s=1e300", "deploy.round_timeout_s"),
    ("comm.level=100000000000000000000", "comm.level"),
])
def test_out_of_range_seeds_and_sizes(override, setting, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: tiny-llama}\n")
    code, _, err = _main(capsys, "run", cfg, override)
    assert code == 2
    _one_error(err, setting)
    assert not (tmp_path / "runs").exists()


def test_largest_seed_is_accepted():
    assert load_config(None, [f"seed={2**63 - 1}"]).seed == 2**63 - 1


@pytest.mark.parametrize("name", ["../../x", "a/b", "/abs", ".hidden", "", "x" * 101, "sp ace"])
def test_path_like_run_names_are_refused(name, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: tiny-llama}\n")
    code, _, err = _main(capsys, "run", cfg, f"output.name={name}")
    assert code == 2
    _one_error(err, "output.name")
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "work"]


def test_every_unknown_key_is_reported(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {lrr: 0.1, batchsize: 2}\nfl: {roundz: 3}\n")
    code, _, err = _main(capsys, "run", cfg, "eval.evry=2")
    assert code == 2
    _one_error(err, "4 unknown config keys", "'train.lrr' (did you mean 'lr'?)",
               "'train.batchsize' (did you mean 'batch_size'?)", "'fl.roundz' (did you mean 'rounds'?)",
               "'eval.evry' (did you mean 'every'?)")


# ---- 3b. config against the model and the federation (loaded, then checked before the run dir) ---
@pytest.mark.parametrize("override, needles", [
    ("data.max_length=2048", ["data.max_length=2048", "max_position_embeddings=1024"]),
    ("peft.r=65", ["peft.r=65", "hidden size", "hidden_size=64"]),
    ("fl.clients_per_round=5", ["fl.clients_per_round=5", "2 client(s)"]),
])
def test_config_checked_against_model_and_federation_before_the_run_dir(world, override, needles, tmp_path, capsys):
    out_dir = tmp_path / "deep" / "run"
    code, _, err = _main(capsys, "run", world["cfg"], override, f"output.dir={out_dir}")
    assert code == 2
    _one_error(err, *needles)
    assert not (tmp_path / "deep").exists()


# ---- 4. data files and client names ---------------------------------------------------------------
_GOOD = json.dumps({"instruction": "a", "output": "b"})
_DEEP = "[" * 200_000 + "]" * 200_000


@pytest.mark.parametrize("name, text, line, needle", [
    ("deep.jsonl", f'{_GOOD}\n{_GOOD}\n{{"instruction": {_DEEP}, "output": "x"}}\n', 3, "nested too deeply"),
    ("deep.json", f'[\n{_GOOD},\n{{"instruction": {_DEEP}, "output": "x"}}\n]', 3, "nested too deeply"),
    ("bigint.jsonl", f'{_GOOD}\n{{"instruction": {"9" * 5000}, "output": "x"}}\n', 2, "5000 digits"),
    ("bigint.json", f'[\n{_GOOD},\n{_GOOD},\n{{"instruction": {"9" * 5000}, "output": "x"}}]', 4, "5000 digits"),
    ("surrogate.jsonl", f'{_GOOD}\n{{"instruction": "a\\ud800b", "output": "x"}}\n', 2, "unpaired surrogate"),
    ("surrogate.json", f'[\n{_GOOD},\n{{"instruction": "x", "output": "\\udfff"}}\n]', 3, "unpaired surrogate"),
    ("huge.jsonl", f'{_GOOD}\n{{"instruction": "{"a" * 10_000_001}", "output": "x"}}\n', 2, "10000001 characters"),
])
def test_malformed_records_name_file_and_line(name, text, line, needle, tmp_path):
    from fedtune.data.records import load_records_file

    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(FedtuneError) as e:
        load_records_file(p)
    assert str(e.value).startswith(f"{p}:{line}: ") and needle in str(e.value), str(e.value)


def test_malformed_data_file_from_the_cli_leaves_no_run_dir(world, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(f'{_GOOD}\n{{"instruction": "\\ud800", "output": "x", "category": "a"}}\n')
    code, _, err = _main(capsys, "run", world["cfg"], f"data.source={data}", f"output.dir={tmp_path / 'run'}")
    assert code == 2
    _one_error(err, f"{data}:2:", "unpaired surrogate")
    assert not (tmp_path / "run").exists()


def test_long_meta_split_client_names_become_bounded_file_names(world):
    """200 categories in 2 clients: the run completes; every file name is bounded and safe while
    the metrics keep the full display names."""
    from fedtune.utils import SAFE_NAME_MAX, safe_name

    run_dir = world["run"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    names = {r["client"] for r in rows if r["kind"] == "client"}
    assert len(names) == 2 and {c for n in names for c in n.split("+")} == set(CATEGORIES)
    assert all(len(n) > 1000 for n in names)
    for p in run_dir.rglob("*"):
        assert len(p.name) <= SAFE_NAME_MAX + len(".safetensors"), p.name
    states = sorted(p.stem for p in (run_dir / "checkpoints" / "round_00002" / "clients").iterdir())
    assert states == sorted(safe_name(n) for n in names) and len(set(states)) == 2
    assert all(safe_name(s) == s for s in states)  # idempotent: a restore maps a file back to itself


def test_safe_name_keeps_distinct_long_names_distinct():
    from fedtune.utils import safe_name

    a, b = "+".join(CATEGORIES[:100]), "+".join(CATEGORIES[:99] + ["other"])
    assert safe_name(a) != safe_name(b) and len(safe_name(a)) <= 100
    assert safe_name("alpha") == "alpha" and safe_name("C#") == safe_name(safe_name("C#"))


def test_tokenising_many_records_shows_progress(monkeypatch, capsys, tmp_path):
    from fedtune.config import DataConfig
    from fedtune.data import tokenize as tk
    from fedtune.data.records import Record
    from fedtune.models import load_tokenizer

    tok = load_tokenizer(load_config(None, ["model.name=tiny-llama"]).model)
    recs = [Record(f"say {i}", "", f"word {i}") for i in range(30)]
    monkeypatch.setattr(tk, "PROGRESS_MIN_RECORDS", 10)
    monkeypatch.setattr(tk, "_PROGRESS_CHUNK", 8)
    dcfg = DataConfig(cache_dir=str(tmp_path / "tok"))
    quiet = tk.tokenize_records(recs, tok, dcfg, use_cache=False)
    assert "tokenising" not in capsys.readouterr().err
    shown = tk.tokenize_records(recs, tok, dcfg, use_cache=False, progress=True, desc="tokenising alpha train")
    assert "tokenising alpha train" in capsys.readouterr().err
    assert shown.input_ids == quiet.input_ids and shown.labels == quiet.labels  # chunking changes nothing


# ---- 2. damaged run directories on --resume ------------------------------------------------------
def _truncate(p: Path, keep: float = 0.5) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])


def _damage(d: Path, what: str) -> None:
    ck = d / "checkpoints"
    if what == "server":
        _truncate(ck / "round_00002" / "server.safetensors")
    elif what == "server-header":
        _truncate(ck / "round_00002" / "server.safetensors", keep=0.0001)
    elif what == "rng":
        _truncate(ck / "round_00002" / "rng.safetensors", keep=0.9)
    elif what == "client":
        f = next((ck / "round_00002" / "clients").iterdir())
        f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + f.read_bytes()[24:])
    elif what == "client-meta":
        f = next((ck / "round_00002" / "clients").iterdir())
        from safetensors.torch import load, save

        f.write_bytes(save(load(f.read_bytes()), metadata={"meta": "{broken"}))
    elif what == "clients-missing":
        shutil.rmtree(ck / "round_00002" / "clients")
    elif what == "latest-garbage":
        (ck / "latest").write_bytes(b"\xff\xfe garbage ../../etc")
    elif what == "latest-missing":
        (ck / "latest").unlink()
    elif what == "both":
        _truncate(ck / "round_00002" / "server.safetensors")
        _truncate(ck / "round_00001" / "rng.safetensors")
    else:  # pragma: no cover
        raise ValueError(what)


@pytest.mark.parametrize("what, picked, note", [
    ("server", "round_00001", "server.safetensors is truncated"),
    ("server-header", "round_00001", "server.safetensors"),
    ("rng", "round_00001", "rng.safetensors is truncated"),
    ("client", "round_00001", "client state"),
    ("client-meta", "round_00001", "malformed metadata"),
    ("clients-missing", "round_00001", "clients/ directory"),
    ("latest-garbage", "round_00002", "checkpoints/latest holds"),
    ("latest-missing", "round_00002", "checkpoints/latest is missing"),
    ("both", None, "round_00001: rng.safetensors is truncated"),
])
def test_damaged_checkpoints_are_detected_and_passed_over(run_copy, what, picked, note):
    from fedtune.checkpoint import find_resumable_checkpoint, verify_checkpoint

    assert verify_checkpoint(run_copy / "checkpoints" / "round_00002") is None
    _damage(run_copy, what)
    ckpt, notes = find_resumable_checkpoint(run_copy)
    assert (ckpt.name if ckpt else None) == picked
    assert any(note in n for n in notes), notes


def test_resume_falls_back_to_the_older_intact_checkpoint(world, run_copy, capsys):
    _damage(run_copy, "server")
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"round": 2, "kind": "rou')  # a line cut short by a kill mid-append
    code, out, err = _main(capsys, "run", world["cfg"], "--resume", run_copy, "-q")
    assert code == 0, err
    assert "Traceback" not in err
    rows = [json.loads(x) for x in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["kind"] == "round"] == [0, 1, 2]  # round 2 run again, once
    assert (run_copy / "checkpoints" / "latest").read_text() == "round_00002"
    from fedtune.checkpoint import verify_checkpoint

    assert verify_checkpoint(run_copy / "checkpoints" / "round_00002") is None  # rewritten intact


def test_resume_warns_when_it_falls_back(world, run_copy, capsys):
    """The warning lines themselves (verbose), on a resume that has nothing left to run."""
    _damage(run_copy, "rng")
    code, out, err = _main(capsys, "run", world["cfg"], "--resume", run_copy, "fl.rounds=1")
    assert code == 0, err
    assert "warning: round_00002" in out and "rng.safetensors is truncated" in out
    assert "resuming from the older intact checkpoint round_00001" in out


@pytest.mark.parametrize("config_text", ["", "{{{ not yaml", "train: {lr: 1}\ntrain: {lr: 2}\n", "[1, 2]",
                                         "train: {lrr: 1}\n"])
def test_damaged_saved_config_is_one_error_and_touches_nothing(world, run_copy, config_text, capsys):
    (run_copy / "config.yaml").write_text(config_text)
    before = _tree(run_copy)
    code, _, err = _main(capsys, "run", world["cfg"], "--resume", run_copy)
    assert code == 2
    _one_error(err, f"saved run config '{run_copy / 'config.yaml'}'")
    assert _tree(run_copy) == before


def test_no_intact_checkpoint_is_one_error_and_touches_nothing(world, run_copy, capsys):
    _damage(run_copy, "both")
    before = _tree(run_copy)
    code, _, err = _main(capsys, "run", world["cfg"], "--resume", run_copy)
    assert code == 2
    _one_error(err, "no intact checkpoint", "round_00002 (named by checkpoints/latest): server.safetensors is truncated",
               "round_00001: rng.safetensors is truncated")
    assert _tree(run_copy) == before


# ---- 1. run directories and concurrency (real processes) -----------------------------------------
_HOLDER = "import sys, time\nfrom fedtune.rundir_lock import RunDirLock\nRunDirLock(sys.argv[1]).acquire()\n" \
          "print('locked', flush=True)\ntime.sleep(600)\n"


@pytest.fixture
def holder(run_copy):
    """Another process holding ``run_copy``'s lock."""
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_copy)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert p.stdout.readline().strip() == "locked"
        yield p
    finally:
        p.kill()
        p.wait()


def test_a_second_writer_is_refused_naming_the_holder(world, run_copy, holder, capsys):
    from fedtune.rundir_lock import RunDirLock, holder_of

    before = _tree(run_copy)
    expect = [f"run directory {run_copy} is in use by pid {holder.pid}", socket.gethostname(), "started "]
    for argv in (["--resume", run_copy], [f"output.dir={run_copy}", "output.overwrite=true"],
                 [f"output.dir={run_copy}"]):
        code, _, err = _main(capsys, "run", world["cfg"], *argv)
        assert code == 2, argv
        _one_error(err, *expect)
        assert _tree(run_copy) == before, argv
    assert holder_of(run_copy)["pid"] == holder.pid
    # the holder dies without a word (kill -9): the kernel drops its flock; the next run takes over
    holder.kill()
    holder.wait()
    assert holder_of(run_copy) is None
    with RunDirLock(run_copy) as lock:
        assert lock.took_over["pid"] == holder.pid
        assert holder_of(run_copy)["pid"] == os.getpid()
    assert holder_of(run_copy) is None


def test_a_failed_set_up_takes_back_only_what_it_made(tmp_path):
    from fedtune.run import plan_run_dir
    from fedtune.rundir_lock import RunDirBusy

    cfg = load_config(None, [f"output.dir={tmp_path / 'a' / 'b' / 'run'}"])
    rd = plan_run_dir(cfg, None)
    with pytest.raises(RuntimeError), rd.setting_up(cfg):
        assert (tmp_path / "a" / "b" / "run" / "config.yaml").is_file()
        raise RuntimeError("set-up failed")
    assert list(tmp_path.iterdir()) == []  # the parents it made are gone too
    existing = tmp_path / "mine"
    (existing / "notes.txt").parent.mkdir()
    (existing / "notes.txt").write_text("keep me")
    cfg = load_config(None, [f"output.dir={existing}"])
    rd = plan_run_dir(cfg, None)
    with pytest.raises(RuntimeError), rd.setting_up(cfg):
        raise RuntimeError("set-up failed")
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]
    # two runs racing for one new directory: the one that does not get the lock deletes nothing
    cfg = load_config(None, [f"output.dir={tmp_path / 'race'}"])
    first, second = plan_run_dir(cfg, None), plan_run_dir(cfg, None)
    first.create(cfg)
    with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"), second.setting_up(cfg):
        pass
    assert (tmp_path / "race" / "config.yaml").is_file()
    first.commit()
    first.release()


def test_the_deployment_server_takes_the_same_lock(world, run_copy, holder):
    pytest.importorskip("flwr")
    from fedtune.flower.server_app import run_deployed
    from fedtune.rundir_lock import RunDirBusy

    before = _tree(run_copy)
    with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"):
        run_deployed(load_config(world["cfg"], [f"output.dir={run_copy}"]), grid=None, resume=str(run_copy))
    assert _tree(run_copy) == before


def test_two_real_runs_on_one_directory_then_sigterm(world, tmp_path, capsys):
    """A real `fedtune run` holds its directory; a second run or resume is refused with the holder's
    pid; SIGTERM ends the first cleanly (exit 143) and frees the directory."""
    from fedtune.rundir_lock import holder_of

    run_dir = tmp_path / "live"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune.cli", "run", str(world["cfg"]), f"output.dir={run_dir}", "fl.rounds=100000",
         "checkpoint.every=0", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").is_file():  # set up and past round 0: committed
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        assert holder_of(run_dir)["pid"] == proc.pid
        for argv in ([f"output.dir={run_dir}"], ["--resume", run_dir]):
            code, _, err = _main(capsys, "run", world["cfg"], *argv)
            assert code == 2
            _one_error(err, f"in use by pid {proc.pid}")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert "terminated; resume with --resume" in err and "Traceback" not in err
    assert holder_of(run_dir) is None
    rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "round"]
    assert rounds == list(range(len(rounds)))  # one writer: no interleaving, no restart


# ---- 6. the file system ---------------------------------------------------------------------------
def test_output_dir_below_a_regular_file(world, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = _main(capsys, "run", world["cfg"], f"output.dir={tmp_path / 'afile' / 'run'}")
    assert code == 2
    _one_error(err, "output.dir=", f"{tmp_path / 'afile'} is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    code, _, err = _main(capsys, "run", world["cfg"], f"output.dir={tmp_path / 'afile'}")
    assert code == 2
    _one_error(err, "is a file")


@pytest.mark.parametrize("argv", [["data", "describe", "fed-dolly", "--no-tokens", "--out", "F/x"],
                                  ["deploy", "certs", "--host", "10.0.0.1", "--out", "F/certs"]])
def test_other_commands_check_their_out_dir_first(argv, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = _main(capsys, *[a.replace("F", str(tmp_path / "afile")) for a in argv])
    assert code == 2
    _one_error(err, "--out=", "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_read_only_output_dir(world, tmp_path, capsys, monkeypatch):
    import fedtune.preflight as pf

    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:  # root ignores permission bits: simulated below for everyone
        ro.chmod(0o555)
        try:
            code, _, err = _main(capsys, "run", world["cfg"], f"output.dir={ro / 'run'}")
        finally:
            ro.chmod(0o755)
        assert code == 2
        _one_error(err, f"cannot write in {ro}")

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(pf.tempfile, "mkstemp", read_only)
    code, _, err = _main(capsys, "run", world["cfg"], f"output.dir={ro / 'run'}")
    assert code == 2
    _one_error(err, f"output.dir={ro / 'run'}", "the file system is read-only")
    assert list(ro.iterdir()) == []


def test_full_disk_before_the_run(world, tmp_path, capsys, monkeypatch):
    import fedtune.preflight as pf

    class Full:
        f_bavail, f_frsize = 1, 4096

    monkeypatch.setattr(pf.os, "statvfs", lambda p: Full())
    code, _, err = _main(capsys, "run", world["cfg"], f"output.dir={tmp_path / 'run'}")
    assert code == 2
    _one_error(err, "only 4.0 KB free")
    assert not (tmp_path / "run").exists()


def test_full_disk_in_the_middle_of_a_run_is_one_error():
    from fedtune.outcome import disk_errors

    with pytest.raises(FedtuneError, match="No space left.*--resume /r"):
        with disk_errors(Path("/r")):
            raise OSError(errno.ENOSPC, "No space left on device", "/r/checkpoints/x")
    with pytest.raises(ZeroDivisionError):  # anything else is a bug and keeps its traceback
        with disk_errors(Path("/r")):
            1 / 0  # noqa: B018


# ---- 5. a run that trained nothing --------------------------------------------------------------
def _rows(rejected: list[list[str | None]], steps=(3, 0)) -> list[dict]:
    rows = [{"round": 0, "kind": "round", "val_loss": 2.0}]
    for rnd, per_client in enumerate(rejected, 1):
        for i, why in enumerate(per_client):
            row = {"round": rnd, "kind": "client", "client": f"c{i}", "rejected": why}
            if why is None:
                row.update(steps=steps[0], skipped_nonfinite=steps[1])
            rows.append(row)
        rows.append({"round": rnd, "kind": "round", "clients": len(per_client),
                     "rejected": sum(w is not None for w in per_client)})
    return rows


def test_no_accepted_update_fails_naming_the_reasons():
    from fedtune.outcome import RunFailed, check_training_happened

    rows = _rows([["tensor 'a' holds NaN or Inf", "tensor 'a' holds NaN or Inf"], ["timed out", "tensor 'a' holds NaN or Inf"]])
    with pytest.raises(RunFailed) as e:
        check_training_happened(rows, Path("runs/x/adapter"))
    msg = str(e.value)
    assert "no client update was accepted in any of the 2 round(s)" in msg
    assert "tensor 'a' holds NaN or Inf (3x)" in msg and "timed out (1x)" in msg and "runs/x/adapter" in msg
    with pytest.raises(RunFailed, match="every local step of every client was skipped as non-finite \\(6 steps"):
        check_training_happened(_rows([[None, None]], steps=(3, 3)))


def test_partly_failed_runs_succeed_with_warnings():
    from fedtune.outcome import check_training_happened

    said = []
    check_training_happened(_rows([["boom", "boom"], [None, "boom"]]), echo=said.append)
    assert any("every client failed in round(s) 1" in s for s in said)
    assert any("client(s) c1 never contributed" in s for s in said)
    check_training_happened(_rows([]))  # round 0 only (e.g. a resume with nothing left to run)


def test_a_model_that_produces_nan_everywhere_fails_the_run(world, tmp_path, capsys):
    from fedtune.models import load_model

    model, tok = load_model(load_config(None, ["model.name=tiny-llama"]).model)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    nan_dir = tmp_path / "nan-model"
    model.save_pretrained(nan_dir)
    tok.save_pretrained(nan_dir)
    run_dir = tmp_path / "run"
    code, out, err = _main(capsys, "run", world["cfg"], f"model.name={nan_dir}", f"output.dir={run_dir}", "fl.rounds=1",
                         "eval.every=0")
    assert code == 2
    _one_error(err, "skipped as non-finite", "untrained")
    assert "done:" not in out


# ---- 7. the wire decoder without expect= ----------------------------------------------------------
def _hostile_topk(n: int = 2**31) -> bytes:
    from safetensors.torch import save

    spec = {"w": {"dtype": "float64", "shape": [n], "stages": [{"codec": "topk", "k": 1}]}}
    return save({"w::data": torch.zeros(1, dtype=torch.float64), "w::idx": torch.zeros(1, dtype=torch.int32)},
                metadata={"fedtune": json.dumps({"metrics": {}, "config": {}, "codecs": spec})})


def test_a_tiny_message_cannot_declare_a_huge_tensor():
    from fedtune.messages import decode

    data = _hostile_topk()
    assert len(data) < 400  # it would have allocated 16 GiB of float64 zeros
    with pytest.raises(MessageError, match="declare 2147483648 elements"):
        decode(data)
    assert decode(_hostile_topk(1000)).tensors["w"].shape == (1000,)  # small declared sizes still decode


def test_mutated_messages_only_raise_message_error_and_stay_bounded():
    from safetensors.torch import save

    from fedtune.codecs.base import build_pipeline
    from fedtune.config import CommConfig
    from fedtune.messages import Message, decode, encode

    rng = random.Random(13)
    seeds = []
    for up in ([], ["topk", "int8"], ["int4", "deflate"], ["topk", "int8", "gzip"]):
        pipe = build_pipeline(CommConfig(up=up, topk_fraction=0.05), "up")
        msg = Message({"a": torch.randn(16, 32), "b": torch.randn(7)}, metrics={"loss": 1.5}, config={"round": 2},
                      codec=pipe)
        seeds.append(encode(msg))
    for data in seeds:
        assert decode(data).tensors["a"].shape == (16, 32)

    def blow_up(data: bytes) -> bytes:
        """Rewrite the header: every declared size (shape, k, envelope size) multiplied."""
        from safetensors.torch import load

        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
        factor = rng.choice([2**20, 2**30, 2**40])
        if "fedtune_envelope" in meta:
            env = json.loads(meta["fedtune_envelope"])
            env["size"] *= factor
            return save(load(data), metadata={"fedtune_envelope": json.dumps(env)})
        body = json.loads(meta["fedtune"])
        for spec in body.get("codecs", {}).values():
            spec["shape"] = [s * factor for s in spec["shape"]]
            for st in spec["stages"]:
                if "k" in st and rng.random() < 0.5:
                    st["k"] = 1
        return save(load(data), metadata={"fedtune": json.dumps(body)})

    from fedtune.messages import _ELEMENTS_PER_BYTE, _ENVELOPE_ROOM, _EXPANSION, _FREE_ELEMENTS

    for i in range(400):
        data = bytearray(rng.choice(seeds))
        if i % 4 == 0:
            data = bytearray(blow_up(bytes(data)))
        else:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            out = decode(bytes(data))
        except MessageError:
            continue
        # bounded by the message itself: what it may expand to, times what coded parts may declare
        total = sum(t.numel() for t in out.tensors.values())
        assert total <= _ELEMENTS_PER_BYTE * (_EXPANSION * len(data) + _ENVELOPE_ROOM) + _FREE_ELEMENTS, total
        assert all(math.isfinite(float(t.float().abs().max())) for t in out.tensors.values() if t.numel())
