"""What a study leaves behind: the trial table, the best configuration as a runnable YAML, plots
(optimisation history, parameter importance, and FS-LLM's Fig. 5(b): rank by validation loss
against rank by task score, with Spearman's ρ) and a summary.

Files in the study directory: ``trials.csv``, ``trials.md``, ``best.yaml``, ``summary.json``,
``history.png``, ``importance.png``, ``ranks.png`` (the last when the trials have both a
validation loss and a task score).
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from fedtune.hpo.space import Study, set_key
from fedtune.utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank (as Spearman's ρ needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation: Pearson's r of the ranks (``None`` below 3 points or no spread)."""
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def trial_rows(study: Study, ostudy) -> list[dict[str, Any]]:
    """One row per trial: number, state, params, objective, rounds, client-rounds, seconds, the
    final val/test loss and task scores, its run directory."""
    rows = []
    shown = ("_loss", *_task_metrics(study))
    for t in sorted(ostudy.get_trials(deepcopy=False), key=lambda t: t.number):
        final = t.user_attrs.get("final", {}) or {}
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name.lower()}
        for d in study.dims:
            row[d.key] = t.params.get(d.key)
        row["objective"] = t.value if t.value is not None else final.get(study.hpo.objective)
        row["rounds"] = t.user_attrs.get("rounds", 0)
        row["client_rounds"] = t.user_attrs.get("client_rounds", 0)
        row["seconds"] = round(float(t.user_attrs.get("seconds", 0.0)), 1)
        for k in sorted(final):  # the other losses and every task score (perplexities add nothing)
            if k != study.hpo.objective and k.endswith(shown) \
                    and not k.endswith("_mean_of_clients"):
                row[k] = final[k]
        row["run_dir"] = t.user_attrs.get("run_dir", "")
        if t.user_attrs.get("error"):
            row["error"] = t.user_attrs["error"]
        rows.append(row)
    return rows


def _cell(v: Any, col: str = "") -> str:
    if v is None:
        return "-"
    if col == "seconds":
        return f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)"
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and k != "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c), c) for c in cols) + " |")
    return "\n".join(lines)


def best_config(study: Study, ostudy) -> dict[str, Any] | None:
    try:
        best = ostudy.best_trial
    except ValueError:
        return None
    d = copy.deepcopy(study.base)
    for k, v in best.params.items():
        set_key(d, k, v)
    out = d.setdefault("output", {})
    out["dir"] = str(study.dir / "best")
    out["name"] = f"{study.name}-best"
    return d


