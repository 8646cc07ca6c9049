"""FedOT over a real loopback deployment (SuperLink + 3 SuperNodes, TLS): the same code as the
simulation gives the same adapter; each SuperNode receives the emulator once (in several chunks,
zstd-compressed, the adapter int8-coded both ways) and keeps it in its state directory, so after a
restart it is not sent again."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.flower.loopback import Deployment, round_rows, wait_for_run
from fedtune.run import run

NODES = ("alpha", "beta", "gamma")


@pytest.mark.deploy
def test_fedot_deployed_matches_simulation_and_nodes_keep_the_emulator(tmp_path):
    from test_e2e import _write_data
    from test_offsite import make_tiny_dir

    model = make_tiny_dir(tmp_path / "llama8")
    data = _write_data(tmp_path / "toy.jsonl", n_per_cat=10)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
seed: 3
model: {{name: {model}}}
data: {{source: {data}, splitter: meta, num_clients: 3, label_field: category, max_length: 48,
        val_fraction: 0.2, test_fraction: 0.1, cache_dir: {tmp_path / 'tok'}}}
train: {{lr: 0.01, batch_size: 2, local_steps: 2}}
fl: {{rounds: 2}}
eval: {{every: 0, splits: [val]}}
checkpoint: {{every: 1}}
comm: {{up: [int8, zstd], down: [int8, zstd]}}
offsite: {{enabled: true, drop: 0.5, bottom: 1, top: 1, chunk_mb: 4, cache_dir: {tmp_path / 'emulators'}}}
output: {{tensorboard: false, progress: false}}
deploy: {{join_timeout_s: 240, round_timeout_s: 240, query_timeout_s: 60}}
""")
    dep = Deployment(tmp_path / "deploy", node_args=["--data-dir", str(tmp_path), "--model-dir", str(tmp_path)])
    try:
        with ThreadPoolExecutor(1) as pool:
            sim = pool.submit(lambda: run(load_config(cfg, [f"output.dir={tmp_path / 'sim'}"]), verbose=False))
            t0 = time.monotonic()
            dep.start_superlink()
            for n in NODES:
                dep.start_supernode(n)
            dep.wait_connected(NODES)
            first = tmp_path / "deployed"
            dep.submit(cfg, [f"output.dir={first}"])
            wait_for_run(first, 600, dep)
            took = time.monotonic() - t0
            sim_dir = sim.result().run_dir
        a = load_file(str(first / "adapter" / "offsite_adapter.safetensors"))
        b = load_file(str(sim_dir / "adapter" / "offsite_adapter.safetensors"))
        assert a.keys() == b.keys() and a
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
        rows = {r["round"]: r for r in round_rows(first) if r["kind"] == "round"}
        sim_rows = {r["round"]: r for r in round_rows(sim_dir) if r["kind"] == "round"}
        assert rows[1]["emulator_clients"] == 3 and rows[2]["emulator_clients"] == 0
        assert rows[1]["emulator_bytes"] == sim_rows[1]["emulator_bytes"] > 0
        assert rows[2]["val_loss"] == pytest.approx(sim_rows[2]["val_loss"], rel=1e-6)
        for n in NODES:  # each SuperNode keeps the verified file in its own state directory
            held = list((tmp_path / "deploy" / "state" / n / "emulators").glob("*.safetensors"))
            assert len(held) == 1 and held[0].stat().st_size * 3 == rows[1]["emulator_bytes"]

        # a SuperNode restarted, and a second run of the same emulator: nobody is sent it again
        dep.kill("beta")
        dep.start_supernode("beta")
        dep.wait_connected(NODES)
        second = tmp_path / "again"
        dep.submit(cfg, [f"output.dir={second}", "fl.rounds=1"])  # one round shows it
        wait_for_run(second, 600, dep)
        again = {r["round"]: r for r in round_rows(second) if r["kind"] == "round"}
        assert again[1]["emulator_clients"] == 0 and again[1]["emulator_bytes"] == 0
        assert again[1]["bytes_down"] < rows[1]["bytes_down"] / 3
        print(f"\nloopback FedOT deployment (start + 2 rounds): {took:.1f}s")
    finally:
        dep.close()
        assert not dep.survivors(), f"processes outlived the test: {dep.survivors()}"
