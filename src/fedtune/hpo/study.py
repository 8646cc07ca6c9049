"""Run a study on optuna: every trial a normal fedtune run, in this process, on one loaded base model.

* **Storage.** optuna's RDB storage: SQLite in the study directory by default, or any SQLAlchemy
  URL (``hpo.storage``), so several machines can work on one study through a shared PostgreSQL or
  MySQL. The study is created with ``load_if_exists``: running the same command again resumes it.
  What defines the study (space, objective, direction, pruner and its fidelity schedule, the base
  run config) is stored with it, and a resume that differs is refused before any trial runs.
* **Trials.** Trial *n* writes the run directory ``trials/trial_<n>`` (config, metrics,
  checkpoints, adapter). A finished trial (complete, pruned or failed) is never run again. A trial
  left RUNNING by a process that is gone (killed, or this process interrupted) is *taken over*
  under its own number: its run resumes from its last checkpoint (fedtune's resume is exact, so the
  trial ends where the uninterrupted one would have), or runs from the start when it has none.
  Its earlier rounds are re-reported to the pruner first. On another host, a RUNNING trial counts
  as gone once it has not reported for ``hpo.stale_after_s`` seconds.
* **Fidelity.** Federated rounds: ``asha`` (optuna's ``SuccessiveHalvingPruner``, which is
  asynchronous) and ``hyperband`` get ``trial.report(objective, round)`` every
  ``hpo.report_every`` rounds from the server's round-end hook, and ``optuna.TrialPruned`` ends the
  run there (its logger closed, its checkpoints kept). ``sync_sha`` is synchronous successive
  halving: all n configurations run for r rounds, the best ⌊n/η⌋ continue from their round-r
  checkpoints to rη rounds, and so on up to the full budget. Every trial runs with the full
  ``fl.rounds`` in its config and is stopped at each rung, so a continued trial is exactly the
  uninterrupted run of the full budget (its learning-rate schedule included).
* **One base model.** Trials borrow the loaded base model (``fedtune.run.run(base=...)``), which
  takes its adapter off again on every exit path; the cache reloads it should anything of an
  adapter be left.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError
from fedtune.hpo.space import Study, objective_choices, sync_rungs

log = logging.getLogger(__name__)

OWNER = f"{socket.gethostname()}:{os.getpid()}"
#: trial ids this process is running right now (a RUNNING trial of this pid outside it was interrupted)
_ACTIVE: set[int] = set()


def _optuna():
    try:
        import optuna
    except ImportError:
        raise FedtuneError("fedtune hpo needs optuna: pip install 'fedtune[hpo]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class RungReached(Exception):
    """Raised by the round-end hook to stop a ``sync_sha`` trial at its rung (not an error)."""


def _runtime_model(cfg):
    """The model section as the trial's run will load it (``model.dtype: auto`` resolved)."""
    from fedtune.hardware import runtime_config
    from fedtune.utils import resolve_device

    return runtime_config(cfg, resolve_device(cfg.train.device)).model


# ---- the base model, loaded once --------------------------------------------------------------
class BaseCache:
    """The loaded base model of the last ``cfg.model`` asked for (one entry: memory for one model)."""

    def __init__(self):
        self.key: str | None = None
        self.base = None
        self.loads = 0

    def get(self, model_cfg):
        from peft.tuners.tuners_utils import BaseTunerLayer

        from fedtune.models import load_model

        key = model_cfg.model_dump_json()
        if self.base is not None and self.key == key:
            model = self.base[0]
            if hasattr(model, "peft_config") or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
                log.warning("the cached base model still holds adapter layers; loading it again")
                self.base = None
        if self.base is None or self.key != key:
            self.base, self.key = None, None  # let go of the old one first
            self.base, self.key = load_model(model_cfg), key
            self.loads += 1
        return self.base


# ---- storage --------------------------------------------------------------------------------------
def storage_url(study: Study) -> str:
    return study.hpo.storage or f"sqlite:///{(study.dir / 'study.db').absolute()}"


