"""FedEx: client hyperparameters tuned inside one federated run (Khodak et al. 2021,
https://arxiv.org/abs/2106.04502), as in FederatedScope's ``autotune/fedex/server.py``.

The server keeps a categorical policy θ over candidate *local* configurations (learning rate, local
steps). Each round every sampled client i gets its own instruction with a configuration j_i ~ θ
(drawn from a generator seeded by (``seed``, round, client): deterministic and resumable without
any RNG state); it evaluates its validation loss before and after training with those settings
and reports both plus its validation-set size v_i. The adapters are averaged as FedAvg does
(``fl.weighting``). Rule: the policy moves by an exponentiated-gradient step,

* w_i = v_i / Σ v; s_i = after_i (or after_i − before_i with ``diff``);
* baseline b = discounted mean (factor ``gamma``: weight γ^age, 0 = the last round only, 1 = the
  plain mean) of the past rounds' Σ w_i·after_i (``diff``: of Σ w_i·(after_i − before_i)); b = 0 in
  the first round;
* g_j = Σ_{i: j_i = j} w_i·(s_i − b)/θ_j;
* η = η₀/denom with η₀ = √(2 ln n) (``eta0: null``) and denom = √(policy updates so far)
  (``auto``), √Σ‖g‖∞² (``adaptive``), ‖g‖∞ (``aggressive``, 1 when g = 0) or 1 (``constant``);
* z ← z − η·g; z ← z − logsumexp(z); θ = e^z (z₀ = −ln n: uniform).

Candidates are either a list of configurations (``configs``: one policy over them, FederatedScope's
"flattened" space) or a grid of values per key (``grid``: one independent policy per key, every
policy updated with the same s_i, as FederatedScope does for a non-flat space; the entropy is that
of the product distribution). Once the entropy falls below ``cutoff`` exploration stops: every
client gets the argmax configuration and θ stays as it is.

Keys a configuration may set: ``lr`` (the pass's peak learning rate; the run's schedule still
applies), ``lr_scale`` (a factor on ``train.lr``) and ``local_steps``.

Round metrics: ``fedex_entropy``, ``fedex_mle`` (the probability of the most likely
configuration), ``fedex_argmax`` (its index: into ``configs``, or the flat row-major index into
the grid), ``fedex_baseline`` and, for up to 32 arms, θ itself (``fedex_theta_<key>_<j>``).

Options (defaults): ``configs`` (null), ``grid`` (``{lr_scale: [0.3, 1.0, 3.0]}`` when neither is
given), ``gamma`` (0.0), ``schedule`` (``auto``), ``eta0`` (null: √(2 ln n)), ``diff`` (false),
``cutoff`` (0.0: explore to the end), ``seed`` (0).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import field_validator, model_validator

from fedtune.algorithms.base import (ADAPTER, ClientResult, Instruction, Options, RoundContext, Update, register,
                                     weight)
from fedtune.algorithms.fedavg import FedAvg, WeightedMean
from fedtune.utils import derive_seed

#: what a candidate configuration may set (each read by :meth:`FedEx.client_fit`)
KEYS = ("lr", "lr_scale", "local_steps")
_DEFAULT_GRID = {"lr_scale": [0.3, 1.0, 3.0]}


def _check_value(key: str, v: Any) -> float | int:
    if key not in KEYS:
        from fedtune.errors import did_you_mean

        raise ValueError(f"unknown FedEx key '{key}'{did_you_mean(key, KEYS)}; valid: {', '.join(KEYS)}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{key} = {v!r}: a positive number is needed")
    if key == "local_steps":
        if int(v) != v:
            raise ValueError(f"local_steps = {v!r}: a whole number of steps is needed")
        return int(v)
    return float(v)


class FedExOptions(Options):
    configs: list[dict[str, float]] | None = None
    grid: dict[str, list[float]] | None = None
    gamma: float = 0.0
    schedule: Literal["auto", "adaptive", "aggressive", "constant"] = "auto"
    eta0: float | None = None
    diff: bool = False
    cutoff: float = 0.0
    seed: int = 0

    @field_validator("configs")
    @classmethod
    def _configs(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError("configs is empty: give at least one configuration")
        out = [{k: _check_value(k, x) for k, x in c.items()} for c in v]
        if any(not c for c in out):
            raise ValueError("a configuration in configs sets nothing")
        return out

    @field_validator("grid")
    @classmethod
    def _grid(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError("grid is empty: give at least one key with candidate values")
        out = {}
        for k, vals in v.items():
            if not vals:
                raise ValueError(f"grid.{k} has no candidate values")
            out[k] = [_check_value(k, x) for x in vals]
            if len(set(out[k])) != len(out[k]):
                raise ValueError(f"grid.{k} = {vals}: candidates must differ")
        return out

    @model_validator(mode="after")
    def _one(self):
        if self.configs is not None and self.grid is not None:
            raise ValueError("give FedEx candidates either as configs (a list) or as grid (values per key), not both")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma = {self.gamma} must lie in [0, 1]")
        if self.eta0 is not None and not self.eta0 > 0:
            raise ValueError(f"eta0 = {self.eta0} must be positive (null: sqrt(2 ln n))")
        if self.cutoff < 0:
            raise ValueError(f"cutoff = {self.cutoff} must be >= 0")
        return self

    def dimensions(self) -> tuple[list[str], list[list[Any]]]:
        """(names, candidates per dimension): one dimension of whole configurations (``configs``)
        or one per grid key (sorted, as FederatedScope sorts them)."""
        if self.configs is not None:
            return ["config"], [list(self.configs)]
        grid = self.grid if self.grid is not None else _DEFAULT_GRID
        keys = sorted(grid)
        return keys, [list(grid[k]) for k in keys]


def discounted_mean(trace: list[float], factor: float) -> float:
    """FederatedScope's ``discounted_mean``: the newest entry weighs 1, one before it ``factor``, ..."""
    w = factor ** np.flip(np.arange(len(trace)), axis=0)
    return float(np.inner(np.asarray(trace, dtype=np.float64), w) / w.sum())


