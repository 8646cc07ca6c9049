"""Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS, https://papers.nips.cc/paper/6617; Flower's ``Krum``).

Rule: with m client adapters y_1..y_m (as flat vectors) and f the number of Byzantine clients to
tolerate, client i's score is the sum of squared L2 distances to its m − f − 2 nearest other
clients; the new global adapter is the y_i with the lowest score (ties: the first client id).
Needs m > 2f + 2 (checked before the run starts against the clients sampled per round). Reported
sizes are ignored. With f = 1 on the points [0, 0.1, 0.2, 5, 10] the scores are
[0.05, 0.02, 0.05, 47.05, 121.04]: Krum picks 0.1.

Options: ``f`` (default 1). Multi-Krum is multi_krum.py.
"""

from __future__ import annotations

import torch
from pydantic import Field

from fedtune.algorithms._robust import RobustRule, flat
from fedtune.algorithms.base import Options, RoundContext, Setup, TensorDict, Update, register
from fedtune.errors import FedtuneError


class KrumOptions(Options):
    #: Byzantine clients tolerated
    f: int = Field(default=1, ge=0)


def krum_scores(updates: list[Update], f: int) -> torch.Tensor:
    """Each update's Krum score: the sum of squared distances to its m − f − 2 nearest others."""
    names = list(updates[0].tensors)
    x = [flat(u.tensors, names) for u in updates]
    m = len(x)
    d2 = torch.full((m, m), float("inf"), dtype=torch.float64)
    for i in range(m):  # exact differences, pair by pair (|a|²+|b|²−2ab cancels badly; m² × D won't fit)
        for j in range(i + 1, m):
            d2[i, j] = d2[j, i] = (x[i] - x[j]).pow(2).sum()
    k = m - f - 2
    return d2.sort(dim=1).values[:, :k].sum(dim=1)


def check_krum(name: str, setup: Setup, f: int, keep: int | None = None) -> None:
    m = setup.per_round
    if m <= 2 * f + 2:
        raise FedtuneError(f"{name} with fl.options.f={f} needs more than 2f + 2 = {2 * f + 2} clients per round, "
                           f"but {m} are sampled; lower fl.options.f, or use more clients (fl.clients_per_round)")
    if keep is not None and not 1 <= keep <= m:
        raise FedtuneError(f"{name}: fl.options.m={keep} must lie between 1 and the {m} clients sampled per round")


def _fewer_than_needed(updates: list[Update], f: int) -> dict[str, float] | None:
    if len(updates) <= 2 * f + 2:  # replies were rejected: too few left to tell who is Byzantine
        return {"skipped_too_few_replies": 1.0}
    return None


@register
class Krum(RobustRule):
    name = "krum"
    Options = KrumOptions

    def check(self, setup: Setup) -> None:
        check_krum(self.name, setup, self.options.f)

    def combine(self, ctx: RoundContext, updates: list[Update]) -> tuple[TensorDict | None, dict[str, float]]:
        skipped = _fewer_than_needed(updates, self.options.f)
        if skipped is not None:
            return None, skipped
        scores = krum_scores(updates, self.options.f)
        best = int(torch.argmin(scores))  # argmin takes the first of equal scores: the lowest client id
        return dict(updates[best].tensors), {"selected_index": float(best)}
