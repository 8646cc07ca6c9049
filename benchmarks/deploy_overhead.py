#!/usr/bin/env python
"""Deployment overhead: a federated round on Flower (SuperLink + 3 SuperNodes on loopback, TLS)
vs the same round in fedtune's in-process simulation, same config.

Config: SmolLM2-135M-Instruct + LoRA r=8, Fed-GSM8K-3 (3 iid clients), batch 1, fp32,
``--steps`` local steps per client per round, in-loop evaluation off (the last round evaluates
once; its time is reported but not in the ratio). Both arms are separate processes started the way a
user starts them: ``fedtune run`` for the simulation; ``fedtune deploy submit`` to a SuperLink with
3 ``fedtune deploy supernode`` (warm workers) for the deployment. The SuperLink and SuperNodes stay
up across deployment runs, as they would in production; each run still rebuilds the clients (a new
run config) during client discovery, before round 1.

The arms alternate (sim, deploy, deploy, sim, ...) ``--repeats`` times. Each run's round wall times
come from its ``metrics.jsonl`` (``seconds`` of rounds 1..R-1: sample, broadcast, local training,
collect, aggregate, log; the last round, which also evaluates, is excluded). ``ratio`` = median
deployment round time / median simulation round time. Because the deployment trains its clients at
once, the ratio can fall below 1 without Flower being free; ``*_exchange_not_training_s`` is the
per-message cost apart from training (exchange time seen by the server minus the client's own
training time), the figure that shows what Flower adds.

What differs between the arms on ONE machine: the deployment trains the 3 clients in 3 processes
at once (on 2 cores they contend; on real machines they would not — each SuperNode here gets
``cpu_count // 3`` torch threads, at least 1, as its share of the machine), and every message goes
through Flower (HTTP polling at the SuperLink, SuperNode and SuperExec, and a fresh
``flwr-clientapp`` process per message, which forwards the bytes to the node's warm worker).

Usage: ``python benchmarks/deploy_overhead.py [--quick]``; progress on stderr, one JSON object as
the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import data_dir, make_log  # benchmarks/_common.py

log = make_log("deploy_overhead")

NODES = ("client_0", "client_1", "client_2")


def round_seconds(run_dir: Path) -> tuple[list[float], float | None]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = sorted((r for r in rows if r["kind"] == "round" and r["round"] > 0), key=lambda r: r["round"])
    fit_only = [r["seconds"] for r in rounds[:-1]]
    return fit_only, rounds[-1]["seconds"] if rounds else None


def client_seconds(run_dir: Path) -> list[tuple[float, float]]:
    """Per fit exchange: (server-side exchange seconds, of which not local training). The second is
    what the transport costs per message, whatever the parallelism: in simulation encoding,
    decoding and client-state I/O; in deployment also Flower's polling, the per-message
    ``flwr-clientapp`` process and the hop to the node's warm worker."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["seconds"], r["seconds"] - r["step_seconds"] * r["steps"]) for r in rows
            if r["kind"] == "client" and r.get("seconds") and not r.get("rejected") and "steps" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized: 2 rounds x 4 steps, 1 repeat")
    ap.add_argument("--steps", type=int, default=None, help="local steps per client per round")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    steps = args.steps or (4 if args.quick else 20)
    rounds = args.rounds or (2 if args.quick else 4)
    repeats = args.repeats or (1 if args.quick else 2)

    from fedtune.flower.loopback import Deployment, wait_for_run

    work = Path(tempfile.mkdtemp(prefix="deploy_overhead-"))
    cfg_file = work / "cfg.yaml"
    cfg_file.write_text(f"""
seed: 0
model: {{name: smollm2-135m-instruct}}
data: {{preset: fed-gsm8k-3, data_dir: {data_dir()}, max_records_per_client: 200,
        max_eval_records_per_client: 8, max_length: 256}}
peft: {{method: lora, r: 8}}
train: {{batch_size: 1, local_steps: {steps}, lr: 3.0e-4}}
fl: {{rounds: {rounds}}}
eval: {{every: 0, splits: [val]}}
checkpoint: {{every: 0}}
output: {{tensorboard: false, progress: false}}
deploy: {{clients: {list(NODES)}, join_timeout_s: 600, round_timeout_s: 1800}}
""")
    env = dict(os.environ, FEDTUNE_DATA_DIR=data_dir())
    node_threads = max(1, (os.cpu_count() or 1) // len(NODES))
    log(f"SmolLM2 + LoRA, 3 clients, {steps} steps, {rounds} rounds, {repeats} repeat(s); work dir {work}")
    # warm the model and tokenisation caches once so neither arm pays for them
    subprocess.run([sys.executable, "-m", "fedtune.cli", "run", str(cfg_file), "fl.rounds=1",
                    "train.local_steps=1", f"output.dir={work / 'warm'}", "-q"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    sim_rounds: list[float] = []
    dep_rounds: list[float] = []
    sim_last, dep_last, sim_client, dep_client = [], [], [], []
    t_all = time.monotonic()
    with Deployment(work / "deploy") as dep:
        # Each SuperNode stands for an organisation's machine: on this one machine each gets its
        # share of the cores (3 nodes x torch's default of all cores each oversubscribes 2 cores
        # 3x, and batch-1 training then runs ~5x slower: measured 335 s vs 64 s rounds).
        dep.env.update(FEDTUNE_DATA_DIR=data_dir(), OMP_NUM_THREADS=str(node_threads))
        dep.start_superlink()
        for n in NODES:
            dep.start_supernode(n)
        order = []
        for i in range(repeats):
            order += [("sim", i), ("dep", i)] if i % 2 == 0 else [("dep", i), ("sim", i)]
        for arm, i in order:
            run_dir = work / f"{arm}-{i}"
            t0 = time.monotonic()
            if arm == "sim":
                subprocess.run([sys.executable, "-m", "fedtune.cli", "run", str(cfg_file),
                                f"output.dir={run_dir}", "-q"], env=env, check=True, stdout=subprocess.DEVNULL)
            else:
                dep.submit(cfg_file, [f"output.dir={run_dir}"])
                wait_for_run(run_dir, 7200, dep)
            fit, last = round_seconds(run_dir)
            (sim_rounds if arm == "sim" else dep_rounds).extend(fit)
            (sim_last if arm == "sim" else dep_last).append(last)
            (sim_client if arm == "sim" else dep_client).extend(client_seconds(run_dir))
            log(f"{arm} run {i}: rounds {[f'{s:.1f}' for s in fit]} s (+ last round with eval {last:.1f} s), "
                f"whole run {time.monotonic() - t0:.0f} s")
    sim_med, dep_med = statistics.median(sim_rounds), statistics.median(dep_rounds)
    ratio = dep_med / sim_med
    sim_x, dep_x = (statistics.median(x for x, _ in c) for c in (sim_client, dep_client))
    sim_o, dep_o = (statistics.median(o for _, o in c) for c in (sim_client, dep_client))
    print(f"\nround wall time (median over {len(sim_rounds)} rounds per arm, last round excluded)")
    print(f"  simulation (in-process)      {sim_med:8.1f} s   per client exchange {sim_x:6.1f} s, not training {sim_o:5.2f} s")
    print(f"  deployment (Flower, loopback){dep_med:8.1f} s   per client exchange {dep_x:6.1f} s, not training {dep_o:5.2f} s")
    print(f"  ratio deployment/simulation  {ratio:8.3f}   (target <= 1.15)")
    result = {
        "benchmark": "deploy_overhead", "ratio": round(ratio, 4), "target": 1.15,
        "threads_per_supernode": node_threads, "cpu_count": os.cpu_count(),
        "sim_round_s": round(sim_med, 2), "deploy_round_s": round(dep_med, 2),
        "sim_rounds_s": [round(x, 2) for x in sim_rounds], "deploy_rounds_s": [round(x, 2) for x in dep_rounds],
        "sim_last_round_s": [round(x, 2) for x in sim_last], "deploy_last_round_s": [round(x, 2) for x in dep_last],
        "sim_client_exchange_s": round(sim_x, 2), "deploy_client_exchange_s": round(dep_x, 2),
        # per fit exchange, the part that is not local training: the transport's own cost
        "sim_exchange_not_training_s": round(sim_o, 3), "deploy_exchange_not_training_s": round(dep_o, 3),
        "steps": steps, "rounds": rounds, "repeats": repeats, "clients": len(NODES), "quick": args.quick,
        "model": "smollm2-135m-instruct", "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
        "python": platform.python_version(), "wall_s": round(time.monotonic() - t_all, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