def write_outputs(study: Study, ostudy, echo) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write every output file; returns their paths and the summary."""
    d = study.dir
    d.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study, ostudy)
    files: dict[str, Path] = {}
    if rows:
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(d / "trials.csv", buf.getvalue())
        atomic_write_text(d / "trials.md", markdown_table(rows) + "\n")
        files["trials.csv"], files["trials.md"] = d / "trials.csv", d / "trials.md"
    summary: dict[str, Any] = {"study": study.name, "storage": _redact(study.hpo.storage) or str(d / "study.db"),
                               "objective": study.hpo.objective, "direction": study.direction,
                               "sampler": study.hpo.sampler, "pruner": study.hpo.pruner,
                               "trials": len(rows), "states": {}}
    for r in rows:
        summary["states"][r["state"]] = summary["states"].get(r["state"], 0) + 1
    summary["client_rounds"] = sum(int(r["client_rounds"] or 0) for r in rows)
    summary["seconds"] = round(sum(float(r["seconds"] or 0) for r in rows), 1)
    best = best_config(study, ostudy)
    if best is not None:
        b = ostudy.best_trial
        header = (f"# best trial {b.number} of study '{study.name}': {study.hpo.objective} = {b.value:.6g}\n"
                  f"# run it: fedtune run {d / 'best.yaml'}\n")
        atomic_write_text(d / "best.yaml", header + yaml.safe_dump(best, sort_keys=False))
        files["best.yaml"] = d / "best.yaml"
        summary.update({"best_trial": b.number, "best_value": b.value, "best_params": b.params})
    rho = _plots(study, ostudy, rows, files)
    summary.update(rho)
    atomic_write_json(d / "summary.json", summary)
    files["summary.json"] = d / "summary.json"
    echo("\ntrials\n" + markdown_table([{k: v for k, v in r.items() if k != "run_dir"} for r in rows]))
    states = ", ".join(f"{n} {s}" for s, n in summary["states"].items())
    if "best_trial" in summary:
        echo(f"\nbest: trial {summary['best_trial']}, {study.hpo.objective} {summary['best_value']:.4f} with "
             + ", ".join(f"{k}={v}" for k, v in summary["best_params"].items()))
        echo(f"best config: {files['best.yaml']}  (fedtune run {files['best.yaml']})")
    if summary.get("spearman_rho") is not None:
        echo(f"rank by {summary['rank_loss']} vs rank by {summary['rank_score']}: Spearman's rho = "
             f"{summary['spearman_rho']:.3f} over {summary['rank_trials']} trials")
    for k in ("history.png", "importance.png", "ranks.png"):
        if k in files:
            echo(f"plot: {files[k]}")
    echo(f"done: {len(rows)} trials ({states}), {summary['client_rounds']} client-rounds, "
         f"{summary['seconds'] / 60:.1f} min of trials → {d}")
    return files, summary


def _redact(url: str | None) -> str | None:
    """A storage URL without its password."""
    if not url or "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    cred, host = rest.rsplit("@", 1)
    return f"{scheme}://{cred.split(':')[0]}:***@{host}"


def _plots(study: Study, ostudy, rows: list[dict[str, Any]], files: dict[str, Path]) -> dict[str, Any]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a core dependency
        return {}
    d, o = study.dir, study.hpo.objective
    out: dict[str, Any] = {}
    minimize = study.direction == "minimize"
    # optimisation history: every trial's objective (pruned: its last reported value) and the best so far
    pts = [(r["trial"], r["objective"], r["state"]) for r in rows if r["objective"] is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        for state, marker, color in (("complete", "o", "tab:blue"), ("pruned", "x", "tab:gray"),
                                     ("running", "s", "tab:orange"), ("fail", "v", "tab:red")):
            sel = [(n, v) for n, v, s in pts if s == state]
            if sel:
                ax.scatter([n for n, _ in sel], [v for _, v in sel], marker=marker, color=color, label=state)
        best, xs, ys = None, [], []
        for n, v, s in pts:
            if s == "complete":
                best = v if best is None else (min(best, v) if minimize else max(best, v))
            if best is not None:
                xs.append(n)
                ys.append(best)
        if xs:
            ax.step(xs, ys, where="post", color="tab:green", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(o)
        ax.set_title(f"optimisation history: {study.name}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(d / "history.png", dpi=110)
        plt.close(fig)
        files["history.png"] = d / "history.png"
    # parameter importance (optuna's fANOVA evaluator on the complete trials)
    try:
        import optuna

        complete = [t for t in ostudy.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(complete) >= 2 and len(study.dims) >= 1:
            imp = optuna.importance.get_param_importances(ostudy)
            if imp:
                fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(imp)))
                names = list(imp)[::-1]
                ax.barh(names, [imp[n] for n in names], color="tab:blue")
                ax.set_xlabel(f"importance for {o} (fANOVA)")
                ax.set_title("parameter importance")
                fig.tight_layout()
                fig.savefig(d / "importance.png", dpi=110)
                plt.close(fig)
                files["importance.png"] = d / "importance.png"
                out["importance"] = {k: float(v) for k, v in imp.items()}
    except Exception as e:  # too few or too uniform trials: no importance, said why
        log.info("parameter importance not computed: %s", e)
        out["importance_error"] = str(e)
    # FS-LLM Fig. 5(b): rank by validation loss vs rank by task score, over the trials that have both
    loss_key = "val_loss"
    tasks = _task_metrics(study)
    seen = [k for k in tasks if any(k in r for r in rows)]
    score_key = o if o in tasks else (seen[0] if seen else None)
    if score_key is not None:
        both = [(r["trial"], _get(r, loss_key, o), _get(r, score_key, o)) for r in rows
                if r["state"] == "complete" and _get(r, loss_key, o) is not None and _get(r, score_key, o) is not None]
        if len(both) >= 3:
            loss = [b[1] for b in both]
            higher_better = not score_key.endswith("_loss")
            score = [-b[2] if higher_better else b[2] for b in both]
            rl, rs = ranks(loss), ranks(score)
            rho = spearman(loss, score)
            fig, ax = plt.subplots(figsize=(4.5, 4.5))
            ax.scatter(rl, rs, color="tab:blue")
            for (n, _, _), x, y in zip(both, rl, rs):
                ax.annotate(str(n), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            m = len(both)
            ax.plot([1, m], [1, m], color="tab:gray", lw=0.8, ls="--")
            ax.set_xlabel(f"rank by {loss_key} (1 = lowest)")
            ax.set_ylabel(f"rank by {score_key} (1 = best)")
            ax.set_title(f"Spearman's rho = {rho:.3f}" if rho is not None else "Spearman's rho: undefined")
            fig.tight_layout()
            fig.savefig(d / "ranks.png", dpi=110)
            plt.close(fig)
            files["ranks.png"] = d / "ranks.png"
            out.update({"spearman_rho": rho, "rank_loss": loss_key, "rank_score": score_key, "rank_trials": m})
    return out


def _get(row: dict[str, Any], key: str, objective: str):
    return row.get("objective") if key == objective else row.get(key)


def _task_metrics(study: Study) -> list[str]:
    from fedtune.hpo.space import objective_choices

    return [k for k in objective_choices(study.base_cfg) if not k.startswith(("val_", "test_"))]
