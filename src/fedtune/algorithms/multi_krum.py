"""Multi-Krum (El Mhamdi, Guerraoui & Rouault 2018, "The Hidden Vulnerability of Distributed
Learning in Byzantium", https://arxiv.org/abs/1802.07927; Blanchard et al. 2017; Flower's
``MultiKrum``).

Rule: Krum's scores (krum.py: the sum of squared distances to the m − f − 2 nearest others); the
new global adapter is the unweighted mean of the ``m`` updates with the lowest scores (ties: the
first client ids). Flower averages the selected ones weighted by their reported sizes; here sizes
are ignored, since a Byzantine client could claim any. Needs more than 2f + 2 clients per round.

Options: ``f`` (default 1), ``m`` (updates kept; default: the sampled count minus f).
"""

from __future__ import annotations

import torch
from pydantic import Field

from fedtune.algorithms._robust import RobustRule, stacked
from fedtune.algorithms.base import Options, RoundContext, Setup, TensorDict, Update, register
from fedtune.algorithms.krum import _fewer_than_needed, check_krum, krum_scores


class MultiKrumOptions(Options):
    f: int = Field(default=1, ge=0)
    #: how many of the best-scored updates are averaged (null: the clients per round minus f)
    m: int | None = Field(default=None, ge=1)


@register
class MultiKrum(RobustRule):
    name = "multi_krum"
    Options = MultiKrumOptions

    def check(self, setup: Setup) -> None:
        check_krum(self.name, setup, self.options.f, self.options.m)

    def combine(self, ctx: RoundContext, updates: list[Update]) -> tuple[TensorDict | None, dict[str, float]]:
        f = self.options.f
        skipped = _fewer_than_needed(updates, f)
        if skipped is not None:
            return None, skipped
        keep = min(self.options.m or (len(ctx.sampled) - f), len(updates))
        scores = krum_scores(updates, f)
        order = torch.sort(scores, stable=True).indices[:keep].tolist()
        chosen = [updates[i] for i in sorted(order)]
        return {k: s.mean(dim=0) for k, s in stacked(chosen).items()}, {"selected": float(keep)}
