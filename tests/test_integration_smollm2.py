"""A few integration tests with the real SmolLM2-135M-Instruct (the embedded GGUF)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedtune.config import ModelConfig, load_config

DATA = Path(os.environ.get("FEDTUNE_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "dolly").is_dir(), reason="benchmark data not available")


@pytest.fixture(scope="module")
def smol():
    from fedtune.models import load_model

    load_model(ModelConfig())  # first call may dequantise into the cache
    t = time.perf_counter()
    model, tok = load_model(ModelConfig())
    return model, tok, time.perf_counter() - t


def test_smollm2_loads_from_cache_and_is_a_real_lm(smol):
    model, tok, seconds = smol
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert seconds < 15  # the cached load, not a 30 s dequantisation
    assert tok.pad_token_id is not None and tok.chat_template
    # a real LM: the capital-of-France continuation is far likelier than a random token
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    paris = tok(" Paris", add_special_tokens=False).input_ids[0]
    assert logits.argmax().item() == paris or torch.softmax(logits, -1)[paris] > 0.05


@needs_data
def test_federated_round_on_smollm2_fed_dolly(tmp_path, smol):
    from peft import PeftModel

    from fedtune.models import load_model
    from fedtune.run import run

    cfg = load_config(None, [
        "data.preset=fed-dolly", f"data.data_dir={DATA}", "data.num_clients=2", "data.max_length=96",
        "data.max_records_per_client=8", "data.max_eval_records_per_client=4", "train.batch_size=2",
        "train.local_steps=2", "train.lr=1e-3", "train.precision=auto", "model.dtype=auto", "fl.rounds=1", "eval.splits=[val]",
        f"output.dir={tmp_path / 'run'}", "output.tensorboard=false",
    ])
    res = run(cfg, verbose=False)
    rounds = [r for r in res.rows if r["kind"] == "round"]
    assert all(torch.isfinite(torch.tensor(r["val_loss"])) for r in rounds)
    assert rounds[-1]["train_loss"] < 6  # a pretrained model, not random (ln 49152 = 10.8)
    base, _ = load_model(ModelConfig())
    pm = PeftModel.from_pretrained(base, str(res.adapter_dir))
    assert pm.peft_config["default"].r == 8


@needs_data
def test_cli_data_describe_fed_dolly(tmp_path):
    out = tmp_path / "desc"
    p = subprocess.run([sys.executable, "-m", "fedtune.cli", "data", "describe", "fed-dolly", f"data.data_dir={DATA}",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "open_qa" in p.stdout and "brainstorming" in p.stdout
    assert (out / "label_distribution.png").stat().st_size > 1000
    assert (out / "description.json").is_file()
