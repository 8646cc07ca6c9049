"""MMLU (Hendrycks et al. 2021): 57 subjects, 5-shot from each subject's dev set.

The prompt is the original MMLU format (hendrycks/test ``evaluate.py``): "The following are
multiple choice questions (with answers) about <subject>." then five dev questions with their
answers, then the test question ending in "Answer:". The answer is the letter among A–D whose
token is most likely next (one forward pass per question). Accuracy is reported overall (over
questions), per category (STEM, humanities, social sciences, other) and per subject.

The data here is the authors' pre-release snapshot (see :data:`fedtune.eval.data.MMLU_NOTE`);
every result says so.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from fedtune.eval.tasks.base import Task, TaskContext, register_task

LETTERS = ("A", "B", "C", "D")


def format_question(row: dict[str, Any], with_answer: bool) -> str:
    text = row["question"] + "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, row["choices"])) + "\nAnswer:"
    return text + (f" {row['answer']}\n\n" if with_answer else "")


@dataclass
class MMLU(Task):
    name = "mmlu"
    kind = "choice"
    metric = "accuracy"
    description = "MMLU: 57 subjects, 5-shot from dev, letter chosen by next-token log-probability"

    bounds = {"shots": (0, 5)}  # each subject's dev split holds 5 questions

    shots: int = 5

    def examples(self, ctx: TaskContext) -> list[dict[str, Any]]:
        from fedtune.eval.data import load_eval_source

        rows = load_eval_source("mmlu", ctx.data_cfg, ctx.data_setting)
        dev: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if r["split"] == "dev":
                dev[r["subject"]].append(r)
        self._dev = dev
        return [r for r in rows if r["split"] == "test"]

    def prompt(self, ex: dict[str, Any]) -> str:
        subject = ex["subject"].replace("_", " ")
        head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        shots = "".join(format_question(d, True) for d in self._dev[ex["subject"]][: self.shots])
        return head + shots + format_question(ex, False)

    def pairs(self, ex: dict[str, Any], ctx: TaskContext) -> list[tuple[str, str]]:
        ctx_text = self.prompt(ex)
        return [(ctx_text, f" {L}") for L in LETTERS]

    def score(self, ex: dict[str, Any], output: list[Any], ctx: TaskContext) -> dict[str, Any]:
        from fedtune.eval.data import mmlu_category

        pred = LETTERS[max(range(4), key=lambda i: output[i])]
        return {"subject": ex["subject"], "category": mmlu_category(ex["subject"]), "gold": ex["answer"],
                "pred": pred, "logprobs": [round(x, 4) for x in output], "accuracy": float(pred == ex["answer"])}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        def acc(rs: list[dict[str, Any]]) -> float:
            return sum(r["accuracy"] for r in rs) / len(rs) if rs else float("nan")

        by_cat: dict[str, list] = defaultdict(list)
        by_sub: dict[str, list] = defaultdict(list)
        for r in records:
            by_cat[r["category"]].append(r)
            by_sub[r["subject"]].append(r)
        subj = {s: acc(rs) for s, rs in sorted(by_sub.items())}
        return {"accuracy": acc(records),
                "accuracy_macro_subjects": sum(subj.values()) / len(subj) if subj else float("nan"),
                "per_category": {c: {"accuracy": acc(rs), "n": len(rs)} for c, rs in sorted(by_cat.items())},
                "per_subject": {s: {"accuracy": subj[s], "n": len(by_sub[s])} for s in subj}}

    def notes(self) -> list[str]:
        from fedtune.eval.data import MMLU_NOTE

        return [MMLU_NOTE]


register_task(MMLU)
