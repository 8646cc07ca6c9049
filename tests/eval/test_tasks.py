"""Contract: every registered task runs end to end on a tiny model with --limit 2, through the
command line, and writes its results."""

import json

import pytest

from fedtune.cli import main
from fedtune.eval.tasks import TASKS

OPTIONS = {"heldout": ["heldout.data=fed-gsm8k-3"],  # a base model has no run to take a split from
           "humaneval": ["humaneval.max_new_tokens=16"], "gsm8k": ["gsm8k.max_new_tokens=16"]}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_runs_with_limit_2(name, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["eval", "tiny-llama", "--tasks", name, "--limit", "2", "--out", str(out), "-q",
               "--data-dir", str(data_dir), *OPTIONS.get(name, [])])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "results.json").read_text())
    res = report["targets"][0]["results"][name]
    assert res["task"] == name and res["metric"] in res["metrics"]
    assert res["score"] is not None
    expected_n = 2 * len(res["parts"]) if res.get("parts") else 2
    if name != "heldout":  # heldout: --limit caps each client's records
        assert res["num_examples"] == expected_n
    assert f"| base |" in (out / "results.md").read_text()


def test_humaneval_sampling_reports_pass_at_k(data_dir, tmp_path):
    rc = main(["eval", "tiny-llama", "--tasks", "humaneval", "--limit", "2", "--out", str(tmp_path), "-q",
               "humaneval.n=3", "humaneval.ks=[1,2]", "humaneval.temperature=0.8", "humaneval.max_new_tokens=8"])
    assert rc == 0
    m = json.loads((tmp_path / "results.json").read_text())["targets"][0]["results"]["humaneval"]["metrics"]
    assert set(m) >= {"pass@1", "pass@2", "outcomes"} and sum(m["outcomes"].values()) == 6


def test_humaneval_headline_without_k_1(data_dir, tmp_path):
    """ks without 1: the headline is the smallest k computed (this crashed with KeyError 'pass@1'
    after all the generation work); a scalar ks is a list of one."""
    rc = main(["eval", "tiny-llama", "--tasks", "humaneval", "--limit", "1", "--out", str(tmp_path), "-q",
               "humaneval.n=2", "humaneval.ks=[2,3]", "humaneval.temperature=0.8", "humaneval.max_new_tokens=4"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())["targets"][0]["results"]["humaneval"]
    assert res["metric"] == "pass@2" and res["score"] == res["metrics"]["pass@2"] and "pass@3" not in res["metrics"]
    from fedtune.eval.tasks import get_task

    assert get_task("humaneval").configure({"ks": 2, "n": 2, "temperature": 0.8}).ks == (2,)


@pytest.mark.parametrize("opts, says", [
    (["humaneval.ks=[2]"], "asks for no k at most humaneval.n=1"),
    (["humaneval.ks=[5,10]", "humaneval.n=2", "humaneval.temperature=0.8"], "raise humaneval.n to 5"),
    (["humaneval.n=4"], "identical completions"),
    (["humaneval.ks=[0,1]"], "positive whole number"),
    (["humaneval.ks=one"], "positive whole number"),
    (["humaneval.n=0"], "(samples per problem) must be from 1 to 100000"),
    (["humaneval.temperature=-0.5"], "must be 0 (greedy) or positive"),
    (["humaneval.top_p=1.5"], "(0, 1]"),
    (["humaneval.prompt=chat"], "'raw' or 'template'"),
    (["gsm8k.temperature=-1"], "gsm8k.temperature"),
])
def test_bad_generation_options_fail_before_the_model_loads(opts, says, capsys, monkeypatch):
    import fedtune.models

    def no_loading(*a, **kw):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(fedtune.models, "load_model", no_loading)
    task = opts[0].split(".")[0]
    assert main(["eval", "tiny-llama", "--tasks", task, "--limit", "1", *opts]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err


def test_a_new_task_file_is_found_without_a_hand_list(tmp_path, monkeypatch, data_dir, capsys):
    """Adding a task is one file: a module dropped into the tasks package registers itself."""
    import sys

    import fedtune.eval.tasks as tasks

    (tmp_path / "toy_echo.py").write_text('''
from dataclasses import dataclass

from fedtune.eval.engine import GenRequest
from fedtune.eval.tasks.base import Task, register_task


@dataclass
class ToyEcho(Task):
    name = "toy-echo"
    kind = "generate"
    metric = "nonempty"

    def examples(self, ctx):
        return [{"id": i, "text": t} for i, t in enumerate(["one two", "three four", "five six"])]

    def requests(self, ex, ctx):
        return [GenRequest(ex["text"], 3)]

    def score(self, ex, output, ctx):
        return {"id": ex["id"], "nonempty": float(bool(output[0].text))}


register_task(ToyEcho)
''')
    monkeypatch.setattr(tasks, "__path__", [*tasks.__path__, str(tmp_path)])
    monkeypatch.delitem(tasks.TASKS, "toy-echo", raising=False)
    try:
        tasks.load_task_modules()
        assert "toy-echo" in tasks.TASKS
        assert main(["eval", "tiny-llama", "--tasks", "toy-echo", "--limit", "2", "--out", str(tmp_path / "out"),
                     "-q"]) == 0, capsys.readouterr().err
        res = json.loads((tmp_path / "out" / "results.json").read_text())["targets"][0]["results"]["toy-echo"]
        assert res["num_examples"] == 2
    finally:
        tasks.TASKS.pop("toy-echo", None)
        sys.modules.pop("fedtune.eval.tasks.toy_echo", None)
