"""The study file: a run config plus an ``hpo:`` section (search space, objective, sampler, pruner,
where the study lives), validated as strictly as the run config itself and before any trial runs.

```yaml
base: ../configs/cpu/fed-dolly.yaml   # optional: a run config this file's sections are merged over
fl: {rounds: 6}                       # any run-config section, as in `fedtune run`
hpo:
  space:
    train.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
    peft.alpha: {type: categorical, choices: [8, 16, 32]}
    peft.dropout: {type: float, low: 0.0, high: 0.2, step: 0.05}
    train.local_steps: {type: int, low: 1, high: 4}
  objective: val_loss                 # test_loss, <task>_<metric> of eval.tasks (gsm8k_accuracy), ...
  sampler: tpe                        # random | grid | tpe | gp
  pruner: asha                        # none | asha | hyperband | sync_sha
  n_trials: 12
```

Nothing here imports optuna; :mod:`fedtune.hpo.study` turns the space into optuna distributions.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedtune.config import Config, _check_keys, apply_overrides, config_from_dict
from fedtune.errors import FedtuneError, did_you_mean

#: losses and perplexities the round rows carry (lower is better); ``<task>_<metric>`` of
#: ``eval.tasks`` are the others (higher is better, unless the metric is a loss)
LOSS_OBJECTIVES = ("val_loss", "test_loss", "val_ppl", "test_ppl", "val_loss_mean_of_clients",
                   "test_loss_mean_of_clients")
SAMPLERS = ("random", "grid", "tpe", "gp")
PRUNERS = ("none", "asha", "hyperband", "sync_sha")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Param(_Strict):
    """One dimension of the search space."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    #: sample on a log scale (float or int; low > 0, no step)
    log: bool = False
    #: a grid spacing (float or int): values low, low + step, ..., high
    step: float | None = None
    choices: list[Any] | None = None


class HpoConfig(_Strict):
    """The ``hpo:`` section."""

    space: dict[str, Any] = Field(default_factory=dict)
    #: a round-row metric: val_loss, test_loss, val_ppl, ..., or ``<task>_<metric>`` of eval.tasks
    objective: str = "val_loss"
    #: ``null``: minimize losses and perplexities, maximize task scores (a task's loss: minimize)
    direction: Literal["minimize", "maximize"] | None = None
    sampler: Literal["random", "grid", "tpe", "gp"] = "tpe"
    #: ``asha``/``hyperband``: optuna's pruners on the objective reported every ``report_every``
    #: rounds; ``sync_sha``: synchronous successive halving continuing survivors from checkpoints
    pruner: Literal["none", "asha", "hyperband", "sync_sha"] = "none"
    #: trials in the study (a resumed study runs only the missing ones); ``null``: the grid's size
    #: for ``grid``, else 10. ``sync_sha``: the configurations of its first rung.
    n_trials: int | None = Field(default=None, ge=1)
    #: sampler seed (``null``: the run config's ``seed``)
    seed: int | None = None
    #: TPE/GP: random trials before the model kicks in (``null``: optuna's 10)
    n_startup_trials: int | None = Field(default=None, ge=0)
    #: the fidelity: federated rounds. The first rung (asha/sync_sha: ``min_resource``) ...
    min_rounds: int = Field(default=1, ge=1)
    #: ... and the reduction factor η: keep the best 1/η at each rung
    reduction_factor: int = Field(default=3, ge=2)
    #: report the objective to the pruner every k rounds (asha, hyperband)
    report_every: int = Field(default=1, ge=1)
    study_name: str | None = None
    #: the study directory (trial run directories, the SQLite database, tables, plots);
    #: ``null``: ``runs/hpo-<study_name>``
    dir: str | None = None
    #: an optuna storage URL (``sqlite:///...``, ``postgresql://user:pw@host/db``,
    #: ``mysql+pymysql://...``); ``null``: SQLite in the study directory
    storage: str | None = None
    #: a RUNNING trial whose process is gone (same host) or that has not reported for this long
    #: (another host) is taken over: resumed from its checkpoint, or run again from the start
    stale_after_s: float = Field(default=1800, gt=0)


