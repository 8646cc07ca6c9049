"""``train.precision: auto`` / ``model.dtype: auto``: bf16 only where the hardware has it natively."""

import os

import pytest
import torch

import fedtune.hardware as H
from fedtune.config import load_config
from fedtune.hardware import KERNEL_CACHE_CAPACITY

CPU = torch.device("cpu")


@pytest.fixture
def flags(monkeypatch):
    def set_flags(*names):
        monkeypatch.setattr(H, "cpu_flags", lambda: frozenset(names))
        monkeypatch.setattr(H.platform, "machine", lambda: "x86_64")
    return set_flags


@pytest.mark.parametrize("cpu_flags, want", [
    (("avx2", "fma"), "fp32"),                      # AVX2-only EPYC: bf16 is emulated (~5x slower)
    (("avx512f", "avx512_bf16"), "bf16"),           # Zen 4 / Cooper Lake
    (("avx512f", "amx_tile", "amx_bf16"), "bf16"),  # Sapphire Rapids
    (("avx512f",), "fp32"),                         # AVX-512 without its bf16 extension
])
def test_auto_precision_follows_the_cpu_flags(flags, cpu_flags, want):
    flags(*cpu_flags)
    assert H.resolve_precision("auto", CPU) == want
    assert H.resolve_dtype("auto", "auto", CPU) == ("bfloat16" if want == "bf16" else "float32")


def test_named_precisions_and_dtypes_are_kept_as_written(flags):
    flags("amx_bf16")
    for p in ("fp32", "bf16", "fp16"):
        assert H.resolve_precision(p, CPU) == p
    assert H.resolve_dtype("float32", "auto", CPU) == "float32"
    # the base is stored in bf16 only when the run computes in bf16
    assert H.resolve_dtype("auto", "fp32", CPU) == "float32"
    assert H.resolve_dtype("auto", "bf16", CPU) == "bfloat16"


def test_cpu_flags_of_this_machine_agree_with_proc_cpuinfo():
    from pathlib import Path

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    line = next(ln for ln in text.splitlines() if ln.startswith("flags"))
    assert H.cpu_flags() == frozenset(line.split(":", 1)[1].split())


def test_runtime_config_resolves_a_copy_and_leaves_the_written_config_alone(flags):
    flags("avx512_bf16")
    cfg = load_config(None, ["train.precision=auto", "model.dtype=auto"])
    rt = H.runtime_config(cfg, CPU)
    assert (rt.train.precision, rt.model.dtype) == ("bf16", "bfloat16")
    assert (cfg.train.precision, cfg.model.dtype) == ("auto", "auto")
    ot = load_config(None, ["train.precision=auto", "model.dtype=auto", "offsite.enabled=true", "offsite.train=full"])
    assert H.runtime_config(ot, CPU).model.dtype == "float32"  # whole blocks train in fp32 inside the model
    plain = load_config(None, [])
    assert H.runtime_config(plain, CPU) is plain  # nothing to resolve: the same object
    assert "no native bf16" in H.describe_precision("auto", torch.device("mps"))


def test_a_run_with_auto_stores_the_base_in_bf16_where_bf16_is_native(tmp_path, flags, monkeypatch):
    """On a (pretend) bf16 CPU: the frozen base is bf16, the adapter fp32, config.yaml keeps
    ``auto``, and a crashed run resumes under the same config."""
    import yaml
    from test_e2e import _write_data, crash_then_resume

    from fedtune.run import build_adapter_model

    flags("amx_bf16")
    data = _write_data(tmp_path / "toy.jsonl", n_per_cat=7)
    cfg = load_config(None, [
        "model.name=tiny-llama", f"data.source={data}", "data.splitter=meta", "data.num_clients=2",
        "data.label_field=category", "data.max_length=32", f"data.cache_dir={tmp_path / 'tok'}",
        "train.local_steps=1", "fl.rounds=2", "train.precision=auto", "model.dtype=auto",
        "eval.splits=[val]", "checkpoint.every=1", f"output.dir={tmp_path / 'run'}",
        "output.tensorboard=false"])
    am = build_adapter_model(H.runtime_config(cfg, CPU))
    params = list(am.model.named_parameters())
    assert {p.dtype for _, p in params if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for _, p in params if p.requires_grad} == {torch.float32}

    res = crash_then_resume(monkeypatch, cfg, tmp_path / "run", 2)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["precision"] == "auto" and saved["model"]["dtype"] == "auto"
    rounds = [r for r in res.rows if r["kind"] == "round"]
    assert [r["round"] for r in rounds][-1] == 2 and all(r["val_loss"] == r["val_loss"] for r in rounds)


def test_kernel_caches_are_capped_before_the_first_matmul_and_a_users_value_is_kept():
    """oneDNN and ideep read their cache capacities once, at the process's first matmul: a fresh
    `fedtune` process has them capped by then; a value the user exported is left alone."""
    import subprocess
    import sys

    code = ("import os, sys\nfrom fedtune.cli import main\nsys.argv = ['fedtune', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'), os.environ.get('LRU_CACHE_CAPACITY'))")
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY",
                                                             "DNNL_PRIMITIVE_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == [str(KERNEL_CACHE_CAPACITY)] * 2
    out = subprocess.run([sys.executable, "-c", code], env={**env, "LRU_CACHE_CAPACITY": "7",
                                                            "DNNL_PRIMITIVE_CACHE_CAPACITY": "5"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["None", "7"]
