"""The adaptive server optimizers of Reddi et al. 2020, "Adaptive Federated Optimization"
(https://arxiv.org/abs/2003.00295, Algorithm 2), shared by fedadam.py, fedyogi.py, fedadagrad.py.

With x the global adapter and Δ = ȳ − x (ȳ the round's weighted mean of the clients' adapters):

    m ← β₁·m + (1 − β₁)·Δ                 (m₀ = 0)
    v ← the variant's second-moment rule  (FedAdagrad, FedAdam, FedYogi files)
    x ← x + η·m / (√v + τ)

Two conventions exist and give different numbers, so the option ``convention`` names one:

* ``reddi`` (default, the paper): v₀ = τ², no bias correction.
* ``flower`` (Flower 1.41's strategies): v₀ = 0, and FedAdam scales η by
  √(1 − β₂^(t+1)) / (1 − β₁^(t+1)) with t the server round (FedYogi and FedAdagrad do not).

(OpenFedLLM differs again: m = Δ in the first round.) Fixture from x = 1, Δ = −0.3, η = 0.1,
β₁ = 0.9, β₂ = 0.99, τ = 1e-3: FedAdam gives 0.903277 under ``reddi``, 0.928149 under ``flower``.

Defaults: η = 0.01, β₁ = 0.9, β₂ = 0.99, τ = 1e-3. (Flower's η = 0.1 moves every LoRA coordinate
by about 0.1 per round — far more than local training does; Reddi et al. grid-search η over
10^-3..1 per task, so tune it.) m and v are server state, checkpointed and resumed.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from fedtune.algorithms.base import Options, RoundContext, TensorDict
from fedtune.algorithms.fedavg import FedAvg, l2_distance


class FedOptOptions(Options):
    #: server learning rate η
    server_lr: float = Field(default=0.01, gt=0, allow_inf_nan=False)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    #: adaptivity τ (> 0: keeps the step bounded where v is tiny)
    tau: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    convention: Literal["reddi", "flower"] = "reddi"


class FedOpt(FedAvg):
    """x ← x + η·m/(√v + τ); subclasses give the second-moment rule ``second_moment``."""

    Options = FedOptOptions

    def __init__(self, options=None, *, weighting: str = "samples"):
        super().__init__(options, weighting=weighting)
        self.m: TensorDict = {}
        self.v: TensorDict = {}

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """v_t from v_{t−1} and Δ² (float64)."""
        raise NotImplementedError

    def lr(self, ctx: RoundContext) -> float:
        """η for this round (FedAdam under ``flower`` bias-corrects it)."""
        return self.options.server_lr

    def apply(self, ctx: RoundContext, mean: TensorDict) -> dict[str, float]:
        o = self.options
        v0 = 0.0 if o.convention == "flower" else o.tau ** 2
        new, m, v = {}, {}, {}
        for k in mean:
            x = self.adapter[k].double()
            d = mean[k].double() - x
            m_prev = self.m[k].double() if k in self.m else torch.zeros_like(d)
            v_prev = self.v[k].double() if k in self.v else torch.full_like(d, v0)
            m[k] = o.beta1 * m_prev + (1 - o.beta1) * d
            v[k] = self.second_moment(v_prev, d * d)
            new[k] = (x + self.lr(ctx) * m[k] / (v[k].sqrt() + o.tau)).float()
        # moments kept in float64: they are small state, and Δ² underflows float32 quickly
        self.m, self.v = m, v
        step = l2_distance(new, self.adapter)
        self.adapter = new
        return {"server_step_norm": step}

    def state_dict(self) -> tuple[dict[str, TensorDict], dict[str, Any]]:
        tensors, meta = super().state_dict()
        return {**tensors, "m": self.m, "v": self.v}, meta

    def load_state_dict(self, tensors: dict[str, TensorDict], meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        self.m, self.v = dict(tensors.get("m", {})), dict(tensors.get("v", {}))
