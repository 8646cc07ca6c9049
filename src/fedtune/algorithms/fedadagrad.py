"""FedAdagrad (Reddi et al. 2020, "Adaptive Federated Optimization", https://arxiv.org/abs/2003.00295,
Algorithm 2): Adagrad on the server.

Rule (one server step per round):
    m ← β₁·m + (1 − β₁)·Δ,   v ← v + Δ²,   x ← x + η·m / (√v + τ)

The paper's FedAdagrad has no momentum (β₁ = 0, so m = Δ), and so does Flower's (its FedOpt base
defaults β₁ to 0): the default here is 0 too; ``beta1`` may still be set. Conventions (option ``convention``, see
:mod:`fedtune.algorithms._fedopt`): ``reddi`` — v₀ = τ² (x = 1, Δ = −0.3, η = 0.1, β₁ = 0,
τ = 1e-3 → 0.900333); ``flower`` — v₀ = 0. Neither bias-corrects.

Options: ``server_lr`` (0.01), ``beta1`` (0.0 here: the paper's rule), ``tau`` (1e-3), ``convention``;
``beta2`` is unused.
"""

from __future__ import annotations

import torch
from pydantic import Field

from fedtune.algorithms._fedopt import FedOpt, FedOptOptions
from fedtune.algorithms.base import register


class FedAdagradOptions(FedOptOptions):
    beta1: float = Field(default=0.0, ge=0, lt=1)


@register
class FedAdagrad(FedOpt):
    name = "fedadagrad"
    Options = FedAdagradOptions

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v + d2
