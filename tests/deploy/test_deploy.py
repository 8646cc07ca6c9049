"""Real deployments on loopback: a SuperLink and SuperNodes started with `fedtune deploy`, TLS on,
talking over 127.0.0.1 only. Every process is killed in a finally block (see harness.py).

* parity: 3 SuperNodes, 2 rounds of a tiny model with lossy codecs both ways (up: top-k 10% + int8
  + zstd with error feedback, down: int4 + zstd): the final global adapter equals the in-process
  simulation of the same config (to 1e-6; in practice bit for bit) — for FedAvg, FedAdam (server
  moments) and SCAFFOLD (control variates both ways);
* node authentication: an unregistered SuperNode is refused;
* faults: a SuperNode killed mid-round does not stop the run and rejoins after a restart; a
  restarted SuperLink + resubmitted SCAFFOLD run resumes from the last checkpoint and still lands on
  the uninterrupted simulation's adapter.
"""

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.run import run

from fedtune.flower.deploy import WORKER_DIR_PREFIX
from fedtune.flower.loopback import HOST, Deployment, round_rows, wait_for_run, wait_until

NODES = ("alpha", "beta", "gamma")  # the meta splitter's clients of the toy data, in its order


@pytest.fixture
def toy(tmp_path):
    from test_e2e import _write_data

    data = _write_data(tmp_path / "toy.jsonl")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
seed: 3
model: {{name: tiny-llama}}
data: {{source: {data}, splitter: meta, num_clients: 3, label_field: category, max_length: 64,
        val_fraction: 0.15, test_fraction: 0.15, cache_dir: {tmp_path / 'tok'}}}
