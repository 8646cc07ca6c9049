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


@pytest.mark.parametrize("scenario", ["global", "local"])
def test_generation_task_in_the_loop(tmp_path, data_dir, scenario):
    """A generation task (GSM8K, through the batched generation loop) in the loop: logged at round
    0, every task_every rounds and the last round; in the local scenario each client's adapter is
    evaluated in its own row and the round row holds their mean."""
    opts = ["eval.tasks=[gsm8k]", "eval.task_limit=2", "eval.task_every=2",
            "eval.task_options={gsm8k: {max_new_tokens: 8, shots: 2}}", f"fl.scenario={scenario}",
            f"output.dir={tmp_path / scenario}"]
    res = run(_cfg(tmp_path, data_dir, opts), verbose=False)
    rounds = {r["round"]: r for r in res.rows if r["kind"] == "round"}
    logged = sorted(n for n, r in rounds.items() if "gsm8k_accuracy" in r)
    assert logged == [0, 2, 3]
    assert all(0.0 <= rounds[n]["gsm8k_accuracy"] <= 1.0 and rounds[n]["task_eval_seconds"] > 0 for n in logged)
    clients = [r for r in res.rows if r["kind"] == "client" and "gsm8k_accuracy" in r]
    if scenario == "local":
        by_round: dict[int, list[float]] = {}
        for r in clients:
            by_round.setdefault(r["round"], []).append(r["gsm8k_accuracy"])
        assert sorted(by_round) == [0, 2, 3] and all(len(v) == 2 for v in by_round.values())
        assert all(rounds[n]["gsm8k_accuracy"] == pytest.approx(sum(v) / 2) for n, v in by_round.items())
    else:
        assert clients == []  # one global adapter: the round row only
    logged_file = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["round"] for r in logged_file if r.get("kind") == "round" and "gsm8k_accuracy" in r) == [0, 2, 3]
