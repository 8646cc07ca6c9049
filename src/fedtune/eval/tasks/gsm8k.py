"""GSM8K-test (Cobbe et al. 2021) with 8-shot chain-of-thought prompting (Wei et al. 2022).

The 8 exemplars are Wei et al.'s standard GSM8K chain-of-thought exemplars (Table 20 of the CoT
paper), in their original order, each ending with "The answer is N." as in FS-LLM's evaluation
and in our GSM8K training targets. Answer extraction follows the paper/FS-LLM: the first number
after "The answer is", else the last number in the completion; commas are removed. Unlike
FS-LLM's string comparison ("18.0" != "18"), answers are compared as numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fedtune.eval.engine import GenRequest
from fedtune.eval.tasks.base import Task, TaskContext, register_task, wrap_prompt
from fedtune.utils import derive_seed

ANSWER_TRIGGER = "The answer is"

#: (question, chain of thought, answer): Wei et al. 2022, the GSM8K exemplars.
EXEMPLARS: tuple[tuple[str, str, str], ...] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
     "done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
     "have been 21 - 15 = 6.", "6"),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.", "5"),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating "
     "35, they had 74 - 35 = 39.", "39"),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops "
     "did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny "
     "20 - 12 = 8.", "8"),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he "
     "have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
     "5 + 4 = 9.", "9"),
    ("There were nine computers in the server room. Five more computers were installed each day, from "
     "monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29.", "29"),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many "
     "golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 "
     "more, he had 35 - 2 = 33 golf balls.", "33"),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
     "dollars left. 23 - 15 is 8.", "8"),
)

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The predicted number as a string (commas removed), or None when there is none.

    "The answer is N" (case-insensitive; the first number after the first trigger) wins;
    otherwise the last number in the text.
    """
    low = text.replace(",", "").lower()
    parts = low.split(ANSWER_TRIGGER.lower(), 1)
    if len(parts) == 2:
        found = _NUMBER.findall(parts[1])
        if found:
            return found[0]
    found = _NUMBER.findall(low)
    return found[-1] if found else None


def same_number(pred: str | None, gold: str) -> bool:
    if pred is None:
        return False
    try:
        return abs(float(pred) - float(gold.replace(",", ""))) < 1e-6
    except ValueError:
        return False


def gold_answer(output: str) -> str:
    """The reference number of a GSM8K record (our sources end it with 'The answer is N')."""
    head, sep, tail = output.rpartition(ANSWER_TRIGGER)
    if not sep:
        head, sep, tail = output.rpartition("####")
    return tail.strip().rstrip(".").replace(",", "")


def few_shot_prompt(question: str, shots: int = 8) -> str:
    demo = "".join(f"Q: {q}\nA: {c} {ANSWER_TRIGGER} {a}.\n\n" for q, c, a in EXEMPLARS[:shots])
    return f"{demo}Q: {question}\nA:"


@dataclass
class GSM8K(Task):
    name = "gsm8k"
    kind = "generate"
    metric = "accuracy"
    description = "GSM8K-test (1,319 problems), 8-shot chain of thought, exact numeric answer"

    bounds = {"shots": (0, len(EXEMPLARS))}  # Wei et al. publish 8 exemplars

    shots: int = 8
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.95
    #: ``raw`` (the few-shot prompt itself, as FS-LLM) or ``template``.
    prompt: str = "raw"

    def examples(self, ctx: TaskContext) -> list[dict[str, Any]]:
        from fedtune.data.sources import SOURCES, locate

        source = SOURCES["gsm8k-test"]  # the training registry's source: one copy, one checksum
        recs = source.parse(locate(source, ctx.data_cfg, ctx.data_setting))
        return [{"id": i, "question": r.instruction, "answer": gold_answer(r.output)} for i, r in enumerate(recs)]

    def requests(self, ex: dict[str, Any], ctx: TaskContext) -> list[GenRequest]:
        text = wrap_prompt(few_shot_prompt(ex["question"], self.shots), ctx, self.prompt)
        return [GenRequest(text, self.max_new_tokens, ("\n\n", "\nQ:"), self.temperature, self.top_p,
                           derive_seed(ctx.seed, "gsm8k", ex["id"]))]

    def score(self, ex: dict[str, Any], output: list[Any], ctx: TaskContext) -> dict[str, Any]:
        pred = extract_answer(output[0].text)
        return {"id": ex["id"], "gold": ex["answer"], "pred": pred, "completion": output[0].text,
                "accuracy": float(same_number(pred, ex["answer"]))}


register_task(GSM8K)
