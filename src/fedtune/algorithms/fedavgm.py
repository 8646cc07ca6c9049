"""FedAvgM: FedAvg with server momentum (Hsu, Qi & Brown 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", https://arxiv.org/abs/1909.06335).

Rule (Flower's ``FedAvgM`` convention): with x the global adapter and ȳ the round's weighted mean
of the clients' adapters, the pseudo-gradient is g = x − ȳ; the momentum v ← β·v + g (v = g in
the first round, i.e. v₀ = 0); x ← x − η_s·v. No Nesterov. (OpenFedLLM's EMA form
v ← βv + (1−β)Δ, x ← x + v is η_s·(1−β) of this one.)

Options: ``server_lr`` (η_s, default 1.0), ``momentum`` (β, default 0.9). ``momentum: 0`` with
``server_lr: 1`` is FedAvg. The momentum vector is server state (checkpointed, resumed).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from fedtune.algorithms.base import Options, RoundContext, TensorDict, register
from fedtune.algorithms.fedavg import FedAvg, l2_distance


class FedAvgMOptions(Options):
    server_lr: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    momentum: float = Field(default=0.9, ge=0, lt=1)


@register
class FedAvgM(FedAvg):
    name = "fedavgm"
    Options = FedAvgMOptions

    def __init__(self, options=None, *, weighting: str = "samples"):
        super().__init__(options, weighting=weighting)
        self.velocity: TensorDict = {}

    def apply(self, ctx: RoundContext, mean: TensorDict) -> dict[str, float]:
        o = self.options
        g = {k: (self.adapter[k].double() - mean[k].double()) for k in mean}
        if self.velocity:
            self.velocity = {k: (o.momentum * self.velocity[k].double() + g[k]).float() for k in g}
        else:
            self.velocity = {k: v.float() for k, v in g.items()}
        new = {k: (self.adapter[k].double() - o.server_lr * self.velocity[k].double()).float() for k in mean}
        step = l2_distance(new, self.adapter)
        self.adapter = new
        return {"server_step_norm": step}

    def state_dict(self) -> tuple[dict[str, TensorDict], dict[str, Any]]:
        tensors, meta = super().state_dict()
        return {**tensors, "velocity": self.velocity}, meta

    def load_state_dict(self, tensors: dict[str, TensorDict], meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        self.velocity = dict(tensors.get("velocity", {}))
