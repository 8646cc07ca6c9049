"""Shared fixtures for the evaluation tests: a tiny model (float64, so greedy decisions never hinge
on rounding) and an engine over it."""

import os
from pathlib import Path

import pytest

DATA = Path(os.environ.get("FEDTUNE_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")


@pytest.fixture(scope="session")
def tiny():
    from fedtune.config import ModelConfig
    from fedtune.models import load_model

    model, tok = load_model(ModelConfig(name="tiny-llama"))
    return model.double(), tok


@pytest.fixture()
def engine(tiny):
    from fedtune.eval.engine import Engine

    model, tok = tiny
    return Engine(model, tok, batch_size=4, progress=False)


@pytest.fixture(scope="session")
def data_dir():
    if not (DATA / "gsm8k" / "test.jsonl").is_file():
        pytest.skip(f"evaluation data not found in {DATA} (set FEDTUNE_DATA_DIR)")
    return DATA


@pytest.fixture(scope="session")
def save_tiny_adapter():
    """``save(model_name, out_dir, seed=0, dtype="float32")``: a LoRA adapter with visibly non-zero
    weights saved by fedtune (metadata and template included); returns ``(peft_model, state, tok)``."""
    import json

    import torch

    def save(name, out, seed=0, dtype="float32"):
        from fedtune.adapters import attach_adapter, get_adapter_state, save_adapter
        from fedtune.config import ModelConfig, PeftConfig
        from fedtune.data import get_template
        from fedtune.models import load_model

        model, tok = load_model(ModelConfig(name=name, dtype=dtype))
        torch.manual_seed(seed)
        pm = attach_adapter(model, PeftConfig(method="lora", r=4))
        state = {k: torch.randn_like(v) * 0.5 for k, v in get_adapter_state(pm).items()}  # a visible change
        save_adapter(pm, state, out)
        (out / "fedtune_template.json").write_text(json.dumps(get_template("alpaca").to_dict()))
        return pm, state, tok

    return save
