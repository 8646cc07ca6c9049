"""IMDB sentiment (Maas et al. 2011) as in HELM: "Passage: ...\\nSentiment: Positive|Negative".

HELM shows 5 in-context examples and generates the label; here the label is chosen by the
log-probability of " Positive" vs " Negative" after the prompt (never an unparsable answer). The
in-context examples are drawn once (seeded, alternating labels) from the same 100-review sample
and left out of the evaluated set, since the sample has no training split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from fedtune.errors import FedtuneError
from fedtune.eval.tasks.base import Task, TaskContext, register_task

LABELS = ("positive", "negative")


def _passage(text: str) -> str:
    return " ".join(text.replace("<br />", " ").split())


@dataclass
class IMDB(Task):
    name = "imdb"
    kind = "choice"
    metric = "accuracy"
    description = "IMDB sentiment (100-review sample), k-shot, label by log-probability"

    bounds = {"shots": (0, 50)}  # alternating labels from a 100-review sample

    shots: int = 5

    def examples(self, ctx: TaskContext) -> list[dict[str, Any]]:
        from fedtune.eval.data import load_eval_source

        rows = load_eval_source("imdb", ctx.data_cfg, ctx.data_setting)
        rng = random.Random(ctx.seed)
        pools = {lab: [r for r in rows if r["label"] == lab] for lab in LABELS}
        for p in pools.values():
            rng.shuffle(p)
        want = min(self.shots, len(rows) - 1)
        short = [lab for k, lab in enumerate(LABELS) if len(pools[lab]) < (want - k + 1) // 2]
        if short:
            raise FedtuneError(f"imdb.shots={self.shots} needs {(want + 1) // 2} '{short[0]}' reviews for its in-context "
                               f"examples, the sample has {len(pools[short[0]])}; lower imdb.shots")
        shots = [pools[LABELS[i % 2]][i // 2] for i in range(want)]
        self._demo = "".join(f"Passage: {_passage(r['text'])}\nSentiment: {r['label'].capitalize()}\n\n" for r in shots)
        used = {id(r) for r in shots}
        return [r for r in rows if id(r) not in used]

    def pairs(self, ex: dict[str, Any], ctx: TaskContext) -> list[tuple[str, str]]:
        ctx_text = f"{self._demo}Passage: {_passage(ex['text'])}\nSentiment:"
        return [(ctx_text, f" {lab.capitalize()}") for lab in LABELS]

    def score(self, ex: dict[str, Any], output: list[Any], ctx: TaskContext) -> dict[str, Any]:
        pred = LABELS[0] if output[0] >= output[1] else LABELS[1]
        return {"id": ex["id"], "gold": ex["label"], "pred": pred, "accuracy": float(pred == ex["label"])}

    def notes(self) -> list[str]:
        return ["IMDB: a derived 100-review sample of the test split; the in-context examples come from it "
                "and are not evaluated"]


register_task(IMDB)
