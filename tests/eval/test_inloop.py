"""``eval.tasks`` in a run: the task is evaluated on the adapter every k rounds and logged with the
round metrics, without changing what training produces."""

import json

import pytest
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.run import run


def _cfg(tmp_path, data_dir, extra):
    rows = [{"instruction": f"Say {w} {i} times", "input": "", "output": " ".join([w] * (1 + i % 3)), "category": c}
            for c, w in (("a", "apple"), ("b", "pear")) for i in range(12)]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    f = tmp_path / "cfg.yaml"
    f.write_text(f"""
seed: 1
model: {{name: tiny-llama}}
data: {{source: {tmp_path / 'toy.jsonl'}, splitter: meta, num_clients: 2, max_length: 48, data_dir: {data_dir},
        cache_dir: {tmp_path / 'tok'}}}
peft: {{method: lora, r: 4}}
train: {{lr: 0.01, batch_size: 2, local_steps: 2}}
fl: {{rounds: 3}}
eval: {{every: 1, splits: [val]}}
checkpoint: {{every: 3}}
output: {{tensorboard: false, progress: false}}
""")
    return load_config(f, extra)


def test_task_metrics_logged_every_k_rounds_and_training_unchanged(tmp_path, data_dir):
    opts = ["eval.tasks=[mmlu]", "eval.task_limit=2", "eval.task_every=2"]
    with_tasks = run(_cfg(tmp_path, data_dir, opts + [f"output.dir={tmp_path / 'a'}"]), verbose=False)
    plain = run(_cfg(tmp_path, data_dir, [f"output.dir={tmp_path / 'b'}"]), verbose=False)
    rounds = [r for r in with_tasks.rows if r["kind"] == "round"]
    logged = [r["round"] for r in rounds if "mmlu_accuracy" in r]
    assert logged == [0, 2, 3]  # every 2 rounds, round 0, and the last round
    assert all(0.0 <= r["mmlu_accuracy"] <= 1.0 and r["task_eval_seconds"] > 0 for r in rounds if "mmlu_accuracy" in r)
    a = load_file(str(with_tasks.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(plain.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_unknown_task_in_config_fails_before_training(tmp_path, data_dir):
    from fedtune.errors import FedtuneError

    with pytest.raises(FedtuneError, match="did you mean 'gsm8k'"):
        run(_cfg(tmp_path, data_dir, ["eval.tasks=[gsm8kk]", f"output.dir={tmp_path / 'c'}"]), verbose=False)