class Dim:
    """A validated dimension: ``kind`` float/int/categorical, its bounds or choices."""

    def __init__(self, key: str, kind: str, low=None, high=None, log=False, step=None, choices=None):
        self.key, self.kind, self.low, self.high, self.log, self.step = key, kind, low, high, log, step
        self.choices = choices

    def grid(self) -> list[Any] | None:
        """The finite set of values (``None``: continuous)."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.step is None and self.kind == "float":
            return None
        step = self.step if self.step is not None else 1
        n = int(round((self.high - self.low) / step))
        vals = [self.low + i * step for i in range(n + 1)]
        return [int(round(v)) for v in vals] if self.kind == "int" else [round(v, 12) for v in vals]

    def corners(self) -> list[Any]:
        """Values that, if valid for the run config, make every value of the dimension valid
        (pydantic bounds are intervals)."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        return {"type": self.kind, "low": self.low, "high": self.high, "log": self.log, "step": self.step}

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.key} in {self.choices}"
        extra = " (log)" if self.log else f" step {self.step}" if self.step is not None else ""
        return f"{self.key} in [{self.low}, {self.high}]{extra} ({self.kind})"


class Study:
    """A validated study: the base run config (as a dict and validated), the space, the settings."""

    def __init__(self, base: dict[str, Any], hpo: HpoConfig, dims: list[Dim], name: str, source: Path | None):
        self.base, self.hpo, self.dims, self.name, self.source = base, hpo, dims, name, source
        self.base_cfg = config_from_dict(copy.deepcopy(base))

    @property
    def dir(self) -> Path:
        return Path(self.hpo.dir) if self.hpo.dir else Path("runs") / f"hpo-{self.name}"

    @property
    def direction(self) -> str:
        return self.hpo.direction or default_direction(self.hpo.objective, self.base_cfg)

    @property
    def n_trials(self) -> int:
        if self.hpo.n_trials is not None:
            return self.hpo.n_trials
        if self.hpo.sampler == "grid":
            return math.prod(len(d.grid()) for d in self.dims)
        return 10

    def space_json(self) -> str:
        return json.dumps({d.key: d.to_dict() for d in self.dims}, sort_keys=True)

    def identity(self) -> dict[str, str]:
        """What a resumed study must share with the one in the storage (a different space,
        objective, fidelity schedule or base run would mix incomparable trials)."""
        h = self.hpo
        return {"space": self.space_json(), "objective": h.objective, "direction": self.direction,
                "pruner": json.dumps({"pruner": h.pruner, "min_rounds": h.min_rounds, "reduction_factor": h.reduction_factor,
                                      "report_every": h.report_every} if h.pruner != "none" else {"pruner": "none"}),
                "base": self.base_cfg.fingerprint(exclude=("output", "deploy"))}

    def trial_config(self, params: dict[str, Any], run_dir: Path, overrides: dict[str, Any] | None = None) -> Config:
        """The run config of one trial: the base with ``params`` set, writing to ``run_dir``."""
        d = copy.deepcopy(self.base)
        for key, value in params.items():
            set_key(d, key, value)
        out = d.setdefault("output", {})
        out.update({"dir": str(run_dir), "overwrite": False, "progress": False,
                    "name": f"{self.name}-{run_dir.name}"})
        for key, value in (overrides or {}).items():
            set_key(d, key, value)
        return config_from_dict(d)


def set_key(d: dict[str, Any], key: str, value: Any) -> None:
    node = d
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def default_direction(objective: str, cfg: Config) -> str:
    if objective in LOSS_OBJECTIVES or objective.endswith(("_loss", "_ppl")):
        return "minimize"
    return "maximize"


