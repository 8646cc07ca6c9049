"""The algorithm interface: what a federated algorithm may change, and nothing more.

Server half: :meth:`Algorithm.aggregate` turns the round's client updates into the next global
state (with access to its own persistent server state). Client half: :meth:`Algorithm.extra_loss`
adds a term to the local objective (FedProx's proximal term), :meth:`Algorithm.after_local_train`
may update the client's persistent state (SCAFFOLD control variates). The round loop and the
local training loop never special-case an algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedtune.errors import unknown_name
from fedtune.state import ClientState

TensorDict = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    cid: str
    tensors: TensorDict
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Algorithm:
    name = "base"
    #: True when the algorithm can fold updates one at a time (``begin``/``fold``/``finish``),
    #: letting the server drop each update as soon as it arrives.
    streaming = False

    def __init__(self, weighting: str = "samples", **options):
        self.weighting = weighting
        self.options = options

    # ---- server half -------------------------------------------------------------------
    def weights(self, updates: list[ClientUpdate]) -> list[float]:
        if self.weighting == "uniform":
            raw = [1.0] * len(updates)
        else:
            raw = [float(max(u.num_examples, 0)) for u in updates]
        total = sum(raw)
        if total <= 0:
            raw, total = [1.0] * len(updates), float(len(updates))
        return [w / total for w in raw]

    def aggregate(self, global_state: TensorDict, updates: list[ClientUpdate]) -> TensorDict:
        raise NotImplementedError

    # ---- client half -------------------------------------------------------------------
    def extra_loss(self, global_state: TensorDict, state: ClientState) -> Callable | None:
        return None

    def after_local_train(self, global_state: TensorDict, local_state: TensorDict, state: ClientState) -> None:
        return None


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    ALGORITHMS[cls.name] = cls
    return cls


def get_algorithm(name: str, **kwargs) -> Algorithm:
    if name not in ALGORITHMS:
        raise unknown_name("fl.algorithm", name, ALGORITHMS)
    return ALGORITHMS[name](**kwargs)
