"""``local``: every client trains its own adapter alone and nothing is aggregated (FS-LLM §6.1's
"Local" baseline; ``fl.scenario: local`` selects it).

Rule: y_i ← the adapter client i returns; client i is sent y_i and evaluated with y_i. The server
keeps one exact adapter per client (what it checkpoints); each is saved under ``adapters/<client>``.

Options: none.
"""

from __future__ import annotations

from typing import Any

from fedtune.algorithms.base import (ADAPTER, Algorithm, Instruction, RoundContext, Setup, TensorDict, Update,
                                     register)
from fedtune.errors import FedtuneError


@register
class Local(Algorithm):
    name = "local"

    def __init__(self, options=None, *, weighting: str = "samples"):
        super().__init__(options, weighting=weighting)
        self.per_client: dict[str, TensorDict] = {}

    def check(self, setup: Setup) -> None:
        if setup.clients == ["global"]:
            raise FedtuneError("the local algorithm trains each client alone, but fl.scenario=global pools "
                               "all data in one client; use fl.scenario=local or another fl.algorithm")

    def init(self, setup: Setup) -> None:
        self.per_client = {cid: dict(setup.adapter) for cid in setup.clients}

    def configure_fit(self, ctx: RoundContext) -> dict[str, Instruction]:
        return {cid: Instruction({ADAPTER: self.per_client[cid]}, dict(ctx.config)) for cid in ctx.sampled}

    def fold(self, ctx: RoundContext, acc: list, update: Update) -> None:
        self.per_client[update.cid] = update.tensors  # nothing to combine: keep it, drop nothing else

    def finish(self, ctx: RoundContext, acc: Any) -> dict[str, float]:
        return {}

    def configure_evaluate(self, ctx: RoundContext) -> dict[str, Instruction]:
        return {cid: Instruction({ADAPTER: self.per_client[cid]}, dict(ctx.config)) for cid in ctx.eval_clients}

    def adapters(self) -> dict[str, TensorDict]:
        return dict(self.per_client)

    def state_dict(self) -> tuple[dict[str, TensorDict], dict[str, Any]]:
        clients = sorted(self.per_client)
        return {f"client/{cid}": self.per_client[cid] for cid in clients}, {}

    def load_state_dict(self, tensors: dict[str, TensorDict], meta: dict[str, Any]) -> None:
        self.per_client = {k[len("client/"):]: dict(v) for k, v in tensors.items() if k.startswith("client/")}