# ---- loading ------------------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict[str, Any]:
    from fedtune.config import read_yaml_file

    # the run config's strict reader: duplicate keys or sections, aliases, bad encodings are errors
    d = read_yaml_file(path, "study file") or {}
    if not isinstance(d, dict):
        raise FedtuneError(f"study file '{path}' must hold a mapping of sections, not {type(d).__name__}")
    return d


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "space" else v
    return out


def load_study(path: str | Path | None, overrides: list[str] | None = None, *, data: dict[str, Any] | None = None
               ) -> Study:
    """Read and validate a study file (or ``data``, a dict of the same shape) with dotted
    overrides: ``hpo.<key>=...`` set the study, everything else the base run config."""
    src = Path(path) if path is not None else None
    d = copy.deepcopy(data) if data is not None else _read_yaml(src)
    base_ref = d.pop("base", None)
    if base_ref is not None:
        bp = Path(base_ref)
        if not bp.is_absolute() and src is not None:
            bp = src.parent / bp
        d = _merge(_read_yaml(bp), d)
    hpo_d = d.pop("hpo", None)
    if hpo_d is None:
        raise FedtuneError(f"{src or 'the study'} has no hpo: section (the search space, objective, sampler, pruner)")
    if not isinstance(hpo_d, dict):
        raise FedtuneError("hpo: must be a mapping (space, objective, sampler, pruner, ...)")
    run_overrides, fixed = [], set()
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        if key.startswith("hpo."):
            if key.startswith("hpo.space"):
                raise FedtuneError(f"override '{item}': change the search space in the study file, not on the command line")
            apply_overrides(hpo_d, [item[len("hpo."):]])
        else:
            run_overrides.append(item)
            fixed.add(key)
    apply_overrides(d, run_overrides)
    try:
        _check_keys(hpo_d, HpoConfig, "hpo")
        hpo = HpoConfig.model_validate(hpo_d)
    except ValidationError as e:
        raise FedtuneError("invalid study:\n  " + "\n  ".join(
            f"hpo.{'.'.join(str(x) for x in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
            for err in e.errors())) from None
    base_cfg = config_from_dict(copy.deepcopy(d))  # the base run config on its own is valid
    dims = parse_space(hpo.space, d, fixed)
    name = hpo.study_name or (src.stem if src is not None else "study")
    study = Study(d, hpo, dims, name, src)
    check_study(study, base_cfg)
    return study


def parse_space(space: dict[str, Any], base: dict[str, Any], fixed: set[str] = frozenset()) -> list[Dim]:
    """Each dimension checked on its own and against the run config: the key exists (closest valid
    one suggested), the bounds make sense, and the run config accepts its extreme values."""
    if not isinstance(space, dict) or not space:
        raise FedtuneError("hpo.space is empty: give at least one config key to search, e.g. "
                           "train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}")
    dims = []
    keys = sorted(space)
    for key in keys:
        spec = space[key]
        where = f"hpo.space.{key}"
        if key.startswith("output.") or key == "output":
            raise FedtuneError(f"{where}: output.* says where a trial writes; it is not a hyperparameter")
        if key.startswith("hpo"):
            raise FedtuneError(f"{where}: the study's own settings cannot be searched")
        if key in fixed:
            raise FedtuneError(f"{where}: {key} is also set by a command-line override; search it or fix it, not both")
        for other in keys:
            if other != key and other.startswith(key + "."):
                raise FedtuneError(f"{where} and hpo.space.{other}: a section and a key inside it cannot both be searched")
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        if not isinstance(spec, dict):
            raise FedtuneError(f"{where}: give {{type: float|int|categorical, ...}} or a list of choices, not {spec!r}")
        try:
            _check_keys(spec, Param, where)
            p = Param.model_validate(spec)
        except ValidationError as e:
            raise FedtuneError(f"{where}: " + "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
                                                      for err in e.errors())) from None
        dims.append(_dim(key, p, where))
    for dim in dims:  # the run config must accept every value of every dimension
        for value in dim.corners():
            trial = copy.deepcopy(base)
            set_key(trial, dim.key, value)
            try:
                config_from_dict(trial)
            except FedtuneError as e:
                raise FedtuneError(f"hpo.space.{dim.key} = {value!r} is not a valid run config: {e}") from None
    return dims


