"""FedAdam (Reddi et al. 2020, "Adaptive Federated Optimization", https://arxiv.org/abs/2003.00295,
Algorithm 2): Adam on the server, the round's mean client change Δ = ȳ − x as its gradient.

Rule (one server step per round):
    m ← β₁·m + (1 − β₁)·Δ,   v ← β₂·v + (1 − β₂)·Δ²,   x ← x + η·m / (√v + τ)

Conventions (option ``convention``, see :mod:`fedtune.algorithms._fedopt`): ``reddi`` — v₀ = τ², no
bias correction (x = 1, Δ = −0.3, η = 0.1, β = (0.9, 0.99), τ = 1e-3 → 0.903277); ``flower`` —
v₀ = 0 and η·√(1 − β₂^(t+1))/(1 − β₁^(t+1)) at server round t (the same case → 0.928149).

Options: ``server_lr`` (0.01), ``beta1`` (0.9), ``beta2`` (0.99), ``tau`` (1e-3), ``convention``.
"""

from __future__ import annotations

import math

import torch

from fedtune.algorithms._fedopt import FedOpt
from fedtune.algorithms.base import RoundContext, register


@register
class FedAdam(FedOpt):
    name = "fedadam"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.options.beta2 * v + (1 - self.options.beta2) * d2

    def lr(self, ctx: RoundContext) -> float:
        o = self.options
        if o.convention != "flower":
            return o.server_lr
        t = ctx.round + 1.0  # Flower: server_round + 1
        return o.server_lr * math.sqrt(1 - o.beta2 ** t) / (1 - o.beta1 ** t)