def open_storage(study: Study):
    """The optuna storage, or one clear error when the URL cannot be opened."""
    optuna = _optuna()
    url = storage_url(study)
    made = None
    if study.hpo.storage is None and not study.dir.exists():
        made = study.dir.absolute()
        while not made.parent.exists():
            made = made.parent
        study.dir.mkdir(parents=True)
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # sqlalchemy's, a missing driver's, a refused connection's
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FedtuneError(f"hpo.storage '{url}' cannot be opened: {reason}") from None


def _sampler(study: Study, n_existing: int):
    optuna = _optuna()
    h = study.hpo
    # a resumed study draws its remaining trials from a sampler seeded by (seed, trials so far), so a
    # given resume point gives the same trials every time
    seed = (h.seed if h.seed is not None else study.base_cfg.seed) + 1000003 * n_existing
    startup = {} if h.n_startup_trials is None else {"n_startup_trials": h.n_startup_trials}
    if h.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if h.sampler == "grid":
        class Grid(optuna.samplers.GridSampler):
            def after_trial(self, study, trial, state, values):
                """optuna's calls ``study.stop()`` once the grid is used up, which only works inside
                ``study.optimize``; the runner asks and tells, and stops by itself (is_exhausted)."""

        return Grid({d.key: d.grid() for d in study.dims}, seed=seed)
    if h.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **startup)
    return optuna.samplers.GPSampler(seed=seed, **startup)


def _pruner(study: Study):
    optuna = _optuna()
    h = study.hpo
    if h.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=h.min_rounds, reduction_factor=h.reduction_factor)
    if h.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=h.min_rounds, max_resource=study.base_cfg.fl.rounds,
                                              reduction_factor=h.reduction_factor)
    return optuna.pruners.NopPruner()


def open_study(study: Study):
    """Create the optuna study, or load it (checking it is the same study)."""
    optuna = _optuna()
    storage = open_storage(study)
    ident = study.identity()
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if study.name in names:
        existing = optuna.load_study(study_name=study.name, storage=storage)
        saved = {k[len("fedtune_"):]: v for k, v in existing.user_attrs.items() if k.startswith("fedtune_")}
        diff = [k for k in ident if saved.get(k) != ident[k]]
        if diff:
            lines = [f"{k}: {_short(saved.get(k))} -> {_short(ident[k])}" for k in diff]
            raise FedtuneError(f"study '{study.name}' in {storage_url(study)} was made with a different "
                               f"{', '.join(diff)}:\n  " + "\n  ".join(lines) +
                               "\nresume it with the same study file, or give a new hpo.study_name (or hpo.dir)")
        n = len(existing.trials)
    else:
        n = 0
    ostudy = optuna.create_study(storage=storage, study_name=study.name, direction=study.direction,
                                 sampler=_sampler(study, n), pruner=_pruner(study), load_if_exists=True)
    if n == 0 and not ostudy.user_attrs:
        for k, v in ident.items():
            ostudy.set_user_attr(f"fedtune_{k}", v)
        ostudy.set_user_attr("fedtune_base_config", study.base)
    return ostudy


def _short(v: Any, n: int = 160) -> str:
    s = str(v)
    return s if len(s) <= n else s[:n] + "..."


# ---- one trial ----------------------------------------------------------------------------------
def trial_dir(study: Study, number: int) -> Path:
    return study.dir / "trials" / f"trial_{number:05d}"


def suggest(trial, study: Study) -> dict[str, Any]:
    out = {}
    for d in study.dims:
        if d.kind == "categorical":
            out[d.key] = trial.suggest_categorical(d.key, d.choices)
        elif d.kind == "int":
            out[d.key] = trial.suggest_int(d.key, d.low, d.high, step=d.step or 1, log=d.log)
        else:
            out[d.key] = trial.suggest_float(d.key, d.low, d.high, step=d.step, log=d.log)
    return out


def _latest_round(run_dir: Path) -> int | None:
    from fedtune.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    return int(ckpt.name.split("_")[-1]) if ckpt is not None else None


def _earlier_rows(run_dir: Path, upto: int) -> list[dict[str, Any]]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "round" and r.get("round", 0) <= upto]


