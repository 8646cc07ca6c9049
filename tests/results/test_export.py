"""``fedtune export``: a merged model loads with plain transformers and computes what base + adapter
computes; the adapter export is a PEFT adapter; errors leave nothing behind."""

import json

import pytest
import torch

from fedtune import cli
from fedtune.export import export


def _logits_with_peft(model_name, adapter_dir, ids):
    """The reference: the base model with the adapter applied by peft (unmerged, fp32)."""
    from peft import PeftModel

    from fedtune.config import ModelConfig
    from fedtune.models import load_model

    base, _ = load_model(ModelConfig(name=model_name))
    pm = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return pm(input_ids=ids).logits


@pytest.mark.parametrize("model_name,dtype,tol", [("tiny-llama", "float32", 1e-5), ("tiny-gpt2", "float32", 1e-5),
                                                  ("tiny-llama", "bfloat16", 0.03)])
def test_merged_export_loads_without_peft_and_equals_base_plus_adapter(model_name, dtype, tol, make_adapter,
                                                                       tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_adapter("lora", model=model_name)
    out = export(str(adapter), tmp_path / "merged", merged=True, dtype=dtype)
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and "fedtune_name" not in cfg and cfg["dtype"] == dtype
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # plain transformers, no peft
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.dtype == getattr(torch, dtype)
    assert not any("lora" in n for n, _ in model.named_parameters())
    ids = torch.tensor([tok("Say apple three times, please")["input_ids"]])
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
    want = _logits_with_peft(model_name, adapter, ids)
    scale = want.abs().max()
    assert (got - want).abs().max() <= tol * scale
    # ... and the adapter matters: the export is not just the base model
    from fedtune.config import ModelConfig
    from fedtune.models import load_model

    base, _ = load_model(ModelConfig(name=model_name))
    with torch.no_grad():
        assert (base(input_ids=ids).logits - want).abs().max() > 10 * tol * scale
    assert json.loads((out / "fedtune_template.json").read_text())["name"] == "alpaca"


def test_adapter_export_of_a_run_with_model_card(tiny_runs, tmp_path):
    from peft import PeftModel

    from fedtune.config import ModelConfig
    from fedtune.models import load_model

    run, _ = tiny_runs["fed"]
    assert cli.main(["export", str(run), "--out", str(tmp_path / "a")]) == 0
    out = tmp_path / "a"
    names = {f.name for f in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "fedtune_template.json", "README.md",
            "fedtune_config.yaml", "fedtune_export.json"} <= names
    assert out.stat().st_mode & 0o055  # an ordinary directory, not mkdtemp's private one
    assert all(f.stat().st_mode & 0o044 for f in out.iterdir())  # and files others can read
    base, _ = load_model(ModelConfig(name="tiny-llama"))
    PeftModel.from_pretrained(base, str(out))  # a normal PEFT adapter
    card = (out / "README.md").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final_val = [r["val_loss"] for r in rows if r["kind"] == "round" and "val_loss" in r][-1]
    assert "`tiny-llama`" in card and "scenario `fed`, algorithm `fedavg`, 1 round" in card
    assert "| val_loss | " in card and f"{final_val:.4f}" in card
    assert f"fedtune export {run} --out {out}" in card and "### Response:" in card


def test_export_errors_leave_nothing_behind(tiny_runs, make_adapter, tmp_path, capsys):
    run, _ = tiny_runs["fed"]

    def rc_err(*argv):
        rc = cli.main(["export", *map(str, argv)])
        return rc, capsys.readouterr().err

    rc, err = rc_err(make_adapter("prefix"), "--merged", "--out", tmp_path / "p")
    assert rc == 2 and "prefix tuning adapter" in err and "cannot be merged" in err and "without --merged" in err
    rc, err = rc_err("tiny-llama", "--out", tmp_path / "m")
    assert rc == 2 and err.startswith("error: tiny-llama: no such directory")
    rc, err = rc_err(run / "nope", "--out", tmp_path / "m")
    assert rc == 2
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    rc, err = rc_err(run, "--out", tmp_path / "taken")
    assert rc == 2 and "already exists; give --overwrite" in err
    rc, err = rc_err(run, "--out", tmp_path / "taken", "--overwrite")
    assert rc == 2 and "not an earlier fedtune export" in err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    rc, err = rc_err(run, "--out", run.parent, "--overwrite")
    assert rc == 2 and "holds the adapter being exported" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temp dirs, no half export


def test_a_failed_merge_is_not_half_written_and_overwrite_replaces_an_export(make_adapter, tmp_path, monkeypatch):
    adapter = make_adapter("lora")
    out = export(str(adapter), tmp_path / "x")
    first = (out / "fedtune_export.json").read_text()

    import transformers

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export(str(adapter), tmp_path / "x", merged=True, overwrite=True)
    assert (out / "fedtune_export.json").read_text() == first  # the earlier export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    monkeypatch.undo()
    export(str(adapter), tmp_path / "x", merged=True, overwrite=True)
    assert json.loads((out / "fedtune_export.json").read_text())["kind"] == "merged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
