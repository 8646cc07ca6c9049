"""FedYogi (Reddi et al. 2020, "Adaptive Federated Optimization", https://arxiv.org/abs/2003.00295,
Algorithm 2; Yogi: Zaheer et al. 2018): like FedAdam, but v moves additively toward Δ², so it
grows no faster than the squared updates do.

Rule (one server step per round):
    m ← β₁·m + (1 − β₁)·Δ,   v ← v − (1 − β₂)·Δ²·sign(v − Δ²),   x ← x + η·m / (√v + τ)

Conventions (option ``convention``, see :mod:`fedtune.algorithms._fedopt`): ``reddi`` — v₀ = τ²
(x = 1, Δ = −0.3, η = 0.1, β = (0.9, 0.99), τ = 1e-3 → 0.903278); ``flower`` — v₀ = 0. Neither
bias-corrects.

Options: ``server_lr`` (0.01), ``beta1`` (0.9), ``beta2`` (0.99), ``tau`` (1e-3), ``convention``.
"""

from __future__ import annotations

import torch

from fedtune.algorithms._fedopt import FedOpt
from fedtune.algorithms.base import register


@register
class FedYogi(FedOpt):
    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.options.beta2) * d2 * torch.sign(v - d2)
