"""OpenbookQA (Mihaylov et al. 2018), as HELM evaluates it in FS-LLM's run specs.

``multiple_choice_separate_calibrated``: every answer is scored separately as a continuation of
the question, and its log-probability is calibrated by that of the same answer after a bare
"Answer:" (so answers that are likely anyway do not win), zero-shot. Accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedtune.eval.tasks.base import Task, TaskContext, register_task


@dataclass
class OpenbookQA(Task):
    name = "openbookqa"
    kind = "choice"
    metric = "accuracy"
    description = "OpenbookQA test (500), answers scored separately by calibrated log-probability"

    #: subtract log p(answer | "Answer:") as HELM's calibrated method does.
    calibrated: bool = True

    def examples(self, ctx: TaskContext) -> list[dict[str, Any]]:
        from fedtune.eval.data import load_eval_source

        return load_eval_source("openbookqa", ctx.data_cfg, ctx.data_setting)

    def pairs(self, ex: dict[str, Any], ctx: TaskContext) -> list[tuple[str, str]]:
        ctx_text = f"Question: {ex['question']}\nAnswer:"
        out = [(ctx_text, f" {c}") for c in ex["choices"]]
        if self.calibrated:
            out += [("Answer:", f" {c}") for c in ex["choices"]]
        return out

    def score(self, ex: dict[str, Any], output: list[Any], ctx: TaskContext) -> dict[str, Any]:
        k = len(ex["choices"])
        scores = [output[i] - output[k + i] if self.calibrated else output[i] for i in range(k)]
        pred = max(range(k), key=lambda i: scores[i])
        return {"id": ex["id"], "gold": ex["answer"], "pred": pred, "scores": [round(s, 4) for s in scores],
                "accuracy": float(pred == ex["answer"])}


register_task(OpenbookQA)
