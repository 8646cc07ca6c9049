"""Fixtures for the tests of what a run produced (``fedtune chat``, ``export``, ``compare``): tiny
runs made once per session through the real command, and adapters of every PEFT method."""

import contextlib
import io
import json

import pytest


def write_toy_data(path, n_per_cat=14):
    rows = []
    for cat, word in (("alpha", "apple"), ("beta", "banana"), ("gamma", "cherry")):
        for i in range(n_per_cat):
            rows.append({"instruction": f"Say {word} {i} times", "input": "" if i % 2 else f"n={i}",
                         "output": " ".join([word] * (1 + i % 5)), "category": cat})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(root, name, *overrides):
    """One round of a tiny run through ``fedtune run``; returns (run_dir, what reached stderr)."""
    from fedtune import cli

    data = root / "toy.jsonl"
    if not data.exists():
        write_toy_data(data)
    cfg = root / "cfg.yaml"
    cfg.write_text(f"""
seed: 3
model: {{name: tiny-llama}}
data: {{source: {data}, splitter: meta, num_clients: 3, label_field: category, max_length: 32,
        val_fraction: 0.15, test_fraction: 0.15, cache_dir: {root / 'tok'}}}
peft: {{method: lora, r: 4}}
train: {{lr: 0.01, batch_size: 2, local_steps: 1}}
fl: {{rounds: 1}}
eval: {{splits: [val]}}
output: {{tensorboard: false, progress: false}}
""")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["run", str(cfg), f"output.dir={root / name}", "-q", *overrides]) == 0
    return root / name, err.getvalue()


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """``{"fed": (dir, stderr), "local": (dir, stderr)}``: one round each on tiny-llama."""
    root = tmp_path_factory.mktemp("runs")
    return {"fed": _run(root, "fed"), "local": _run(root, "local", "fl.scenario=local")}


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory):
    """``make(method, model="tiny-llama", template="alpaca")``: an adapter saved by fedtune with
    visibly non-zero weights (metadata and template included); returns its directory."""
    import torch

    root = tmp_path_factory.mktemp("adapters")
    made = {}

    def make(method, model="tiny-llama", template="alpaca"):
        key = (method, model, template)
        if key not in made:
            from fedtune.adapters import attach_adapter, get_adapter_state, save_adapter
            from fedtune.config import ModelConfig, PeftConfig
            from fedtune.data import get_template
            from fedtune.models import load_model

            base, tok = load_model(ModelConfig(name=model))
            torch.manual_seed(0)
            pm = attach_adapter(base, PeftConfig(method=method, r=4, num_virtual_tokens=4), tok)
            state = {k: torch.randn_like(v) * 0.5 for k, v in get_adapter_state(pm).items()}
            out = root / f"{method}-{model}-{template}"
            save_adapter(pm, state, out, files={"fedtune_template.json": json.dumps(get_template(template).to_dict())})
            made[key] = out
        return made[key]

    return make