peft: {{method: lora, r: 4}}
train: {{lr: 0.01, batch_size: 2, local_steps: 3, scheduler: linear, warmup_steps: 1}}
fl: {{rounds: 2}}
eval: {{every: 0}}  # evaluate after the last round only: fewer exchanges, a faster test
checkpoint: {{every: 1}}
# lossy both ways, with the clients' error-feedback residual in their state (a resumed run must
# pick it up from the SuperNode's state dir): deployment and simulation must still agree exactly
comm: {{up: [topk, int8, zstd], down: [int4, zstd], topk_fraction: 0.1, error_feedback: true}}
output: {{tensorboard: false, progress: false}}
deploy: {{join_timeout_s: 240, round_timeout_s: 240, query_timeout_s: 60}}
""")
    return cfg


@pytest.fixture
def deployment(tmp_path):
    # the run names its data file by path: each SuperNode allows the directory holding it
    dep = Deployment(tmp_path / "deploy", node_args=["--data-dir", str(tmp_path)])
    try:
        yield dep
    finally:
        dep.close()
        assert not dep.survivors(), f"processes outlived the test: {dep.survivors()}"


def _simulate(cfg_file, tmp_path, overrides=()):
    cfg = load_config(cfg_file, [f"output.dir={tmp_path / 'sim'}", *overrides])
    return run(cfg, verbose=False).run_dir


def _max_diff(a_dir, b_dir):
    a = load_file(str(a_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _start(dep, nodes=NODES):
    dep.start_superlink()
    for n in nodes:
        dep.start_supernode(n)
    dep.wait_connected(nodes)  # the run takes the clients connected when it starts


def _assert_tls_only(dep):
    """The SuperLink speaks TLS only, with a certificate our CA signed for 127.0.0.1."""
    ctx = ssl.create_default_context(cafile=str(dep.certs / "ca.crt"))
    with socket.create_connection((HOST, dep.port)) as raw, ctx.wrap_socket(raw, server_hostname=HOST) as s:
        assert s.version().startswith("TLS")
    with socket.create_connection((HOST, dep.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert not s.recv(100).startswith(b"HTTP/")  # no plaintext HTTP


def _assert_rows_match(run_dir, sim_dir, label):
    """Same losses, server-state norms and bytes down per (kind, round, client); bytes up within a
    few bytes (a reply's metrics hold timings, whose JSON length varies); nothing rejected."""
    dep_rows = {(r["kind"], r["round"], r.get("client")): r for r in round_rows(run_dir)}
    sim_rows = {(r["kind"], r["round"], r.get("client")): r for r in round_rows(sim_dir)}
    assert dep_rows.keys() == sim_rows.keys(), label
    for key, r in sim_rows.items():
        for m in ("val_loss", "test_loss", "train_loss", "bytes_down", "server_step_norm", "control_norm"):
            if r.get(m) is not None:
                assert dep_rows[key][m] == pytest.approx(r[m], rel=1e-6, abs=1e-9), (label, key, m)
        if r.get("bytes_up"):
            assert abs(dep_rows[key]["bytes_up"] - r["bytes_up"]) < 64, (label, key)
    assert all(not r.get("rejected") for r in dep_rows.values()), label


@pytest.mark.deploy
def test_deployment_matches_simulation_over_tls_for_every_kind_of_state(toy, tmp_path, deployment):
    """The same algorithm code over Flower, one run after the other on the same TLS-only SuperLink
    and SuperNodes: FedAvg (stateless), FedAdam (server moments) and SCAFFOLD (control variates both
    ways, through the lossy codecs, client variates in the SuperNodes' state) land bit for bit on
    the in-process simulation's adapter and rows. Each simulation runs in a thread while its
    deployment runs (the deployment mostly waits on Flower's polling)."""
    t0 = time.monotonic()
    _start(deployment)
    _assert_tls_only(deployment)
    for algorithm in ("fedavg", "fedadam", "scaffold"):
        over = [f"fl.algorithm={algorithm}"]
        with ThreadPoolExecutor(1) as pool:
            sim = pool.submit(_simulate, toy, tmp_path / f"sim-{algorithm}", over)
            run_dir = tmp_path / f"deployed-{algorithm}"
            deployment.submit(toy, [f"output.dir={run_dir}", *over])
            wait_for_run(run_dir, 600, deployment)
            sim_dir = sim.result()
        assert _max_diff(run_dir, sim_dir) <= 1e-6, algorithm
        _assert_rows_match(run_dir, sim_dir, algorithm)
        print(f"\nloopback deployment ({algorithm}, start + 2 rounds): {time.monotonic() - t0:.1f}s")
        t0 = time.monotonic()


@pytest.mark.deploy
def test_unregistered_supernodes_are_refused(tmp_path):
    dep = Deployment(tmp_path / "auth", auth=True, nodes=("alpha", "mallory"))
    try:
        dep.start_superlink()
        dep.register("alpha", client_ids="alpha")  # the key is bound to client id alpha
        dep.start_supernode("alpha", key="alpha", extra=["--no-worker"])
        no_key = dep.start_supernode("mallory", extra=["--no-worker"])
        unregistered = dep.start_supernode("mallory2", key="mallory", extra=["--no-worker"])
        wait_until(lambda: no_key.poll() is not None and unregistered.poll() is not None, 120, "refusals")
        assert no_key.returncode != 0 and "must be registered" in dep.log("mallory")
        assert unregistered.returncode != 0 and "Failed to activate SuperNode" in dep.log("mallory2")

        def online():
            r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "flwr"),
                                "supernode", "ls", "fedtune", "--format", "json"],
                               env=dep.env, capture_output=True, text=True, timeout=60)
            out = r.stdout
            nodes = json.loads(out[out.index("{"):]).get("nodes", []) if "{" in out else []
            return [n for n in nodes if n["status"] == "online"]
        assert len(wait_until(online, 120, "the registered SuperNode online")) == 1
        assert dep.procs["alpha"].poll() is None
        # the binding is the node's registered name, kept by the SuperLink with its key; the
        # ServerApp reads it with the node id (Grid.get_nodes -> NodeInfo.name)
        import sqlite3

        with sqlite3.connect(dep.root / "superlink.db") as db:  # one key registered: alpha's
            assert [r[0] for r in db.execute("SELECT name FROM node")] == ["alpha"]
    finally:
        dep.close()
        assert not dep.survivors(), f"processes outlived the test: {dep.survivors()}"