def _dim(key: str, p: Param, where: str) -> Dim:
    if p.type == "categorical":
        if p.low is not None or p.high is not None or p.step is not None or p.log:
            raise FedtuneError(f"{where}: a categorical dimension takes choices only (no low/high/step/log)")
        if not p.choices:
            raise FedtuneError(f"{where}: categorical with no choices")
        if len({json.dumps(c, sort_keys=True) for c in p.choices}) != len(p.choices):
            raise FedtuneError(f"{where}: choices {p.choices} repeat a value")
        if any(not isinstance(c, (int, float, str, bool)) and c is not None for c in p.choices):
            raise FedtuneError(f"{where}: choices must be numbers, strings, booleans or null (optuna stores them)")
        return Dim(key, "categorical", choices=list(p.choices))
    if p.choices is not None:
        raise FedtuneError(f"{where}: choices belong to type: categorical")
    if p.low is None or p.high is None:
        raise FedtuneError(f"{where}: a {p.type} dimension needs low and high")
    low, high, step = p.low, p.high, p.step
    if not (math.isfinite(low) and math.isfinite(high)):
        raise FedtuneError(f"{where}: low and high must be finite")
    if low >= high:
        raise FedtuneError(f"{where}: low ({low}) must be below high ({high}); a single value is not a search "
                           "(fix it in the run config instead)")
    if p.log and low <= 0:
        raise FedtuneError(f"{where}: a log scale needs low > 0 (got {low})")
    if p.log and step is not None:
        raise FedtuneError(f"{where}: log and step exclude each other (optuna samples a log scale continuously)")
    if step is not None and step <= 0:
        raise FedtuneError(f"{where}: step must be positive")
    if p.type == "int":
        if any(v is not None and v != int(v) for v in (low, high, step)):
            raise FedtuneError(f"{where}: an int dimension needs whole-number low, high and step")
        low, high, step = int(low), int(high), (int(step) if step is not None else None)
        if step is not None and (high - low) % step:
            raise FedtuneError(f"{where}: high - low ({high - low}) is not a multiple of step ({step})")
    elif step is not None:
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9:
            raise FedtuneError(f"{where}: high - low ({high - low}) is not a multiple of step ({step})")
    return Dim(key, p.type, low=low, high=high, log=p.log, step=step)


# ---- the study as a whole -------------------------------------------------------------------------
def produced_at(objective: str, cfg: Config, rnd: int) -> bool:
    """Whether a run of ``cfg`` logs ``objective`` in round ``rnd``'s row."""
    if _task_of(objective, cfg) is not None:
        return rnd == cfg.fl.rounds or rnd % cfg.eval.task_every == 0
    k = cfg.eval.every
    return rnd == cfg.fl.rounds or (k > 0 and rnd % k == 0)


def _task_of(objective: str, cfg: Config) -> str | None:
    for t in cfg.eval.tasks:
        if objective.startswith(f"{t}_"):
            return t
    return None


def objective_choices(cfg: Config) -> list[str]:
    """Every objective a run of ``cfg`` produces."""
    from fedtune.eval.tasks import get_task

    out = []
    for split in cfg.eval.splits:
        out += [f"{split}_loss", f"{split}_ppl", f"{split}_loss_mean_of_clients"]
    for t in cfg.eval.tasks:
        task = get_task(t)
        task.configure(cfg.eval.task_options.get(t, {}))
        out.append(f"{t}_{task.metric}")
    return out