@dataclass
class Reporter:
    """The round-end hook of one trial: track the objective, report it to the pruner, heartbeat."""

    trial: Any
    study: Study
    prune: bool
    echo: Any
    label: str
    stop_at: int | None = None
    value: float | None = None
    rounds: int = 0
    client_rounds: int = 0
    final: dict[str, float] = field(default_factory=dict)
    values: dict[int, float] = field(default_factory=dict)

    def __post_init__(self):
        self.watch = set(objective_choices(self.study.base_cfg))
        self.total = self.study.base_cfg.fl.rounds

    def see(self, rnd: int, row: dict[str, Any], live: bool) -> None:
        o = self.study.hpo.objective
        if rnd > 0:
            self.rounds = rnd
            self.client_rounds += int(row.get("clients") or 0)
        self.final.update({k: float(v) for k, v in row.items() if k in self.watch and isinstance(v, (int, float))})
        v = row.get(o)
        if v is None:
            return
        self.value = float(v)
        self.values[rnd] = self.value
        h = self.study.hpo
        if self.prune and 0 < rnd < self.total and rnd % h.report_every == 0:
            seen = self.trial.study._storage.get_trial(self.trial._trial_id).intermediate_values
            if rnd not in seen:  # a taken-over trial re-reports only what the earlier process had not
                self.trial.report(self.value, rnd)
            if self.trial.should_prune():
                self._attrs()
                raise _optuna().TrialPruned(f"pruned at round {rnd}")

    def __call__(self, rnd: int, row: dict[str, Any]) -> None:
        self.see(rnd, row, live=True)
        self._attrs()
        if rnd > 0 and self.value is not None and row.get(self.study.hpo.objective) is not None:
            self.echo(f"  {self.label} round {rnd}/{self.total}: {self.study.hpo.objective} {self.value:.4f}")
        if self.stop_at is not None and rnd == self.stop_at and rnd < self.total:
            raise RungReached()

    def _attrs(self) -> None:
        t = self.trial
        t.set_user_attr("heartbeat", time.time())
        t.set_user_attr("rounds", self.rounds)
        t.set_user_attr("client_rounds", self.client_rounds)
        t.set_user_attr("final", self.final)


