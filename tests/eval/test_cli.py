"""``fedtune eval`` on adapters, merged models and run directories, and its user errors."""

import json

import pytest

from fedtune.cli import main


def test_adapter_from_another_base_model_is_refused(tmp_path, capsys, save_tiny_adapter):
    save_tiny_adapter("tiny-llama", tmp_path / "adapter")
    rc = main(["eval", str(tmp_path / "adapter"), "--base", "tiny-qwen2", "--tasks", "gsm8k", "--limit", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "trained on base model 'tiny-llama'" in err and "--base tiny-llama" in err
    assert "Traceback" not in err


def test_missing_data_file_names_the_file_and_the_setting(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(tmp_path / "nothing"))
    monkeypatch.setenv("FEDTUNE_OFFLINE", "1")
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()  # a directory without the task's file (one that does not exist is refused earlier)
    rc = main(["eval", "tiny-llama", "--tasks", "openbookqa", "--limit", "1", "--data-dir", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert rc == 2 and "openbookqa/test.jsonl" in err and "--data-dir" in err and "$FEDTUNE_DATA_DIR" in err


def test_bad_task_and_option_names(capsys):
    assert main(["eval", "tiny-llama", "--tasks", "gsm8kk"]) == 2
    assert "did you mean 'gsm8k'" in capsys.readouterr().err
    assert main(["eval", "tiny-llama", "--tasks", "gsm8k", "gsm8k.shot=3"]) == 2
    assert "did you mean 'shots'" in capsys.readouterr().err
    assert main(["eval", "tiny-llama"]) == 2
    assert "--suite" in capsys.readouterr().err


def test_adapter_merged_model_and_run_dir_agree(tmp_path, data_dir, save_tiny_adapter):
    """An adapter, the same adapter merged into a saved model, and a run directory holding it give
    the same MMLU log-probabilities."""
    from peft import PeftModel

    pm, state, tok = save_tiny_adapter("tiny-llama", tmp_path / "run" / "adapter", seed=1)
    (tmp_path / "run" / "config.yaml").write_text("model:\n  name: tiny-llama\ndata:\n  preset: fed-dolly\n")
    from fedtune.config import ModelConfig
    from fedtune.models import load_model

    base, _ = load_model(ModelConfig(name="tiny-llama"))
    merged = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")

    def logprobs(target, *extra):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        assert main(["eval", str(target), "--tasks", "mmlu", "--limit", "3", "--out", str(out), "-q",
                     "--data-dir", str(data_dir), *extra]) == 0
        rep = json.loads((out / "results.json").read_text())
        lines = (out / "samples").rglob("mmlu.jsonl")
        return rep, {p.parent.name: [json.loads(x)["logprobs"] for x in p.read_text().splitlines()] for p in lines}

    rep_a, lp_a = logprobs(tmp_path / "run" / "adapter")
    rep_m, lp_m = logprobs(tmp_path / "merged")
    rep_r, lp_r = logprobs(tmp_path / "run", "--compare-base")
    assert [t["label"] for t in rep_r["targets"]] == ["base", "adapter"]
    a, m = lp_a["adapter"], lp_m["merged"]
    assert all(x == pytest.approx(y, abs=1e-3) for ra, rm in zip(a, m) for x, y in zip(ra, rm))
    assert lp_r["adapter"] == a
    assert lp_r["base"] != a  # the adapter changes the model
