"""FedAvg (McMahan et al. 2017, https://arxiv.org/abs/1602.05629) over adapter tensors.

The weighted mean is accumulated in float64 in the order the updates arrive sorted by client id,
so the result does not depend on which client finished first (deterministic aggregation).
"""

from __future__ import annotations

import torch

from fedtune.algorithms.base import Algorithm, ClientUpdate, TensorDict, register


def weighted_mean(updates: list[ClientUpdate], weights: list[float]) -> TensorDict:
    pairs = sorted(zip(updates, weights), key=lambda uw: uw[0].cid)
    out: TensorDict = {}
    for name, ref in pairs[0][0].tensors.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for u, w in pairs:
            acc += u.tensors[name].double() * w
        out[name] = acc.to(torch.float32)
    return out


class RunningMean:
    """Weighted mean folded in one update at a time (float64), so the server holds one
    accumulator instead of every client's update: memory stays flat with many clients.
    Updates are folded in arrival order; in-process that order is the fixed sampled order."""

    def __init__(self) -> None:
        self.acc: TensorDict = {}
        self.total = 0.0

    def add(self, tensors: TensorDict, weight: float) -> None:
        for name, t in tensors.items():
            if name not in self.acc:
                self.acc[name] = torch.zeros(t.shape, dtype=torch.float64)
            self.acc[name].add_(t.double(), alpha=weight)
        self.total += weight

    def result(self) -> TensorDict:
        return {k: (v / self.total).to(torch.float32) for k, v in self.acc.items()}


@register
class FedAvg(Algorithm):
    name = "fedavg"
    streaming = True

    def begin(self, global_state: TensorDict) -> RunningMean:
        return RunningMean()

    def fold(self, acc: RunningMean, update: ClientUpdate) -> None:
        w = 1.0 if self.weighting == "uniform" else float(max(update.num_examples, 0))
        acc.add(update.tensors, w)

    def finish(self, global_state: TensorDict, acc: RunningMean) -> TensorDict:
        if acc.total <= 0:
            return global_state
        return acc.result()

    def aggregate(self, global_state: TensorDict, updates: list[ClientUpdate]) -> TensorDict:
        if not updates:
            return global_state  # nobody answered: keep the previous global adapter
        return weighted_mean(updates, self.weights(updates))
