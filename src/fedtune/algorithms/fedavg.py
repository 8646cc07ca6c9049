"""FedAvg (McMahan et al. 2017, https://arxiv.org/abs/1602.05629) over the adapter tensors.

Rule: x ← Σ_i p_i·y_i over the round's replies, p_i = n_i / Σ_j n_j (``fl.weighting: samples``,
n_i the client's training-set size as the server knows it) or 1/m (``uniform``). When the weights
sum to 0 the global adapter stays as it was (see :func:`~fedtune.algorithms.base.weight`).

The mean is folded one reply at a time in float64 (the server holds one accumulator, not every
client's update) in the sampled order, which is fixed whatever order replies arrive in, so the
result does not depend on which client finished first.

Options: none.
"""

from __future__ import annotations

import math

import torch

from fedtune.algorithms.base import ADAPTER, Algorithm, RoundContext, TensorDict, Update, register, weight


class WeightedMean:
    """Σ w_i·x_i / Σ w_i per tensor of one group, folded one update at a time (float64)."""

    def __init__(self, group: str = ADAPTER):
        self.group = group
        self.acc: TensorDict = {}
        self.total = 0.0
        self.count = 0

    def add(self, tensors: TensorDict, w: float) -> None:
        self.count += 1
        if w <= 0:
            return  # contributes nothing (and a round of zero weights keeps the old global)
        for name, t in tensors.items():
            if name not in self.acc:
                self.acc[name] = torch.zeros(t.shape, dtype=torch.float64)
            self.acc[name].add_(t.double(), alpha=w)
        self.total += w

    def result(self) -> TensorDict | None:
        """The mean (float32), or ``None`` when nothing with a positive weight was folded."""
        if self.total <= 0:
            return None
        return {k: (v / self.total).to(torch.float32) for k, v in self.acc.items()}


def l2_distance(a: TensorDict, b: TensorDict) -> float:
    """‖a − b‖ over all tensors of two same-named dicts (float64)."""
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


@register
class FedAvg(Algorithm):
    name = "fedavg"

    def begin(self, ctx: RoundContext) -> WeightedMean:
        return WeightedMean()

    def fold(self, ctx: RoundContext, acc: WeightedMean, update: Update) -> None:
        acc.add(update.tensors, weight(update, self.weighting))

    def finish(self, ctx: RoundContext, acc: WeightedMean) -> dict[str, float]:
        mean = acc.result()
        if mean is None:
            return {}  # nobody answered (or every weight was 0): keep the global adapter
        return self.apply(ctx, mean)

    def apply(self, ctx: RoundContext, mean: TensorDict) -> dict[str, float]:
        """Move the global adapter given the round's weighted mean (FedAvg: to the mean itself;
        server optimizers override this). Returns round metrics."""
        step = l2_distance(mean, self.adapter)
        self.adapter = mean
        return {"server_step_norm": step}
