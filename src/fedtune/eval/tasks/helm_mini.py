"""HELM-MINI (FS-LLM, Appendix A.2): the mean of four HELM scenarios that track full HELM.

MMLU (accuracy), NaturalQuestions open-book (token F1), OpenbookQA (accuracy) and IMDB
(accuracy), 100 examples each by default (``--limit`` changes that per part), averaged with equal
weight. Each part is its own task (and can be run alone); this file only composes them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from fedtune.errors import FedtuneError, unknown_name
from fedtune.eval.tasks.base import Task, TaskContext, TaskResult, get_task, register_task

PARTS = ("mmlu", "nq-open-book", "openbookqa", "imdb")


@dataclass
class HELMMini(Task):
    name = "helm-mini"
    kind = "suite"
    metric = "score"
    description = "HELM-MINI: mean of MMLU, NaturalQuestions (open-book), OpenbookQA, IMDB"
    default_limit = 100

    parts: tuple[str, ...] = PARTS

    def __post_init__(self) -> None:
        super().__post_init__()
        parts = (self.parts,) if isinstance(self.parts, str) else self.parts  # helm-mini.parts=mmlu
        if not isinstance(parts, (tuple, list)) or not parts or not all(isinstance(p, str) for p in parts):
            raise FedtuneError(f"option 'helm-mini.parts' must be a list of parts from {', '.join(PARTS)}, "
                               f"e.g. helm-mini.parts=[mmlu,imdb]; got {self.parts!r}")
        for p in parts:
            if p not in PARTS:
                raise unknown_name("helm-mini part", p, PARTS)
        if len(set(parts)) != len(parts):
            raise FedtuneError(f"option 'helm-mini.parts' lists a part twice: {list(parts)}")
        self.parts = tuple(parts)

    def run(self, ctx: TaskContext) -> TaskResult:
        t0 = time.perf_counter()
        limit = ctx.limit if ctx.limit is not None else self.default_limit
        sub = dataclasses.replace(ctx, limit=limit)
        results = {p: get_task(p)().run(sub) for p in self.parts}
        score = sum(r.score for r in results.values()) / len(results)
        metrics = {"score": score, **{f"{p}_{r.metric}": r.score for p, r in results.items()}}
        notes = [n for r in results.values() for n in r.notes]
        return TaskResult(self.name, self.metric, score, metrics, sum(r.num_examples for r in results.values()),
                          time.perf_counter() - t0, notes, parts=results)


register_task(HELMMini)
