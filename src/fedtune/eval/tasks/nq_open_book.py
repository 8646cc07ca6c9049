"""NaturalQuestions open-book (Kwiatkowski et al. 2019): answer a question from its gold passage.

Each NQ-open dev question comes with its gold Wikipedia passage (the lost-in-the-middle oracle
file); the model reads "Title / Passage / Question" and answers on one line. The metric is HELM's
token F1 (lower-cased, punctuation and articles removed), the best over the gold answers. One
fixed in-context example is drawn (seeded) and left out of the evaluated set.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

from fedtune.eval.engine import GenRequest
from fedtune.eval.tasks.base import Task, TaskContext, register_task, wrap_prompt


def normalize(text: str) -> str:
    """SQuAD/HELM answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def _block(ex: dict[str, Any]) -> str:
    return f"Title: {ex['title']}\n\nPassage: {ex['passage']}\n\nQuestion: {ex['question']}?\nAnswer:"


@dataclass
class NQOpenBook(Task):
    name = "nq-open-book"
    kind = "generate"
    metric = "f1"
    description = "NaturalQuestions open-book (gold passage), token F1"

    bounds = {"shots": (0, 20)}  # each shot is a whole Wikipedia passage

    shots: int = 1
    max_new_tokens: int = 32
    prompt: str = "raw"

    def examples(self, ctx: TaskContext) -> list[dict[str, Any]]:
        from fedtune.eval.data import load_eval_source

        rows = load_eval_source("nq-open-book", ctx.data_cfg, ctx.data_setting)
        shots = random.Random(ctx.seed).sample(range(len(rows)), min(self.shots, len(rows) - 1))
        self._demo = "".join(f"{_block(rows[i])} {rows[i]['answers'][0]}\n\n" for i in shots)
        return [r for i, r in enumerate(rows) if i not in set(shots)]

    def requests(self, ex: dict[str, Any], ctx: TaskContext) -> list[GenRequest]:
        return [GenRequest(wrap_prompt(self._demo + _block(ex), ctx, self.prompt), self.max_new_tokens, ("\n",))]

    def score(self, ex: dict[str, Any], output: list[Any], ctx: TaskContext) -> dict[str, Any]:
        pred = output[0].text.strip()
        f1 = max(token_f1(pred, g) for g in ex["answers"]) if ex["answers"] else 0.0
        em = float(any(normalize(pred) == normalize(g) for g in ex["answers"]))
        return {"id": ex["id"], "question": ex["question"], "answers": ex["answers"], "pred": pred,
                "f1": f1, "exact_match": em}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(records) or 1
        return {"f1": sum(r["f1"] for r in records) / n, "exact_match": sum(r["exact_match"] for r in records) / n}

    def notes(self) -> list[str]:
        return ["NaturalQuestions open-book: NQ-open dev questions with their gold passage (nq-open-oracle), "
                "not HELM's full-document long-answer contexts"]


register_task(NQOpenBook)
