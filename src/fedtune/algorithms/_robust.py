"""What the Byzantine-robust rules share (median.py, trimmed_mean.py, krum.py, multi_krum.py,
norm_bounding.py): they need every update of the round at once, and they ignore the training-set
sizes clients report — a Byzantine client can claim any number of examples, so a size-weighted rule
is exactly what it would exploit. Each rule returns the new global adapter from the list of
updates (sorted by client id, so the result does not depend on arrival order); ties are broken by
that order too.
"""

from __future__ import annotations

import torch

from fedtune.algorithms.base import ADAPTER, Algorithm, RoundContext, TensorDict, Update
from fedtune.algorithms.fedavg import l2_distance


def stacked(updates: list[Update]) -> dict[str, torch.Tensor]:
    """Per adapter tensor, the updates stacked along a new first dimension (float64)."""
    names = updates[0].tensors.keys()
    return {k: torch.stack([u.tensors[k].double() for u in updates]) for k in names}


def flat(tensors: TensorDict, names: list[str]) -> torch.Tensor:
    """All tensors of one adapter as one float64 vector, in ``names`` order."""
    return torch.cat([tensors[k].double().reshape(-1) for k in names])


class RobustRule(Algorithm):
    """Collect the round's updates; ``combine`` them into the next global adapter."""

    def fold(self, ctx: RoundContext, acc: list, update: Update) -> None:
        acc.append(update)  # kept: a robust rule looks at all of them together

    def finish(self, ctx: RoundContext, acc: list[Update]) -> dict[str, float]:
        if not acc:
            return {}
        updates = sorted(acc, key=lambda u: u.cid)
        new, metrics = self.combine(ctx, updates)
        if new is None:
            return metrics
        metrics["server_step_norm"] = l2_distance(new, self.adapter)
        self.adapter = {k: v.float() for k, v in new.items()}
        return metrics

    def combine(self, ctx: RoundContext, updates: list[Update]) -> tuple[TensorDict | None, dict[str, float]]:
        raise NotImplementedError


__all__ = ["ADAPTER", "RobustRule", "flat", "stacked"]
