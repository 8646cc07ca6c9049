"""Which blocks are adapter, which middle blocks the emulator keeps, which are dropped (no torch).

A model of N blocks with ``bottom`` = l and ``top`` = r adapter blocks has M = N − l − r middle
blocks. Uniform layer drop keeps k = round(M·(1 − drop)) of them, at middle indices

    round(i · (M − 1)/(k − 1)),  i = 0..k−1

(the first and the last middle block are always kept). This is the offsite-tuning code's
``uniform_choose_layers``, computed the same way: the stride (M − 1)/(k − 1) as a float first,
then Python's ``round`` (half to even) of i·stride, so fedtune keeps exactly the blocks the
reference keeps (M = 26, k = 13: i = 6 gives 12.5, which rounds to 12). k = M keeps every block;
k = 1 keeps the first middle block (the formula has no stride then); k = 0 is refused.

The emulator's blocks are numbered 0..l+k+r−1: first the l bottom adapter blocks, then the k kept
middle blocks, then the r top adapter blocks. :meth:`Plan.source` maps an emulator block to the
full model's block it is a copy of; :meth:`Plan.target` maps an adapter block back to where it is
plugged into the full model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedtune.errors import FedtuneError


def kept_count(middle: int, drop: float) -> int:
    """k = round(M·(1 − drop)) (Python's round, as the reference code)."""
    return int(round(middle * (1.0 - drop)))


def uniform_keep(middle: int, k: int) -> list[int]:
    """The k middle indices (0-based, within the M middle blocks) that uniform layer drop keeps."""
    if not 1 <= k <= middle:
        raise ValueError(f"cannot keep {k} of {middle} middle blocks")
    if k == 1:
        return [0]
    stride = (middle - 1) / (k - 1)
    return [int(round(i * stride)) for i in range(k)]


@dataclass(frozen=True)
class Plan:
    num_layers: int  # N, blocks of the full model
    bottom: int
    top: int
    kept: tuple[int, ...]  # absolute indices (in the full model) of the kept middle blocks

    @property
    def middle(self) -> int:
        return self.num_layers - self.bottom - self.top

    @property
    def emulator_layers(self) -> int:
        return self.bottom + len(self.kept) + self.top

    @property
    def dropped(self) -> tuple[int, ...]:
        kept = set(self.kept)
        return tuple(i for i in range(self.bottom, self.num_layers - self.top) if i not in kept)

    def adapter_blocks(self) -> list[int]:
        """Emulator block indices that are adapter (bottom, then top)."""
        k = len(self.kept)
        return list(range(self.bottom)) + list(range(self.bottom + k, self.bottom + k + self.top))

    def middle_blocks(self) -> list[int]:
        """Emulator block indices of the kept middle blocks."""
        return list(range(self.bottom, self.bottom + len(self.kept)))

    def source(self, j: int) -> int:
        """The full model's block that emulator block ``j`` is a copy of."""
        k = len(self.kept)
        if not 0 <= j < self.emulator_layers:
            raise IndexError(f"emulator block {j} of {self.emulator_layers}")
        if j < self.bottom:
            return j
        if j < self.bottom + k:
            return self.kept[j - self.bottom]
        return self.num_layers - self.top + (j - self.bottom - k)

    def target(self, j: int) -> int:
        """Where adapter block ``j`` of the emulator goes back into the full model."""
        if j not in self.adapter_blocks():
            raise ValueError(f"emulator block {j} is not an adapter block")
        return self.source(j)

    def to_dict(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "bottom": self.bottom, "top": self.top, "kept": list(self.kept)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(int(d["num_layers"]), int(d["bottom"]), int(d["top"]), tuple(int(i) for i in d["kept"]))


def make_plan(num_layers: int, drop: float, bottom: int, top: int) -> Plan:
    """The plan for a model of ``num_layers`` blocks, or one clear error when nothing is left."""
    middle = num_layers - bottom - top
    if middle < 1:
        raise FedtuneError(
            f"offsite.bottom={bottom} + offsite.top={top} adapter blocks leave no middle block of this model's "
            f"{num_layers} blocks for the emulator; use fewer adapter blocks (bottom + top < {num_layers})")
    k = kept_count(middle, drop)
    if k < 1:
        raise FedtuneError(
            f"offsite.drop={drop} drops all {middle} middle blocks (it keeps round({middle}·(1 − {drop})) = {k}); "
            f"use a smaller drop (below {1 - 0.5 / middle:.4g} keeps at least one block)")
    return Plan(num_layers, bottom, top, tuple(bottom + i for i in uniform_keep(middle, k)))