def check_study(study: Study, cfg: Config) -> None:
    """The study as a whole: objective, sampler, pruner and fidelity fit together."""
    h = study.hpo
    valid = objective_choices(cfg)
    if h.objective not in valid:
        hint = ""
        if h.objective.split("_")[0] in ("val", "test"):
            hint = f"; add {h.objective.split('_')[0]} to eval.splits"
        elif "_" in h.objective:
            hint = f"; to optimise a task score, add the task to eval.tasks (e.g. eval.tasks=[{h.objective.split('_')[0]}])"
        raise FedtuneError(f"hpo.objective '{h.objective}' is not something this run produces{did_you_mean(h.objective, valid)}"
                           f"{hint}; it produces: {', '.join(valid)}")
    if h.sampler == "grid":
        cont = [d.key for d in study.dims if d.grid() is None]
        if cont:
            raise FedtuneError(f"hpo.sampler=grid needs a finite set of values per dimension; {', '.join(cont)} "
                               "is continuous: give it a step, or make it categorical")
    if h.sampler == "gp":
        import importlib.util

        if importlib.util.find_spec("scipy") is None:
            raise FedtuneError("hpo.sampler=gp needs scipy: pip install 'fedtune[hpo]'")
    if any(d.key == "fl.rounds" for d in study.dims) and h.pruner != "none":
        raise FedtuneError("hpo.space.fl.rounds with a pruner: the pruner's fidelity is the federated round, so the "
                           "number of rounds cannot also be searched; use pruner: none, or fix fl.rounds")
    rounds = cfg.fl.rounds
    if h.pruner == "sync_sha":
        rungs = sync_rungs(h.min_rounds, h.reduction_factor, rounds)
        if len(rungs) < 2:
            raise FedtuneError(f"hpo.pruner=sync_sha: with hpo.min_rounds={h.min_rounds} and fl.rounds={rounds} there is "
                               "no rung below the full budget; lower hpo.min_rounds or raise fl.rounds")
        missing = [r for r in rungs if not produced_at(h.objective, cfg, r)]
        if missing:
            raise FedtuneError(f"hpo.pruner=sync_sha compares trials at rounds {rungs}, but this run logs "
                               f"{h.objective} only every {_every(h.objective, cfg)} rounds (not at {missing}); "
                               f"set {_every_key(h.objective, cfg)}=1 or an hpo.min_rounds it divides")
        if study.n_trials < h.reduction_factor:
            raise FedtuneError(f"hpo.pruner=sync_sha: {study.n_trials} trial(s) cannot be halved by "
                               f"reduction_factor {h.reduction_factor}; give hpo.n_trials >= {h.reduction_factor}")
    elif h.pruner in ("asha", "hyperband"):
        reports = [r for r in range(1, rounds) if r % h.report_every == 0 and produced_at(h.objective, cfg, r)]
        if not reports:
            raise FedtuneError(f"hpo.pruner={h.pruner}: the objective {h.objective} is logged only after the last round "
                               f"({_every_key(h.objective, cfg)}={_every(h.objective, cfg)}, hpo.report_every="
                               f"{h.report_every}, fl.rounds={rounds}), so there is nothing to prune on; set "
                               f"{_every_key(h.objective, cfg)}=1")
        if h.min_rounds >= rounds:
            raise FedtuneError(f"hpo.min_rounds={h.min_rounds} must be below fl.rounds={rounds} for a pruner to act")


def _every(objective: str, cfg: Config) -> int:
    return cfg.eval.task_every if _task_of(objective, cfg) else cfg.eval.every


def _every_key(objective: str, cfg: Config) -> str:
    return "eval.task_every" if _task_of(objective, cfg) else "eval.every"


def sync_rungs(r: int, eta: int, rounds: int) -> list[int]:
    """Rounds at which synchronous successive halving compares its trials: r, rη, rη², ... below the
    full budget, then the full budget."""
    out, x = [], r
    while x < rounds:
        out.append(x)
        x *= eta
    return out + [rounds]
