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


@register
class FedAvg(Algorithm):
    name = "fedavg"

    def aggregate(self, global_state: TensorDict, updates: list[ClientUpdate]) -> TensorDict:
        if not updates:
            return global_state  # nobody answered: keep the previous global adapter
        return weighted_mean(updates, self.weights(updates))
