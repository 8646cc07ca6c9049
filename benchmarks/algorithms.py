#!/usr/bin/env python
"""The algorithm zoo under strong heterogeneity: held-out loss and round time per algorithm.

SmolLM2-135M-Instruct + LoRA (r=8) on Fed-Dolly split over 6 clients by a Dirichlet(α = 0.1)
draw over the category (so each client sees mostly one or two kinds of instruction), CPU-sized.
Every algorithm gets the same budget — the same seed, data, client split, rounds, local steps,
batch size and learning-rate schedule; only ``fl.algorithm`` differs, each with its default options
— and goes through :func:`fedtune.run.run` like any user run.

Reported per algorithm: the final held-out (test) loss pooled over the clients, the mean of the
clients' test losses, the change against the untrained adapter, the mean round time (training,
aggregation and evaluation) and the bytes per client-round. Headline ``ratio``: the best
algorithm's final held-out loss ÷ FedAvg's (< 1: something beats FedAvg here); also
``scaffold_round_time_ratio``: SCAFFOLD's mean round time ÷ FedAvg's (it trains with a gradient
hook and sends a second adapter-sized group each way; it should stay within 1.1).

Usage: ``python benchmarks/algorithms.py [--quick] [--algorithms a,b,...]`` (``FEDTUNE_DATA_DIR``
as for tests; progress on stderr, a table, one JSON object as the last stdout line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import CpuMonitor, data_dir, make_log  # benchmarks/_common.py

log = make_log("algorithms")

ALL = ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "median",
       "trimmed_mean", "krum", "multi_krum", "norm_bounding"]
QUICK = ["fedavg", "fedprox", "scaffold", "median"]


def base_config(quick: bool, out: Path) -> dict:
    return {
        "seed": 0,
        "model": {"name": "smollm2-135m-instruct"},
        "data": {"preset": "fed-dolly", "splitter": "dirichlet", "num_clients": 6, "alpha": 0.1,
                 "label_field": "category", "min_client_size": 20, "template": "alpaca", "max_length": 128,
                 "max_records_per_client": 60 if quick else 80, "max_eval_records_per_client": 4 if quick else 8,
                 "data_dir": data_dir()},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        # fp32: on CPUs without native bf16 (AVX-512 BF16 / AMX) bf16 autocast is far slower here
        "train": {"optimizer": "adamw", "lr": 1e-3, "batch_size": 2, "local_steps": 2,
                  "precision": "fp32", "client_state": "memory", "scheduler": "constant"},
        "fl": {"rounds": 2 if quick else 3},
        # held-out loss before training and after the last round only: round times are then the
        # training, messages and aggregation each algorithm costs (what SCAFFOLD's ratio compares)
        "eval": {"every": 2 if quick else 3, "splits": ["val", "test"], "batch_size": 8},
        "checkpoint": {"every": 0, "keep": 1},
        "output": {"dir": str(out), "tensorboard": False, "progress": False, "overwrite": True},
    }


def run_one(name: str, quick: bool, root: Path) -> dict:
    from fedtune.config import config_from_dict
    from fedtune.run import run

    d = base_config(quick, root / name)
    d["fl"]["algorithm"] = name
    t0 = time.perf_counter()
    res = run(config_from_dict(d), verbose=False)
    wall = time.perf_counter() - t0
    rounds = [r for r in res.rows if r["kind"] == "round"]
    trained = [r for r in rounds if r["round"] > 0]
    fits = [r for r in res.rows if r["kind"] == "client" and r.get("train_loss") is not None]
    first = next(r for r in rounds if r.get("test_loss") is not None)
    return {
        "algorithm": name,
        "test_loss": res.final("test_loss"), "test_loss_mean_of_clients": res.final("test_loss_mean_of_clients"),
        "val_loss": res.final("val_loss"), "test_loss_before": first["test_loss"],
        "round_s": statistics.mean(r["seconds"] for r in trained),
        "train_s_per_client_round": statistics.mean(r.get("train_seconds", 0.0) for r in fits),
        "bytes_per_client_round": statistics.mean(r["bytes_down"] + r["bytes_up"] for r in fits),
        "rejected": sum(r.get("rejected") or 0 for r in trained), "wall_s": wall,
    }


def table(results: list[dict]) -> str:
    head = f"{'algorithm':<14} {'test loss':>9} {'mean/client':>11} {'vs start':>8} {'round s':>8} {'MB/client-round':>15}"
    lines = [head, "-" * len(head)]
    for r in results:
        change = (r["test_loss"] / r["test_loss_before"] - 1) * 100
        lines.append(f"{r['algorithm']:<14} {r['test_loss']:>9.4f} {r['test_loss_mean_of_clients']:>11.4f} "
                     f"{change:>+7.2f}% {r['round_s']:>8.1f} {r['bytes_per_client_round'] / 1e6:>15.2f}")
    return "\n".join(lines)


def _load_results(path: str | None, quick: bool) -> dict[str, dict]:
    """Results an earlier (interrupted) invocation kept in ``path``, by algorithm."""
    if not path or not Path(path).is_file():
        return {}
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {r["algorithm"]: {k: v for k, v in r.items() if k != "quick"} for r in rows if r.get("quick") == quick}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized: 4 algorithms, 2 rounds of 2 local steps (full: 12, 3 rounds)")
    ap.add_argument("--algorithms", default=None, help="comma-separated subset (default: all, or the quick set)")
    ap.add_argument("--results", default=None, metavar="FILE.jsonl",
                    help="keep each algorithm's result here as it finishes; a rerun skips those already in it "
                         "(same --quick), so an interrupted benchmark continues")
    args = ap.parse_args(argv)
    names = args.algorithms.split(",") if args.algorithms else (QUICK if args.quick else ALL)
    if "fedavg" not in names:
        names = ["fedavg", *names]
    mon = CpuMonitor()
    results = []
    done = _load_results(args.results, args.quick)
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-alg-") as tmp:
        for name in names:
            if name in done:
                log(f"{name}: kept from {args.results}")
                results.append(done[name])
                continue
            log(f"{name} ...")
            r = run_one(name, args.quick, Path(tmp))
            log(f"{name}: test loss {r['test_loss']:.4f}, {r['round_s']:.1f}s per round")
            results.append(r)
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps({**r, "quick": args.quick}) + "\n")
    print(table(results))
    by = {r["algorithm"]: r for r in results}
    best = min(results, key=lambda r: r["test_loss"])
    out = {"benchmark": "algorithms", "quick": args.quick, "ratio": round(best["test_loss"] / by["fedavg"]["test_loss"], 4),
           "best": best["algorithm"],
           "scaffold_round_time_ratio": (round(by["scaffold"]["round_s"] / by["fedavg"]["round_s"], 3)
                                         if "scaffold" in by else None),
           "results": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in results],
           **mon.result()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
