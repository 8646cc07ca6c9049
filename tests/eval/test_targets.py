"""Opening adapters on the cached base model: the base-model check tells same-shaped models with
different weights apart (and accepts the same weights under another name or dtype), and the
cached base comes back bit-identical after any number of LoRA targets."""

import json
import logging

import pytest
import torch

from fedtune.errors import FedtuneError
from fedtune.eval.targets import ModelCache, open_target, resolve_targets


def _variant(tmp_path, name, change=None):
    """tiny-llama's weights saved as a local model directory, optionally changed first."""
    from fedtune.config import ModelConfig
    from fedtune.models import load_model

    model, tok = load_model(ModelConfig(name="tiny-llama"))
    if change is not None:
        with torch.no_grad():
            change(model)
    out = tmp_path / name
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _fine_tune(model):
    """What a fine-tune does to a checkpoint: every weight moves a little (1e-3 of its tensor's
    spread; SmolLM2 base vs Instruct differ by far more)."""
    g = torch.Generator().manual_seed(5)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 1e-3 * p.std())


def _reinit(model):
    """Another random initialisation of the same architecture."""
    g = torch.Generator().manual_seed(99)
    for p in model.parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _open(adapter, base, dtype="float32"):
    t = resolve_targets(str(adapter), base=base).targets[0]
    with open_target(t, ModelCache(dtype=dtype)) as (model, tok, template):
        return model


def test_same_architecture_different_weights_is_refused(tmp_path, save_tiny_adapter, caplog):
    save_tiny_adapter("tiny-llama", tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "fedtune_adapter.json").read_text())
    assert meta["base_model_probe"]["dtype"] == "float32" and len(meta["base_model_probe"]["values"]) == 8

    # the same weights under another name, and in other dtypes: accepted, without a warning
    same = _variant(tmp_path, "same")
    with caplog.at_level(logging.WARNING, logger="fedtune.eval.targets"):
        for base, dtype in ((same, "float32"), (same, "bfloat16"), (same, "float16"), (None, "bfloat16")):
            _open(tmp_path / "adapter", base, dtype)
    assert not caplog.records

    # another checkpoint of the same architecture: refused, naming both models and the fix
    for name, change in (("tuned", _fine_tune), ("reinit", _reinit)):
        other = _variant(tmp_path, name, change)
        for dtype in ("float32", "bfloat16"):
            with pytest.raises(FedtuneError) as e:
                _open(tmp_path / "adapter", other, dtype)
            msg = str(e.value)
            assert "trained on base model 'tiny-llama'" in msg and other in msg, msg
            assert "different weights" in msg and "--base tiny-llama" in msg, msg


def test_adapter_without_weight_probe_keeps_the_warning(tmp_path, save_tiny_adapter, caplog):
    save_tiny_adapter("tiny-llama", tmp_path / "adapter")
    f = tmp_path / "adapter" / "fedtune_adapter.json"
    meta = json.loads(f.read_text())
    del meta["base_model_probe"]  # as written by older fedtune
    f.write_text(json.dumps(meta))
    other = _variant(tmp_path, "tuned", _fine_tune)
    with caplog.at_level(logging.WARNING, logger="fedtune.eval.targets"):
        _open(tmp_path / "adapter", other)
    assert any("same architecture" in r.getMessage() for r in caplog.records)


def test_cli_refuses_a_fine_tuned_base(tmp_path, save_tiny_adapter, capsys):
    from fedtune.cli import main

    save_tiny_adapter("tiny-llama", tmp_path / "adapter")
    other = _variant(tmp_path, "tuned", _fine_tune)
    rc = main(["eval", str(tmp_path / "adapter"), "--base", other, "--tasks", "gsm8k", "--limit", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "different weights" in err and "--base tiny-llama" in err and "Traceback" not in err


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cached_base_is_bit_identical_after_lora_targets(tmp_path, save_tiny_adapter, dtype):
    """Merging and unmerging LoRA into the shared cached base is lossy in floating point (in half
    precision badly so): after any number of LoRA targets the base must be exactly as loaded, and
    every target must still see its adapter."""
    for i in range(3):
        save_tiny_adapter("tiny-llama", tmp_path / f"a{i}", seed=i)
    cache = ModelCache(dtype=dtype)
    base, _ = cache.get("tiny-llama")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    x = torch.tensor([[1, 50, 300, 7, 9]])
    with torch.no_grad():
        plain = base(x).logits.float()
    for _ in range(2):
        for i in range(3):
            t = resolve_targets(str(tmp_path / f"a{i}")).targets[0]
            with open_target(t, cache) as (model, tok, template):
                with torch.no_grad():
                    adapted = model(input_ids=x).logits.float()
                assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapter is in effect
    after = dict(base.named_parameters())
    assert after.keys() == before.keys()
    changed = [n for n in before if not torch.equal(after[n], before[n])]
    assert changed == []
    with torch.no_grad():
        assert torch.equal(base(x).logits.float(), plain)
