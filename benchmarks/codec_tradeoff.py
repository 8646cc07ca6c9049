#!/usr/bin/env python
"""Codec trade-off: bytes per client-round vs final held-out loss, one fedtune run per codec setting.

SmolLM2-135M-Instruct + LoRA (r=8) on Fed-Dolly (8 clients by category), CPU-sized: a few rounds of
a few local steps, capped records, every run with the same seed, data, sampling and schedule — only
``comm.*`` differs. Each run goes through :func:`fedtune.run.run`, so every byte counted is the
length of a real encoded message (up = the client's update, down = the global adapter broadcast).

Reported per setting: mean bytes per client-round (up + down, fit messages), the compression factor
against the fp32 run measured here, the final held-out (test) loss and its change relative to fp32,
and how much of fp32's loss improvement the setting kept. Headline ``ratio``: the compression
factor of the best setting whose final held-out loss is within 1% of the fp32 run's.

Usage: ``python benchmarks/codec_tradeoff.py [--quick]`` (``FEDTUNE_DATA_DIR`` as for tests; progress
on stderr, a table, and one JSON object as the last stdout line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, make_log  # benchmarks/_common.py

log = make_log("codec_tradeoff")


#: name -> comm overrides (block 64 and topk fraction 0.1 unless given).
SETTINGS: dict[str, dict] = {
    "fp32": {"up": [], "down": []},
    "deflate (lossless)": {"up": ["deflate"], "down": ["deflate"]},
    "fp16": {"up": ["fp16"], "down": ["fp16"]},
    "bf16": {"up": ["bf16"], "down": ["bf16"]},
    "int8": {"up": ["int8"], "down": ["int8"]},
    "int8+gzip": {"up": ["int8", "gzip"], "down": ["int8", "gzip"]},
    "int4": {"up": ["int4"], "down": ["int4"]},
    "int4+zstd": {"up": ["int4", "zstd"], "down": ["int4", "zstd"]},
    "int4+zstd, block 256": {"up": ["int4", "zstd"], "down": ["int4", "zstd"], "block_size": 256},
    "topk10%+int8+zstd no EF / int4+zstd": {"up": ["topk", "int8", "zstd"], "down": ["int4", "zstd"],
                                            "error_feedback": False},
    "topk10%+int8+zstd EF / int4+zstd": {"up": ["topk", "int8", "zstd"], "down": ["int4", "zstd"]},
}
QUICK = ["fp32", "int8+gzip", "int4+zstd"]


def base_config(quick: bool, out: Path) -> dict:
    return {
        "seed": 0,
        "model": {"name": "smollm2-135m-instruct"},
        "data": {"preset": "fed-dolly", "template": "alpaca", "max_length": 128,
                 "max_records_per_client": 40 if quick else 120, "max_eval_records_per_client": 3 if quick else 8,
                 "data_dir": os.environ.get("FEDTUNE_DATA_DIR") or str((REPO / ".." / "shared" / "data").resolve())},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"optimizer": "adamw", "lr": 2e-3, "batch_size": 2, "local_steps": 2 if quick else 3,
                  "precision": "bf16", "client_state": "memory"},
        "fl": {"rounds": 2 if quick else 3, "clients_per_round": 2 if quick else 3},
        # the final round only (the fp32 run also evaluates round 0: the untrained adapter)
        "eval": {"every": 0, "splits": ["test"]},
        "checkpoint": {"every": 0, "keep": 1},
        "comm": {"block_size": 64, "topk_fraction": 0.1},
        "output": {"dir": str(out), "tensorboard": False, "progress": False},
    }


def run_setting(name: str, comm: dict, quick: bool, root: Path) -> dict:
    from fedtune.config import config_from_dict
    from fedtune.run import run

    d = base_config(quick, root / f"run{len(list(root.iterdir()))}")
    d["comm"].update(comm)
    if name == "fp32":
        d["eval"]["every"] = d["fl"]["rounds"]
    t0 = time.perf_counter()
    res = run(config_from_dict(d), verbose=False)
    fits = [r for r in res.rows if r["kind"] == "client" and r.get("train_loss") is not None]
    rounds = [r for r in res.rows if r["kind"] == "round"]
    errs = [r["up_rel_error"] for r in fits if r.get("up_rel_error") is not None]
    return {
        "setting": name, "up": comm["up"], "down": comm["down"], "error_feedback": comm.get("error_feedback", True),
        "bytes_up": sum(r["bytes_up"] for r in fits) / len(fits),
        "bytes_down": sum(r["bytes_down"] for r in fits) / len(fits),
        "initial_loss": rounds[0]["test_loss"] if rounds[0]["round"] == 0 else None,
        "final_loss": rounds[-1]["test_loss"],
        "up_rel_error": sum(errs) / len(errs) if errs else 0.0,
        "seconds": time.perf_counter() - t0,
    }


def table(results: list[dict]) -> str:
    base = results[0]
    head = (f"{'setting':38} {'up B/client-round':>17} {'down B':>10} {'ratio':>6} {'test loss':>9} "
            f"{'vs fp32':>8} {'gain kept':>9} {'up err':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['setting']:38} {r['bytes_up']:17,.0f} {r['bytes_down']:10,.0f} {r['ratio']:6.1f} "
                     f"{r['final_loss']:9.4f} {r['loss_change_pct']:+7.2f}% {r['gain_kept_pct']:8.0f}% "
                     f"{r['up_rel_error']:7.3f}")
    lines.append(f"(test loss before training: {base['initial_loss']:.4f}; 'gain kept' = share of fp32's "
                 "loss drop this setting kept; 'up err' = mean relative error of the coded update)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized: fewer settings, rounds and records")
    ap.add_argument("--tolerance", type=float, default=0.01, help="held-out loss within this of fp32")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core box, 2 threads ran ~10x slower per step "
                         "than 1 when other processes competed; this benchmark measures bytes and loss, not time)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    import torch

    torch.set_num_threads(args.threads)
    names = QUICK if args.quick else list(SETTINGS)
    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="codec_tradeoff.") as tmp:
        root = Path(tmp)
        for i, name in enumerate(names):
            log(f"[{i + 1}/{len(names)}] {name}: up={SETTINGS[name]['up']} down={SETTINGS[name]['down']}")
            r = run_setting(name, SETTINGS[name], args.quick, root)
            log(f"    {r['bytes_up'] + r['bytes_down']:,.0f} B/client-round, test loss {r['final_loss']:.4f}, "
                f"{r['seconds']:.0f}s")
            results.append(r)
    base = results[0]
    fp32_bytes = base["bytes_up"] + base["bytes_down"]
    drop = base["initial_loss"] - base["final_loss"]
    for r in results:
        r["initial_loss"] = base["initial_loss"]  # same seed, same untrained adapter
        r["ratio"] = fp32_bytes / (r["bytes_up"] + r["bytes_down"])
        r["ratio_up"] = base["bytes_up"] / r["bytes_up"]
        r["loss_change_pct"] = (r["final_loss"] / base["final_loss"] - 1) * 100
        r["gain_kept_pct"] = (r["initial_loss"] - r["final_loss"]) / drop * 100 if drop > 0 else float("nan")
        r["within_tolerance"] = r["final_loss"] <= base["final_loss"] * (1 + args.tolerance)
    print(table(results))
    ok = [r for r in results if r["within_tolerance"]]
    best = max(ok, key=lambda r: r["ratio"])
    print(f"\nbest within {args.tolerance:.0%} of fp32's held-out loss: {best['setting']} "
          f"({best['ratio']:.1f}x fewer bytes per client-round; {args.tolerance:.0%} target ratio >= 8)")
    print(json.dumps({
        "benchmark": "codec_tradeoff", "quick": args.quick, "ratio": round(best["ratio"], 2),
        "best_setting": best["setting"], "tolerance": args.tolerance, "fp32_bytes_per_client_round": fp32_bytes,
        "fp32_final_loss": base["final_loss"], "initial_loss": base["initial_loss"],
        "minutes": round((time.perf_counter() - t0) / 60, 1),
        "settings": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in results],
    }))


if __name__ == "__main__":
    main()
