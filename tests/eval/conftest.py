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
