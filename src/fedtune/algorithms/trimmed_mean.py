"""Coordinate-wise trimmed mean (Yin et al. 2018, https://arxiv.org/abs/1803.01498; Flower's
``FedTrimmedAvg``, which is ``scipy.stats.trim_mean``).

Rule: per coordinate, sort the m client values, drop the ⌊β·m⌋ smallest and the ⌊β·m⌋ largest,
and average the rest (unweighted: reported sizes are ignored). β = 0.2 of [1, 2, 10, 3, 100]
drops 1 and 100: mean(2, 3, 10) = 5.

Options: ``beta`` (β ∈ [0, 0.5), default 0.2).
"""

from __future__ import annotations

from pydantic import Field

from fedtune.algorithms._robust import RobustRule, stacked
from fedtune.algorithms.base import Options, RoundContext, TensorDict, Update, register


class TrimmedMeanOptions(Options):
    #: fraction cut from each end, per coordinate
    beta: float = Field(default=0.2, ge=0, lt=0.5)


def trimmed_mean(updates: list[Update], beta: float) -> TensorDict:
    out: TensorDict = {}
    for k, s in stacked(updates).items():
        m = s.shape[0]
        cut = int(beta * m)
        out[k] = s.sort(dim=0).values[cut:m - cut].mean(dim=0)
    return out


@register
class TrimmedMean(RobustRule):
    name = "trimmed_mean"
    Options = TrimmedMeanOptions

    def combine(self, ctx: RoundContext, updates: list[Update]):
        return trimmed_mean(updates, self.options.beta), {"trimmed_per_side": int(self.options.beta * len(updates))}
