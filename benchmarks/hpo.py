#!/usr/bin/env python
"""Federated HPO: how many client-rounds pruning saves against full-fidelity random search.

SmolLM2-135M-Instruct + LoRA on Fed-Dolly (8 clients by category, 2 sampled per round), CPU-sized.
The space is FS-LLM's appendix grid as ranges: learning rate (log), LoRA α, LoRA dropout. Four
strategies search it through ``fedtune hpo`` (:func:`fedtune.hpo.run_study`), each a study of its
own on the same n configurations (the random sampler with one seed draws the same configurations
in the same trial order in every study):

* ``random``: every configuration for the full budget (fl.rounds), no pruning;
* ``asha``: optuna's (asynchronous) successive halving on the round-by-round val loss;
* ``hyperband``: optuna's Hyperband over the same rounds;
* ``sync_sha``: synchronous successive halving, survivors continued from their checkpoints.

Budget is counted in client-rounds (one sampled client training one round). ``ratio`` = the
client-rounds random search spends until it has run its best configuration ÷ the client-rounds the
best pruning strategy spends until it has completed (at full budget) a configuration within 1% of
that objective (target ≥ 3). A strategy's cost is counted in the order it does its work (sequential
trials; for sync_sha rung by rung). Also checked: a pruned or continued trial's val loss curve is
bit-identical to the same configuration's full run (runs are deterministic; resume is exact).

Usage: ``python benchmarks/hpo.py [--quick] [--out DIR] [--n N]`` (``FEDTUNE_DATA_DIR`` as for
tests; progress on stderr, trial tables, one JSON object as the last stdout line).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import CpuMonitor, data_dir, make_log  # benchmarks/_common.py

log = make_log("hpo")

SPACE = {
    "train.lr": {"type": "float", "low": 1.0e-4, "high": 3.0e-3, "log": True},
    "peft.alpha": [8, 16, 32, 64],
    "peft.dropout": {"type": "float", "low": 0.0, "high": 0.2},
}
ARMS = ("random", "asha", "hyperband", "sync_sha")


def study_dict(quick: bool, out: Path, arm: str, n: int, task: str | None = None, task_limit: int = 40) -> dict:
    rounds = 2 if quick else 9
    # the task score (random search only: the pruning arms need no more than the val loss) is
    # logged after the last round (and at round 0), for the rank comparison of FS-LLM Fig. 5(b)
    tasks = {"tasks": [task], "task_limit": task_limit, "task_every": rounds} if task and arm == "random" else {}
    return {
        "seed": 0,
        "model": {"name": "smollm2-135m-instruct"},
        "data": {"preset": "fed-dolly", "template": "alpaca", "max_length": 128,
                 "max_records_per_client": 24 if quick else 40, "max_eval_records_per_client": 3,
                 "data_dir": data_dir()},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05},
        "train": {"optimizer": "adamw", "lr": 5e-4, "batch_size": 2, "local_steps": 2, "precision": "fp32",
                  "client_state": "memory"},
        "fl": {"rounds": rounds, "clients_per_round": 2},
        "eval": {"every": 1, "splits": ["val"], "batch_size": 8, **tasks},
        "checkpoint": {"every": 1, "keep": 1},
        "output": {"tensorboard": False, "progress": False},
        "hpo": {"space": SPACE, "objective": "val_loss", "sampler": "random", "seed": 0, "n_trials": n,
                "pruner": "none" if arm == "random" else arm, "min_rounds": 1,
                "reduction_factor": 2 if quick else 3, "study_name": f"bench-{arm}", "dir": str(out / arm)},
    }


def events(arm: str, rows: list[dict], rungs: list[int], per_round: int) -> list[tuple[int, int, float | None]]:
    """(trial, client-rounds spent so far, objective if this event completes the trial at full
    budget) in the order the strategy does its work."""
    out, spent = [], 0
    if arm != "sync_sha":
        for r in rows:
            spent += int(r["client_rounds"])
            out.append((r["trial"], spent, r["objective"] if r["state"] == "complete" else None))
        return out
    prev = 0
    for k, rung in enumerate(rungs):  # rung by rung: every trial that reached this rung ran prev -> rung
        for r in rows:
            if r["rounds"] >= rung:
                spent += (rung - prev) * per_round
                done = k == len(rungs) - 1 and r["state"] == "complete"
                out.append((r["trial"], spent, r["objective"] if done else None))
        prev = rung
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized: 3 configurations, 2 rounds")
    ap.add_argument("--out", default=None, help="where the studies go (default: a temp dir)")
    ap.add_argument("--n", type=int, default=None, help="configurations per study (default 9; quick 3)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--task", default=None, help="a task score logged for the random-search trials (e.g. "
                    "openbookqa): the study then also plots rank by val loss vs rank by that score")
    ap.add_argument("--task-limit", type=int, default=40)
    args = ap.parse_args()
    from fedtune.hpo import load_study, run_study
    from fedtune.hpo.report import markdown_table, trial_rows
    from fedtune.hpo.space import sync_rungs

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedtune-bench-hpo-"))
    n = args.n or (3 if args.quick else 9)
    arms = [a for a in args.arms.split(",") if a]
    mon = CpuMonitor()
    results, tables, curves, summary_rho = {}, {}, {}, {}
    for arm in arms:
        study = load_study(None, data=study_dict(args.quick, out, arm, n, args.task, args.task_limit))
        t0 = time.perf_counter()
        log(f"{arm}: {n} configurations, up to {study.base_cfg.fl.rounds} rounds, in {study.dir}")
        res = run_study(study, verbose=False)
        rows = trial_rows(study, res.study)
        rungs = sync_rungs(study.hpo.min_rounds, study.hpo.reduction_factor, study.base_cfg.fl.rounds)
        ev = events(arm, rows, rungs, per_round=2)
        tables[arm] = markdown_table([{k: v for k, v in r.items() if k != "run_dir"} for r in rows])
        curves[arm] = {}
        for r in rows:
            f = study.dir / r["run_dir"] / "metrics.jsonl"
            if f.is_file():
                curves[arm][r["trial"]] = {x["round"]: x["val_loss"] for x in map(json.loads, f.read_text().splitlines())
                                           if x.get("kind") == "round" and x.get("val_loss") is not None}
        best = min((r for r in rows if r["state"] == "complete"), key=lambda r: r["objective"])
        if arm == "random" and res.summary.get("spearman_rho") is not None:
            summary_rho = {k: res.summary[k] for k in ("spearman_rho", "rank_loss", "rank_score", "rank_trials")}
            log(f"random: Spearman's rho(rank by val loss, rank by {summary_rho['rank_score']}) = "
                f"{summary_rho['spearman_rho']:.3f}; plots in {study.dir}")
        results[arm] = {"rows": rows, "events": ev, "best_trial": best["trial"], "best_value": best["objective"],
                        "client_rounds": sum(int(r["client_rounds"]) for r in rows),
                        "seconds": round(time.perf_counter() - t0, 1)}
        log(f"{arm}: best trial {best['trial']} val_loss {best['objective']:.4f}, "
            f"{results[arm]['client_rounds']} client-rounds, {results[arm]['seconds']:.0f}s")
        print(f"\n### {arm}\n\n{tables[arm]}\n", flush=True)

    summary = {"benchmark": "hpo", "quick": args.quick, "n_configs": n, "arms": {}}
    summary.update(summary_rho)
    if "random" in results:
        rnd = results["random"]
        target = rnd["best_value"] * 1.01
        cost_random = next(c for t, c, v in rnd["events"] if t == rnd["best_trial"])
        summary.update({"random_best_trial": rnd["best_trial"], "random_best_value": rnd["best_value"],
                        "random_cost_to_best": cost_random, "target_value": target})
        best_cost = None
        for arm, r in results.items():
            hit = next((c for t, c, v in r["events"] if v is not None and v <= target), None)
            summary["arms"][arm] = {"best_trial": r["best_trial"], "best_value": r["best_value"],
                                    "client_rounds_total": r["client_rounds"], "client_rounds_to_within_1pct": hit,
                                    "seconds": r["seconds"]}
            if arm != "random" and hit is not None and (best_cost is None or hit < best_cost[1]):
                best_cost = (arm, hit)
        if best_cost is not None:
            summary["best_strategy"], summary["best_strategy_cost"] = best_cost
            summary["ratio"] = round(cost_random / best_cost[1], 3)
        else:
            summary["ratio"] = None
        # determinism: a pruned / continued trial's curve equals the same configuration's full run
        same = True
        for arm in results:
            for trial, curve in curves[arm].items():
                full = curves["random"].get(trial, {})
                same &= all(full.get(k) == v for k, v in curve.items())
        summary["curves_identical_to_full_runs"] = same
    summary.update(mon.result())
    summary["out"] = str(out)
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
