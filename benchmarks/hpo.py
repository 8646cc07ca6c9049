#!/usr/bin/env python
"""Federated HPO: how many client-rounds pruning saves against full-fidelity random search.

SmolLM2-135M-Instruct + LoRA on Fed-Dolly (8 clients by category, 2 sampled per round), CPU-sized;
the space is FS-LLM's appendix grid as ranges: learning rate (log), LoRA α, LoRA dropout. Strategies,
each on the same n configurations (optuna's random sampler with one seed draws the same
configurations in the same trial order in every study):

* ``random``: every configuration for the full budget (``fl.rounds``), no pruning;
* ``asha``: optuna's (asynchronous) successive halving on the round-by-round val loss;
* ``hyperband``: optuna's Hyperband over the same rounds;
* ``sync_sha``: synchronous successive halving, survivors continued from their checkpoints.

Budget is counted in client-rounds (one sampled client training one round). ``ratio`` = the
client-rounds random search spends until it has run its best configuration ÷ the client-rounds the
best pruning strategy spends until it has completed (at full budget) a configuration within 1% of
that objective (target ≥ 3). A strategy's cost is counted in the order it does its work (trials
one after another; sync_sha rung by rung).

The pruning strategies are **replayed** on the full-fidelity curves of the random study: optuna's
own pruners (and fedtune's synchronous halving rule) decide on exactly the round-by-round val
losses a pruned or continued run would log, because runs are deterministic and resume is exact
(tests/test_hpo.py checks a continued trial bit for bit). ``--quick`` (tiny random model, CI-sized)
runs every strategy for real through ``fedtune hpo`` as well and checks that the replay decides
exactly as the real studies did (``replay_matches_real``).

Usage::

    python benchmarks/hpo.py --study configs/hpo/fed-dolly.yaml   # replay on that study (run or resumed first)
    python benchmarks/hpo.py                                       # its own 9-configuration SmolLM2 study
    python benchmarks/hpo.py --quick                               # tiny model: real arms + replay check

(``FEDTUNE_DATA_DIR`` as for tests; progress on stderr, trial tables, one JSON object as the last
stdout line.)
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
PRUNING = ("asha", "hyperband", "sync_sha")


def study_dict(quick: bool, out: Path, arm: str, n: int, eta: int) -> dict:
    rounds = 2 if quick else 9
    return {
        "seed": 0,
        "model": {"name": "tiny-llama" if quick else "smollm2-135m-instruct"},
        "data": {"preset": "fed-dolly", "template": "alpaca", "max_length": 64 if quick else 96,
                 "max_records_per_client": 16 if quick else 40, "max_eval_records_per_client": 2,
                 "data_dir": data_dir()},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05},
        "train": {"optimizer": "adamw", "lr": 5e-4, "batch_size": 1, "local_steps": 2, "precision": "fp32",
                  "client_state": "memory"},
        "fl": {"rounds": rounds, "clients_per_round": 2},
        "eval": {"every": 1, "splits": ["val"], "batch_size": 8},
        "checkpoint": {"every": 1, "keep": 1},
        "output": {"tensorboard": False, "progress": False},
        "hpo": {"space": SPACE, "objective": "val_loss", "sampler": "random", "seed": 0, "n_trials": n,
                "pruner": "none" if arm == "random" else arm, "min_rounds": 1, "reduction_factor": eta,
                "study_name": f"bench-{arm}", "dir": str(out / arm)},
    }


# ---- replays ----------------------------------------------------------------------------------
def curves_of(study, ostudy) -> dict[int, dict[int, float]]:
    """Each complete trial's objective per round, from its run directory."""
    out = {}
    o = study.hpo.objective
    for t in sorted(ostudy.trials, key=lambda t: t.number):
        if t.state.name != "COMPLETE":
            continue
        f = study.dir / t.user_attrs["run_dir"] / "metrics.jsonl"
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        out[t.number] = {r["round"]: r[o] for r in rows if r.get("kind") == "round" and r.get(o) is not None}
    return out


