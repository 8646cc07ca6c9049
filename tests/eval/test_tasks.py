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