def _logsumexp(z: np.ndarray) -> float:
    m = float(np.max(z))
    return m + math.log(float(np.sum(np.exp(z - m))))


@dataclass
class FedExPolicy:
    """The policy θ = e^z over each dimension's candidates and its update rule (pure numpy)."""

    sizes: list[int]
    gamma: float = 0.0
    schedule: str = "auto"
    eta0: float | None = None
    diff: bool = False
    cutoff: float = 0.0
    z: list[np.ndarray] = field(default_factory=list)
    store: list[float] = field(default_factory=list)
    trace_global: list[float] = field(default_factory=list)  # Σ w_i·before_i per round
    trace_refine: list[float] = field(default_factory=list)  # Σ w_i·after_i per round
    stopped: bool = False
    baseline: float = 0.0

    def __post_init__(self):
        if not self.z:
            self.z = [np.full(n, -math.log(n), dtype=np.float64) for n in self.sizes]
            self.store = [0.0 for _ in self.sizes]

    @property
    def theta(self) -> list[np.ndarray]:
        return [np.exp(z) for z in self.z]

    def eta0_of(self, d: int) -> float:
        return math.sqrt(2.0 * math.log(self.sizes[d])) if self.eta0 is None else float(self.eta0)

    def entropy(self) -> float:
        """Entropy of the product distribution (FederatedScope's, over every combination)."""
        h = 0.0
        for probs in itertools.product(*(t[t > 0.0] for t in self.theta)):
            p = float(np.prod(probs))
            h -= p * math.log(p)
        return h

    def mle(self) -> float:
        return float(np.prod([t.max() for t in self.theta]))

    def argmax(self) -> list[int]:
        return [int(t.argmax()) for t in self.theta]

    def sample(self, rng: np.random.Generator) -> list[int]:
        if self.stopped:
            return self.argmax()
        # renormalised in float64: exp(z) sums to 1 only up to rounding, which choice() checks
        return [int(rng.choice(len(t), p=t / t.sum())) for t in self.theta]

    def update(self, arms: list[list[int]], before: list[float], after: list[float], sizes: list[float]) -> None:
        """One round's feedback: per reporting client its arms (one index per dimension), its
        validation loss before and after local training and its validation-set size."""
        if not arms:
            return
        w = np.asarray(sizes, dtype=np.float64)
        if w.sum() <= 0:
            return
        w = w / w.sum()
        before_a, after_a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
        if self.trace_refine:
            trace = np.asarray(self.trace_refine, dtype=np.float64)
            if self.diff:
                trace = trace - np.asarray(self.trace_global, dtype=np.float64)
            self.baseline = discounted_mean(list(trace), self.gamma)
        else:
            self.baseline = 0.0
        self.trace_global.append(float(np.inner(before_a, w)))
        self.trace_refine.append(float(np.inner(after_a, w)))
        if self.stopped:
            return
        s = after_a - before_a if self.diff else after_a
        theta = self.theta
        for d in range(len(self.z)):
            grad = np.zeros(len(self.z[d]))
            for idx, si, wi in zip(arms, s, w):
                grad[idx[d]] += wi * (si - self.baseline) / theta[d][idx[d]]
            if self.schedule == "adaptive":
                self.store[d] += float(np.max(np.abs(grad))) ** 2
                denom = math.sqrt(self.store[d])
            elif self.schedule == "aggressive":
                denom = 1.0 if np.all(grad == 0.0) else float(np.max(np.abs(grad)))
            elif self.schedule == "auto":
                self.store[d] += 1.0
                denom = math.sqrt(self.store[d])
            else:  # constant
                denom = 1.0
            if denom == 0.0:  # adaptive with g = 0 so far: nothing to step on
                continue
            z = self.z[d] - self.eta0_of(d) / denom * grad
            self.z[d] = z - _logsumexp(z)
        if self.entropy() < self.cutoff:
            self.stopped = True

    # ---- state (JSON: Python's float repr round-trips exactly, so a resume is bit for bit) ----
    def state(self) -> dict[str, Any]:
        return {"z": [z.tolist() for z in self.z], "store": list(self.store), "global": list(self.trace_global),
                "refine": list(self.trace_refine), "stopped": self.stopped, "baseline": self.baseline}

    def load(self, s: dict[str, Any]) -> None:
        self.z = [np.asarray(z, dtype=np.float64) for z in s["z"]]
        self.store = [float(x) for x in s["store"]]
        self.trace_global = [float(x) for x in s["global"]]
        self.trace_refine = [float(x) for x in s["refine"]]
        self.stopped = bool(s["stopped"])
        self.baseline = float(s.get("baseline", 0.0))