@pytest.mark.deploy
def test_a_taken_port_is_replaced_and_readiness_is_the_superlinks_own(tmp_path):
    """Another process grabs the port picked for the SuperLink before it binds: the harness must
    not take that process's listening socket for the SuperLink (a connect test would), and starts
    the SuperLink again on a fresh port."""
    dep = Deployment(tmp_path / "ports")
    with socket.socket() as squatter:
        squatter.bind((HOST, dep.port))
        squatter.listen()
        taken = dep.port
        try:
            dep.start_superlink()
            assert dep.port != taken and dep._listening("superlink", dep.port)
            assert "address already in use" in (dep.logs / "superlink.log").read_text()
        finally:
            dep.close()
    assert not dep.survivors()


def _node_log_has(dep, name, pattern):
    return re.search(pattern, dep.log(name), re.S) is not None


@pytest.mark.deploy
def test_supernode_killed_mid_round_then_rejoins(toy, tmp_path, deployment):
    run_dir = tmp_path / "faults"
    _start(deployment)
    deployment.submit(toy, [f"output.dir={run_dir}", "fl.rounds=3", "deploy.min_clients=2",
                            "deploy.round_timeout_s=30", "eval.every=0"])
    # kill gamma's whole SuperNode (worker, SuperNode, SuperExec, ClientApp) once it holds round 2's fit
    wait_until(lambda: _node_log_has(deployment, "gamma", r"ROUND 2\][^\n]*\n[^\n]*Receiving: train"), 400,
               "gamma to receive round 2")
    killed = deployment.procs["gamma"].pid
    deployment.kill("gamma")
    stale = list(Path(tempfile.gettempdir()).glob(f"{WORKER_DIR_PREFIX}{killed}-*"))
    assert stale  # a SIGKILLed `fedtune deploy supernode` cannot remove its worker's socket dir ...
    deployment.start_supernode("gamma")  # same state dir: it comes back as a new Flower node
    deployment.wait_connected(["gamma"])
    assert not any(p.exists() for p in stale)  # ... the next one on this machine does
    wait_for_run(run_dir, 600, deployment)
    rows = [r for r in round_rows(run_dir) if r["kind"] == "client"]
    by = {(r["round"], r["client"]): r for r in rows}
    assert by[(2, "gamma")]["rejected"]  # missing in the round it died in ...
    assert not by[(2, "alpha")]["rejected"] and not by[(2, "beta")]["rejected"]  # ... which went on
    assert not by[(3, "gamma")]["rejected"]  # and it is back
    rounds = [r for r in round_rows(run_dir) if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and rounds[1]["rejected"] == 1
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.deploy
def test_server_restart_resumes_from_last_checkpoint(toy, tmp_path, deployment):
    """SCAFFOLD, so that the resume carries server state (the control variate) and client state on
    the SuperNodes (each client's variate, error-feedback residuals) across a SuperLink restart."""
    run_dir = tmp_path / "resumed"
    algorithm = ["fl.algorithm=scaffold"]
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(_simulate, toy, tmp_path, algorithm)
        _start(deployment)
        over = [f"output.dir={run_dir}", *algorithm]
        deployment.submit(toy, over)
        wait_until(lambda: (run_dir / "checkpoints" / "latest").is_file(), 400, "the first checkpoint")
        deployment.kill("superlink")  # the SuperLink and the ServerApp it runs die mid-run
        done = (run_dir / "checkpoints" / "latest").read_text().strip()
        assert done == "round_00001"
        deployment.start_superlink()  # same port; the SuperNodes reconnect on their own
        deployment.submit(toy, over, resume=run_dir)
        text = wait_for_run(run_dir, 600, deployment)
        assert f"resuming from {run_dir / 'checkpoints' / done}" in text
        sim = reference.result()
    assert _max_diff(run_dir, sim) <= 1e-6