class Runner:
    def __init__(self, study: Study, ostudy, *, verbose: bool = True, overrides: dict[str, Any] | None = None,
                 round_lines: bool = True):
        self.study, self.ostudy, self.verbose = study, ostudy, verbose
        self.echo = (lambda s: print(s, flush=True)) if verbose else (lambda s: None)
        self.round_echo = self.echo if round_lines else (lambda s: None)
        self.cache = BaseCache()
        self.overrides = dict(overrides or {})  # per-trial config changes the strategy needs
        self.runs = 0  # fedtune runs started (tests count them)

    # ---- trial lifecycle ------------------------------------------------------------------
    def _claim(self, trial) -> None:
        trial.set_user_attr("owner", OWNER)
        trial.set_user_attr("heartbeat", time.time())

    def is_stale(self, t) -> bool:
        """A RUNNING trial whose process is gone."""
        owner = t.user_attrs.get("owner", "")
        host, _, pid = owner.rpartition(":")
        if t._trial_id in _ACTIVE:
            return False
        if host == socket.gethostname() and pid.isdigit():
            if int(pid) == os.getpid():
                return True  # this process ran it and was interrupted
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
            return False
        return time.time() - float(t.user_attrs.get("heartbeat", 0)) > self.study.hpo.stale_after_s

    def run_trial(self, trial, *, stop_at: int | None = None) -> str:
        """Run (or continue) one trial to the end or to ``stop_at``: 'complete', 'pruned', 'failed',
        'rung' (stopped at ``stop_at``)."""
        optuna = _optuna()
        from fedtune.run import run

        study = self.study
        number = trial.number
        params = suggest(trial, study)
        run_dir = trial_dir(study, number)
        self._claim(trial)
        trial.set_user_attr("run_dir", str(run_dir.relative_to(study.dir)))
        cfg = study.trial_config(params, run_dir, self.overrides)
        label = f"trial {number}"
        rep = Reporter(trial, study, prune=study.hpo.pruner in ("asha", "hyperband"), echo=self.round_echo, label=label,
                       stop_at=stop_at)
        done = _latest_round(run_dir)
        if done is None and run_dir.exists():
            shutil.rmtree(run_dir)  # started but no checkpoint yet: nothing to continue from
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
        how = f"continuing from round {done}" if done else "starting"
        self.echo(f"[{label}] {how}: {shown}" + (f" (to round {stop_at})" if stop_at and stop_at < rep.total else ""))
        _ACTIVE.add(trial._trial_id)
        t0 = time.perf_counter()
        status = "complete"
        try:
            if done is not None:
                for row in _earlier_rows(run_dir, done):
                    rep.see(row["round"], row, live=False)  # the pruner sees the rounds already run
            if done is None or done < (stop_at or rep.total):
                self.runs += 1
                run(cfg, resume=run_dir if done is not None else None, verbose=False,
                    base=self.cache.get(_runtime_model(cfg)), on_round_end=rep)
        except optuna.TrialPruned:
            status = "pruned"
        except RungReached:
            status = "rung"
        except FedtuneError as e:
            trial.set_user_attr("error", str(e))
            self.echo(f"[{label}] failed: {e}")
            status = "failed"
        except KeyboardInterrupt:
            raise  # left RUNNING: the next `fedtune hpo` takes it over from its checkpoint
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            self._add_seconds(trial, t0)
            self.ostudy.tell(trial, state=optuna.trial.TrialState.FAIL)
            _ACTIVE.discard(trial._trial_id)
            raise
        finally:
            _ACTIVE.discard(trial._trial_id)
        self._add_seconds(trial, t0)
        rep._attrs()
        if status == "rung" or (stop_at is not None and status == "complete" and stop_at < rep.total):
            return "rung"
        if status == "complete" and (rep.value is None or not math.isfinite(rep.value)):
            trial.set_user_attr("error", f"the run produced no finite {study.hpo.objective}")
            status = "failed"
        if status == "complete" and stop_at is None:
            self.ostudy.tell(trial, rep.value)
            self.echo(f"[{label}] done: {study.hpo.objective} {rep.value:.4f} after {rep.rounds} rounds"
                      f"{self._best_note()}")
        elif status == "pruned":
            self.ostudy.tell(trial, state=optuna.trial.TrialState.PRUNED)
            self.echo(f"[{label}] pruned after {rep.rounds} rounds: {study.hpo.objective} {rep.value:.4f}")
        elif status == "failed":
            self.ostudy.tell(trial, state=optuna.trial.TrialState.FAIL)
        return status

    def _add_seconds(self, trial, t0: float) -> None:
        prev = self.ostudy._storage.get_trial(trial._trial_id).user_attrs.get("seconds", 0.0)
        trial.set_user_attr("seconds", float(prev) + time.perf_counter() - t0)

    def _best_note(self) -> str:
        try:
            b = self.ostudy.best_trial
        except ValueError:
            return ""
        return f" (best so far: trial {b.number}, {b.value:.4f})"

    # ---- strategies -------------------------------------------------------------------------
    def optimize(self) -> None:
        """Samplers with optuna's pruners (or none): trials one after another up to n_trials."""
        optuna = _optuna()
        TS = optuna.trial.TrialState
        n = self.study.n_trials
        while True:
            trials = self.ostudy.get_trials(deepcopy=False)
            stale = [t for t in trials if t.state == TS.RUNNING and self.is_stale(t)]
            if stale:
                self.run_trial(optuna.trial.Trial(self.ostudy, stale[0]._trial_id))
                continue
            if len(trials) >= n:
                break
            sampler = self.ostudy.sampler
            if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(self.ostudy):
                break
            self.echo(f"-- trial {len(trials) + 1} of {n}")
            self.run_trial(self.ostudy.ask())

    def sync_sha(self) -> None:
        """Synchronous successive halving over rounds, continuing survivors from checkpoints."""
        optuna = _optuna()
        TS = optuna.trial.TrialState
        h, study = self.study.hpo, self.study
        rungs = sync_rungs(h.min_rounds, h.reduction_factor, study.base_cfg.fl.rounds)
        storage = self.ostudy._storage
        sign = 1.0 if study.direction == "minimize" else -1.0
        # every configuration of the first rung, sampled up front (resumed: the ones already there)
        while len(self.ostudy.trials) < study.n_trials:
            t = self.ostudy.ask()
            suggest(t, study)
            self._claim(t)
        ids = [t._trial_id for t in sorted(self.ostudy.get_trials(deepcopy=False), key=lambda t: t.number)]
        alive = ids
        self.echo(f"sync_sha: {len(ids)} configurations, rungs at rounds {rungs}, keeping 1/{h.reduction_factor} "
                  "at each")
        for k, rung in enumerate(rungs):
            for tid in alive:
                t = storage.get_trial(tid)
                if t.state == TS.RUNNING and rung not in t.intermediate_values:
                    status = self.run_trial(optuna.trial.Trial(self.ostudy, tid), stop_at=rung)
                    if status in ("rung", "complete"):
                        v = self._value_at(tid, rung)
                        if v is not None:
                            storage.set_trial_intermediate_value(tid, rung, v)
                        else:
                            self.ostudy.tell(t.number, state=TS.FAIL, skip_if_finished=True)
            reached = [tid for tid in alive if rung in storage.get_trial(tid).intermediate_values
                       and storage.get_trial(tid).state != TS.FAIL]
            ranked = sorted(reached, key=lambda tid: (sign * storage.get_trial(tid).intermediate_values[rung],
                                                      storage.get_trial(tid).number))
            if rung == rungs[-1]:
                for tid in ranked:
                    t = storage.get_trial(tid)
                    self.ostudy.tell(t.number, t.intermediate_values[rung], skip_if_finished=True)
                break
            keep = max(1, len(reached) // h.reduction_factor)
            for tid in ranked[keep:]:
                self.ostudy.tell(storage.get_trial(tid).number, state=TS.PRUNED, skip_if_finished=True)
            self.echo(f"sync_sha rung {k} (round {rung}): kept trials "
                      f"{[storage.get_trial(t).number for t in ranked[:keep]]} of {len(reached)}")
            alive = ranked[:keep]

    def _value_at(self, tid: int, rnd: int) -> float | None:
        t = self.ostudy._storage.get_trial(tid)
        rows = _earlier_rows(self.study.dir / t.user_attrs["run_dir"], rnd)
        for r in rows:
            if r["round"] == rnd and r.get(self.study.hpo.objective) is not None:
                return float(r[self.study.hpo.objective])
        return None


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@dataclass
class StudyResult:
    study: Any  # the optuna study
    dir: Path
    files: dict[str, Path]
    summary: dict[str, Any]
    runs: int = 0


def run_study(study: Study, *, verbose: bool = True, round_lines: bool = True) -> StudyResult:
    """Run (or resume) ``study`` to its end; write the trial table, best config, plots, summary.
    ``verbose``: progress per trial (and with ``round_lines`` per round) and the closing report."""
    import math as _m

    from fedtune.hpo.report import write_outputs

    ostudy = open_study(study)
    echo = (lambda s: print(s, flush=True)) if verbose else (lambda s: None)
    h = study.hpo
    echo(f"fedtune hpo: study '{study.name}' in {storage_url(study)}: {len(study.dims)} dimension(s), "
         f"{h.sampler} sampler, pruner {h.pruner}, {study.direction} {h.objective}, {study.n_trials} trials of up to "
         f"{study.base_cfg.fl.rounds} rounds → {study.dir}")
    for d in study.dims:
        echo(f"  {d.describe()}")
    done = [t for t in ostudy.trials if t.state.is_finished()]
    if done:
        echo(f"  resuming: {len(done)} trial(s) finished, never run again")
    overrides: dict[str, Any] = {}
    if h.pruner == "sync_sha":
        every = study.base_cfg.checkpoint.every
        overrides["checkpoint.every"] = _m.gcd(every, h.min_rounds) if every > 0 else h.min_rounds
    runner = Runner(study, ostudy, verbose=verbose, overrides=overrides, round_lines=round_lines)
    try:
        if h.pruner == "sync_sha":
            runner.sync_sha()
        else:
            runner.optimize()
    finally:
        files, summary = write_outputs(study, ostudy, echo)
    return StudyResult(ostudy, study.dir, files, summary, runner.runs)