def replay_optuna(arm: str, curves, rounds: int, eta: int, min_rounds: int, per_round: int, minimize: bool,
                  report_every: int = 1) -> list[dict]:
    """optuna's own pruner deciding on the recorded curves, trials one after another (the study name
    matters to Hyperband's bracket assignment: the one a real ``bench-<arm>`` study has)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=min_rounds, reduction_factor=eta) if arm == "asha"
              else optuna.pruners.HyperbandPruner(min_resource=min_rounds, max_resource=rounds, reduction_factor=eta))
    s = optuna.create_study(study_name=f"bench-{arm}", direction="minimize" if minimize else "maximize",
                            pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))
    rows = []
    for n in sorted(curves):
        c, t = curves[n], s.ask()
        for r in range(1, rounds):
            if r % report_every == 0 and r in c:
                t.report(c[r], r)
                if t.should_prune():
                    s.tell(t, state=optuna.trial.TrialState.PRUNED)
                    rows.append({"trial": n, "state": "pruned", "rounds": r, "client_rounds": r * per_round,
                                 "objective": c[r]})
                    break
        else:
            s.tell(t, c[rounds])
            rows.append({"trial": n, "state": "complete", "rounds": rounds, "client_rounds": rounds * per_round,
                         "objective": c[rounds]})
    return rows


def replay_sync(curves, rungs: list[int], eta: int, per_round: int, minimize: bool) -> list[dict]:
    """fedtune's synchronous successive halving (fedtune.hpo.study.Runner.sync_sha) on the curves."""
    sign = 1.0 if minimize else -1.0
    reached = {n: 0 for n in curves}
    alive = sorted(curves)
    for k, rung in enumerate(rungs):
        for n in alive:
            reached[n] = rung
        if k == len(rungs) - 1:
            break
        ranked = sorted(alive, key=lambda n: (sign * curves[n][rung], n))
        alive = ranked[: max(1, len(ranked) // eta)]
    final = rungs[-1]
    return [{"trial": n, "state": "complete" if n in alive else "pruned", "rounds": reached[n],
             "client_rounds": reached[n] * per_round, "objective": curves[n][reached[n]]} for n in sorted(curves)]


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


def _table(rows: list[dict], params: dict[int, dict]) -> str:
    from fedtune.hpo.report import markdown_table

    return markdown_table([{"trial": r["trial"], **params.get(r["trial"], {}), "state": r["state"],
                            "rounds": r["rounds"], "client_rounds": r["client_rounds"],
                            "val_loss": r["objective"]} for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized: tiny model, 4 configurations, 2 rounds, "
                    "every strategy run for real and replayed")
    ap.add_argument("--study", default=None, help="a study file (random sampler, no pruner): replay on its trials")
    ap.add_argument("--out", default=None, help="where the benchmark's own studies go (default: a temp dir)")
    ap.add_argument("--n", type=int, default=None, help="configurations (default 9; quick 4)")
    ap.add_argument("--eta", type=int, default=None, help="reduction factor (default 3; quick 2)")
    args = ap.parse_args()
    from fedtune.hpo import load_study, run_study
    from fedtune.hpo.report import trial_rows
    from fedtune.hpo.space import sync_rungs

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedtune-bench-hpo-"))
    n = args.n or (4 if args.quick else 9)
    mon = CpuMonitor()
    if args.study:
        study = load_study(args.study)
        if study.hpo.pruner != "none" or study.hpo.sampler != "random":
            sys.exit("--study needs a random-search study without a pruner (full-fidelity curves)")
        eta = args.eta or study.hpo.reduction_factor
    else:
        eta = args.eta or (2 if args.quick else 3)
        study = load_study(None, data=study_dict(args.quick, out, "random", n, eta))
    t0 = time.perf_counter()
    log(f"random: {study.n_trials} configurations × {study.base_cfg.fl.rounds} rounds in {study.dir}")
    res = run_study(study, verbose=False)  # a finished study: nothing runs again
    rounds = study.base_cfg.fl.rounds
    rand_rows = trial_rows(study, res.study)
    params = {r["trial"]: {d.key: r[d.key] for d in study.dims} for r in rand_rows}
    per_round = next(r["client_rounds"] // r["rounds"] for r in rand_rows if r["rounds"])
    curves = curves_of(study, res.study)
    minimize = study.direction == "minimize"
    rungs = sync_rungs(study.hpo.min_rounds, eta, rounds)
    arms = {"random": [{k: r[k] for k in ("trial", "state", "rounds", "client_rounds", "objective")}
                       for r in rand_rows if r["state"] == "complete"]}
    for arm in PRUNING:
        arms[arm] = (replay_sync(curves, rungs, eta, per_round, minimize) if arm == "sync_sha" else
                     replay_optuna(arm, curves, rounds, eta, study.hpo.min_rounds, per_round, minimize))
    summary = {"benchmark": "hpo", "quick": args.quick, "study": str(study.dir), "n_configs": len(curves),
               "rounds": rounds, "clients_per_round": per_round, "reduction_factor": eta, "rungs_sync": rungs}
    for k in ("spearman_rho", "rank_loss", "rank_score", "rank_trials"):
        if k in res.summary:
            summary[k] = res.summary[k]
    if args.quick:  # every strategy for real, through fedtune hpo; the replay must decide the same
        same = True
        for arm in PRUNING:
            s = load_study(None, data=study_dict(True, out, arm, n, eta))
            real = trial_rows(s, run_study(s, verbose=False).study)
            got = [(r["trial"], r["state"], r["rounds"], r["objective"]) for r in real]
            want = [(r["trial"], r["state"], r["rounds"], r["objective"]) for r in arms[arm]]
            if got != want:
                log(f"{arm}: the replay differs from the real study:\n  real   {got}\n  replay {want}")
                same = False
        summary["replay_matches_real"] = same
    best = min(arms["random"], key=lambda r: r["objective"] if minimize else -r["objective"])
    target = best["objective"] * (1.01 if minimize else 0.99)
    cost_random = next(c for t, c, v in events("random", arms["random"], rungs, per_round) if t == best["trial"])
    summary.update({"random_best_trial": best["trial"], "random_best_value": best["objective"],
                    "random_cost_to_best": cost_random, "target_value": target, "arms": {}})
    best_cost = None
    for arm, rows in arms.items():
        ev = events(arm, rows, rungs, per_round)
        hit = next((c for t, c, v in ev if v is not None and (v <= target if minimize else v >= target)), None)
        done = [r for r in rows if r["state"] == "complete"]
        b = min(done, key=lambda r: r["objective"] if minimize else -r["objective"])
        summary["arms"][arm] = {"best_trial": b["trial"], "best_value": b["objective"],
                                "client_rounds_total": sum(r["client_rounds"] for r in rows),
                                "client_rounds_to_within_1pct": hit,
                                "pruned": sum(r["state"] == "pruned" for r in rows)}
        print(f"\n### {arm}\n\n{_table(rows, params)}\n", flush=True)
        if arm != "random" and hit is not None and (best_cost is None or hit < best_cost[1]):
            best_cost = (arm, hit)
    summary["best_strategy"], summary["best_strategy_cost"] = best_cost if best_cost else (None, None)
    summary["ratio"] = round(cost_random / best_cost[1], 3) if best_cost else None
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary.update(mon.result())
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
