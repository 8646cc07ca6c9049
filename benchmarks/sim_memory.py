#!/usr/bin/env python
"""Simulation memory: peak RSS of a fedtune run with 1, 8 and 64 clients on SmolLM2-135M.

Each configuration runs in a fresh subprocess (so peaks never mix) through :func:`fedtune.run.run`:
Dolly records split iid into N clients, SmolLM2-135M-Instruct + LoRA r=8, every client trains
one local step per round for two rounds (the second round reloads each client's optimizer state)
at batch 1 with ``max_length`` 64; fedtune's default client state handling
(``train.client_state=disk``). The same runs with ``train.client_state=memory`` are
reported for comparison. ``ratio`` = peak RSS(64 clients, disk) / peak RSS(1 client, disk).

Peak RSS is the process's ``ru_maxrss`` (everything the OS counts: model, data, allocator slack).
To show where a peak comes from, the child also records ``ru_maxrss`` and the current RSS at a few
points: when ``Server.run`` starts (model, data and adapter built), after each round's training
and aggregation, around the final evaluation (``run`` always evaluates after the last round) and
around the final checkpoint. These are read through wrappers on ``Server`` methods; fedtune's own
code runs unchanged.

``--quick`` runs 1 and 64 clients, one round, disk state only.

Usage: ``python benchmarks/sim_memory.py [--quick]``; progress on stderr, one JSON object as the
last stdout line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import data_dir, make_log  # benchmarks/_common.py

log = make_log("sim_memory")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def child(args) -> None:
    """One configuration in this (fresh) process; prints one JSON line."""
    import fedtune.run as fr
    from fedtune.config import config_from_dict
    from fedtune.server import Server

    marks: list[dict] = []
    t_child = time.perf_counter()

    def mark(label: str) -> None:
        marks.append({"at": label, "t_s": round(time.perf_counter() - t_child, 1),
                      "peak_rss_mb": round(_peak_mb(), 1), "rss_mb": round(_rss_mb(), 1)})

    def wrap(name: str, before: str | None, after: str):
        orig = getattr(Server, name)

        def w(self, *a, **kw):
            if before:
                mark(before.format(*a))
            out = orig(self, *a, **kw)
            mark(after.format(*a))
            return out

        setattr(Server, name, w)

    mark("imports")
    wrap("run", "server.run start (model+data+adapter built)", "server.run end")
    wrap("run_round", None, "after round {0}")
    wrap("evaluate", "evaluate start (round {0})", "evaluate end (round {0})")
    wrap("checkpoint", "checkpoint start (round {0})", "checkpoint end (round {0})")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedtune-mem-") as tmp:
        cfg = config_from_dict({
            "seed": 0,
            "model": {"name": "smollm2-135m-instruct"},
            "data": {"source": "dolly", "data_dir": data_dir(), "splitter": "iid", "num_clients": args.clients,
                     "max_length": args.max_length, "max_records_per_client": args.records,
                     "max_eval_records_per_client": 2},
            "peft": {"method": "lora", "r": 8},
            "train": {"local_steps": args.steps, "batch_size": 1, "precision": "fp32",
                      "client_state": args.client_state},
            "fl": {"rounds": args.rounds},
            "eval": {"every": 0, "splits": ["val"]},
            "checkpoint": {"every": 0},
            "output": {"dir": str(Path(tmp) / "run"), "progress": False},
        })
        with contextlib.redirect_stdout(sys.stderr):
            res = fr.run(cfg, verbose=False)
        state_dir = Path(tmp) / "run" / "state" / "clients"
        state_bytes = sum(p.stat().st_size for p in state_dir.glob("*.safetensors")) if state_dir.is_dir() else 0
    mark("run returned")
    rounds = [r for r in res.rows if r.get("kind") == "round" and r.get("round", 0) > 0]
    out = {
        "clients": args.clients, "client_state": args.client_state,
        "peak_rss_mb": round(_peak_mb(), 1),
        "round_rows_peak_rss_mb": [r.get("peak_rss_mb") for r in rounds],
        "marks": marks,
        "client_state_files_bytes": state_bytes,
        "bytes_up_last_round": rounds[-1].get("bytes_up") if rounds else None,
        "train_tokens": sum(r.get("train_tokens", 0) for r in rounds),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out), flush=True)


def run_child(n: int, state: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--clients", str(n), "--client-state", state,
           "--rounds", str(args.rounds), "--steps", str(args.steps), "--max-length", str(args.max_length),
           "--records", str(args.records)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"child {n} clients / {state} failed with exit code {p.returncode}")
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.strip()]
    out = json.loads(lines[-1])
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    ap.add_argument("--clients-list", default=None, help="client counts to simulate (default 1,8,64; quick 1,64)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per run (default 2; quick 1)")
    ap.add_argument("--steps", type=int, default=1, help="local steps per client per round")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--records", type=int, default=8, help="training records per client")
    ap.add_argument("--no-memory-state", action="store_true",
                    help="skip the client_state=memory comparison (always skipped with --quick)")
    # internal: one configuration in a fresh process
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--client-state", default="disk", choices=["disk", "memory"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.clients_list = args.clients_list or ("1,64" if args.quick else "1,8,64")
    if args.quick:
        args.no_memory_state = True
    if args.child:
        child(args)
        return

    t_start = time.perf_counter()
    counts = [int(x) for x in args.clients_list.split(",")]
    states = ["disk"] + ([] if args.no_memory_state else ["memory"])
    results: dict[str, dict[int, dict]] = {s: {} for s in states}
    for state in states:
        for n in counts:
            log(f"{n} clients, client_state={state}: fresh subprocess ({args.rounds} rounds x {args.steps} steps, "
                f"max_length {args.max_length})")
            r = run_child(n, state, args)
            results[state][n] = r
            log(f"  peak RSS {r['peak_rss_mb']:.0f} MB (rounds: {r['round_rows_peak_rss_mb']}), {r['wall_s']:.0f} s")
    disk = results["disk"]
    lo, hi = min(counts), max(counts)
    ratio = disk[hi]["peak_rss_mb"] / disk[lo]["peak_rss_mb"]
    out = {
        "benchmark": "sim_memory",
        "ratio": round(ratio, 4),
        "ratio_definition": f"peak RSS({hi} clients) / peak RSS({lo} client), client_state=disk",
        "target": "<= 1.15",
        "meets_target": ratio <= 1.15,
        "quick": args.quick,
        "peak_rss_mb": {s: {str(n): results[s][n]["peak_rss_mb"] for n in counts} for s in states},
        "ratio_by_state": {s: round(results[s][hi]["peak_rss_mb"] / results[s][lo]["peak_rss_mb"], 4) for s in states},
        "runs": {s: {str(n): results[s][n] for n in counts} for s in states},
        "settings": {
            "model": "smollm2-135m-instruct", "peft": "lora r=8 (fedtune default targets)",
            "data": "dolly, iid split into N clients", "records_per_client": args.records,
            "max_eval_records_per_client": 2, "eval_splits": ["val"], "rounds": args.rounds,
            "local_steps": args.steps, "batch_size": 1, "precision": "fp32", "max_length": args.max_length,
            "eval_every": 0, "checkpoint_every": 0, "fresh_subprocess_per_config": True,
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
        },
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