@register
class FedEx(FedAvg):
    name = "fedex"
    Options = FedExOptions

    def __init__(self, options=None, *, weighting: str = "samples"):
        super().__init__(options, weighting=weighting)
        o = self.options
        self.keys, self.candidates = o.dimensions()
        self.policy = FedExPolicy([len(c) for c in self.candidates], gamma=o.gamma, schedule=o.schedule,
                                  eta0=o.eta0, diff=o.diff, cutoff=o.cutoff)

    # ---- the configurations ----------------------------------------------------------------
    def settings(self, arms: list[int]) -> dict[str, float | int]:
        """The local settings ``arms`` (one index per dimension) stand for."""
        out: dict[str, Any] = {}
        for key, cands, j in zip(self.keys, self.candidates, arms):
            out.update(cands[j] if key == "config" else {key: cands[j]})
        return out

    def arms_of(self, ctx: RoundContext, cid: str) -> list[int]:
        rng = np.random.default_rng(derive_seed(self.options.seed, "fedex", ctx.round, cid))
        return self.policy.sample(rng)

    # ---- server half ------------------------------------------------------------------------
    def configure_fit(self, ctx: RoundContext) -> dict[str, Instruction]:
        out = {}
        for cid in ctx.sampled:
            arms = self.arms_of(ctx, cid)
            config = {**ctx.config, "fedex_arms": arms,
                      **{f"fedex_{k}": v for k, v in self.settings(arms).items()}}
            out[cid] = Instruction({ADAPTER: self.adapter}, config)
        self._sent = {cid: list(ins.config["fedex_arms"]) for cid, ins in out.items()}
        return out

    def begin(self, ctx: RoundContext):
        return WeightedMean(), []

    def fold(self, ctx: RoundContext, acc, update: Update) -> None:
        mean, feedback = acc
        mean.add(update.tensors, weight(update, self.weighting))
        m = update.metrics
        if all(k in m for k in ("fedex_loss_before", "fedex_loss_after")) and m.get("fedex_val_size", 0) > 0:
            feedback.append((self._sent[update.cid], m["fedex_loss_before"], m["fedex_loss_after"],
                             m["fedex_val_size"]))

    def finish(self, ctx: RoundContext, acc) -> dict[str, float]:
        mean, feedback = acc
        metrics = super().finish(ctx, mean)
        self.policy.update([f[0] for f in feedback], [f[1] for f in feedback], [f[2] for f in feedback],
                           [f[3] for f in feedback])
        return {**metrics, **self.policy_metrics()}

    def policy_metrics(self) -> dict[str, float]:
        p = self.policy
        arg = p.argmax()
        flat = int(np.ravel_multi_index(arg, p.sizes)) if len(arg) > 1 else arg[0]
        out = {"fedex_entropy": p.entropy(), "fedex_mle": p.mle(), "fedex_argmax": flat,
               "fedex_baseline": p.baseline, "fedex_stopped": float(p.stopped)}
        if sum(p.sizes) <= 32:
            for key, t in zip(self.keys, p.theta):
                out.update({f"fedex_theta_{key}_{j}": float(x) for j, x in enumerate(t)})
        return out

    def best(self) -> dict[str, float | int]:
        """The most likely configuration under the current policy."""
        return self.settings(self.policy.argmax())

    def state_dict(self):
        tensors, meta = super().state_dict()
        return tensors, {**meta, "fedex": self.policy.state()}

    def load_state_dict(self, tensors, meta) -> None:
        super().load_state_dict(tensors, meta)
        if "fedex" in meta:
            self.policy.load(meta["fedex"])

    # ---- client half -----------------------------------------------------------------------
    def client_fit(self, c, ins: Instruction) -> ClientResult:
        """Validation loss before and after local training with the instructed settings."""
        cfg = ins.config
        lr = cfg.get("fedex_lr")
        if "fedex_lr_scale" in cfg:
            lr = (lr if lr is not None else c.cfg.train.lr) * float(cfg["fedex_lr_scale"])
        steps = int(cfg["fedex_local_steps"]) if "fedex_local_steps" in cfg else None
        c.set_adapter(ins.groups[ADAPTER])
        before = c.evaluate(["val"])
        stats = c.train(lr=lr, steps=steps)
        after = c.evaluate(["val"])
        metrics = c.fit_metrics(stats)
        if before.get("val_tokens") and after.get("val_tokens"):
            metrics.update({"fedex_loss_before": before["val_loss_sum"] / before["val_tokens"],
                            "fedex_loss_after": after["val_loss_sum"] / after["val_tokens"],
                            "fedex_val_size": float(len(c.client.splits["val"]))})
        return ClientResult({ADAPTER: c.adapter()}, metrics)
