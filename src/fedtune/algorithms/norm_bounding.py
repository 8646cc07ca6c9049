"""Norm bounding (Sun et al. 2019, "Can You Really Backdoor Federated Learning?",
https://arxiv.org/abs/1911.07963): clip each client's change to a bound, then average.

Rule: with x the global adapter and Δ_i = y_i − x (the whole adapter as one vector), each change is
scaled to Δ_i·min(1, M/‖Δ_i‖); the new global adapter is x + the unweighted mean of the clipped
changes (reported sizes are ignored: one client's claimed size cannot buy it more weight). M is
``max_norm``, or — by default — the median of the round's ‖Δ_i‖, so the bound adapts to the scale of
honest updates while a handful of outsized ones cannot move it.

Options: ``max_norm`` (M > 0; null: the median of the round's update norms).
"""

from __future__ import annotations

import math
import statistics

from pydantic import Field

from fedtune.algorithms._robust import RobustRule
from fedtune.algorithms.base import Options, RoundContext, TensorDict, Update, register


class NormBoundingOptions(Options):
    max_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False)


@register
class NormBounding(RobustRule):
    name = "norm_bounding"
    Options = NormBoundingOptions

    def combine(self, ctx: RoundContext, updates: list[Update]) -> tuple[TensorDict, dict[str, float]]:
        x = self.adapter
        deltas = [{k: u.tensors[k].double() - x[k].double() for k in x} for u in updates]
        norms = [math.sqrt(sum(float(v.pow(2).sum()) for v in d.values())) for d in deltas]
        bound = self.options.max_norm if self.options.max_norm is not None else statistics.median(norms)
        acc = {k: v.double().clone() * 0 for k, v in x.items()}
        clipped = 0
        for d, n in zip(deltas, norms):
            scale = min(1.0, bound / n) if n > 0 else 1.0
            clipped += scale < 1.0
            for k in acc:
                acc[k] += d[k] * scale
        new = {k: x[k].double() + acc[k] / len(updates) for k in x}
        return new, {"norm_bound": bound, "clipped": float(clipped)}
