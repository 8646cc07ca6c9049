"""FedProx (Li et al. 2018, "Federated Optimization in Heterogeneous Networks",
https://arxiv.org/abs/1812.06127).

Rule — client: minimise f_i(w) + (μ/2)·‖w − x‖², where x is the adapter received this round and the norm
runs over the trainable adapter tensors only (FS-LLM copies and penalises the whole model). The
term is added to every step's loss, so its gradient μ·(w − x) joins the data gradient before
clipping and the optimizer step. Server: FedAvg.

Options: ``mu`` (μ ≥ 0, default 0.01). ``mu: 0`` adds nothing: the run is FedAvg bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field

from fedtune.algorithms.base import ADAPTER, Instruction, Options, register
from fedtune.algorithms.fedavg import FedAvg


class FedProxOptions(Options):
    #: weight of the proximal term (μ/2)·‖w − x‖² (Li et al. try 0.001-1)
    mu: float = Field(default=0.01, ge=0, allow_inf_nan=False)


def proximal_term(params: list[tuple[str, torch.nn.Parameter]], anchor: dict[str, torch.Tensor],
                  mu: float) -> Callable[[torch.nn.Module], torch.Tensor]:
    """``model -> (μ/2)·Σ‖p − anchor‖²`` over ``params`` (the anchor copied to their device once)."""
    pairs = [(p, anchor[n].to(p.device, p.dtype)) for n, p in params]

    def term(model: torch.nn.Module) -> torch.Tensor:
        return 0.5 * mu * sum((p - a).pow(2).sum() for p, a in pairs)

    return term


@register
class FedProx(FedAvg):
    name = "fedprox"
    Options = FedProxOptions

    def local_loss(self, c, ins: Instruction):
        if self.options.mu == 0:
            return None  # nothing added: exactly FedAvg's client
        return proximal_term(c.params(), ins.groups[ADAPTER], self.options.mu)
