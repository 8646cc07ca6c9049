"""Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", https://arxiv.org/abs/1803.01498; Flower's ``FedMedian``).

Rule: every coordinate of the new global adapter is the median of that coordinate over the round's
m client adapters (unweighted: reported sizes are ignored); for even m the mean of the two middle
values (``numpy.median``'s convention — ``torch.median`` would take the lower one).

Options: none.
"""

from __future__ import annotations

from fedtune.algorithms._robust import RobustRule, stacked
from fedtune.algorithms.base import RoundContext, TensorDict, Update, register


def coordinate_median(updates: list[Update]) -> TensorDict:
    out: TensorDict = {}
    for k, s in stacked(updates).items():
        srt = s.sort(dim=0).values
        m = srt.shape[0]
        out[k] = srt[m // 2] if m % 2 else (srt[m // 2 - 1] + srt[m // 2]) / 2
    return out


@register
class Median(RobustRule):
    name = "median"

    def combine(self, ctx: RoundContext, updates: list[Update]):
        return coordinate_median(updates), {}
