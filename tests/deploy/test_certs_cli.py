"""`fedtune deploy certs` and the Flower command lines `fedtune deploy` builds."""

import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedtune.cli import main
from fedtune.config import load_config
from fedtune.flower import deploy


def test_certs_make_a_ca_a_server_certificate_for_the_hosts_and_node_keys(tmp_path, capsys):
    assert main(["deploy", "certs", "--out", str(tmp_path), "--host", "10.0.0.1", "--host", "superlink.example.org",
                 "--node", "hospital-a"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)  # the SuperLink's own SuperExec
    assert "superlink.example.org" in san.get_values_for_type(x509.DNSName)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # node keys in the form Flower reads them (OpenSSH, NIST P-384), private key owner-only
    priv = load_ssh_private_key((tmp_path / "hospital-a").read_bytes(), None)
    pub = load_ssh_public_key((tmp_path / "hospital-a.pub").read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert pub.public_numbers() == priv.public_key().public_numbers()
    assert (tmp_path / "hospital-a").stat().st_mode & 0o077 == 0
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0
    # never overwrite silently; a missing --host is one clear error
    assert main(["deploy", "certs", "--out", str(tmp_path), "--host", "10.0.0.1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["deploy", "certs", "--out", str(tmp_path / "x")]) == 2


def test_flower_command_lines(tmp_path):
    main(["deploy", "certs", "--out", str(tmp_path), "--host", "10.0.0.1"])
    sl = deploy.superlink_command(tmp_path, auth=True)
    assert "--enable-supernode-auth" in sl and "--disable-runtime-dependency-installation" in sl
    assert sl[sl.index("--ssl-certfile") + 1].endswith("server.pem")
    sn = deploy.supernode_command("10.0.0.1:9093", tmp_path / "ca.crt", "hospital-a", data="/srv/a.jsonl",
                                  state_dir="/srv/state", worker="/run/a.sock")
    assert sn[sn.index("--node-config") + 1] == \
        'client-id="hospital-a" data="/srv/a.jsonl" state-dir="/srv/state" worker="/run/a.sock"'
    assert sn[sn.index("--superlink") + 1] == "10.0.0.1:9093"
    with pytest.raises(Exception, match="not found"):
        deploy.supernode_command("10.0.0.1:9093", tmp_path / "nope.crt", "a")
    # the node's policy travels in its own node config, read back exactly as Flower parses it
    from flwr.common.config import parse_config_args

    from fedtune.flower.node import NodePolicy

    sn = deploy.supernode_command("10.0.0.1:9093", tmp_path / "ca.crt", "a", allow_remote_code=True,
                                  model_dirs=["/srv/models", "/opt/llm"], data_dir="/srv/data",
                                  cache_dir="/var/cache/ft", max_world_size=2)
    policy = NodePolicy.from_node_config(parse_config_args([sn[sn.index("--node-config") + 1]]))
    assert policy == NodePolicy(allow_remote_code=True, model_dirs=("/srv/models", "/opt/llm"), data_dir="/srv/data",
                                cache_dir="/var/cache/ft", max_world_size=2)
    plain = deploy.supernode_command("10.0.0.1:9093", tmp_path / "ca.crt", "a")
    assert NodePolicy.from_node_config(parse_config_args([plain[plain.index("--node-config") + 1]])) == NodePolicy()
    assert deploy.register_command(tmp_path / "ca.crt", " a, b ")[-2:] == ["--name", "a,b"]


def test_stale_worker_socket_dirs_are_removed_at_start(tmp_path):
    """A SIGKILLed `fedtune deploy supernode` leaves its worker's socket directory behind; the next
    one removes those whose process is gone (and nothing else)."""
    import os
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    dead = tmp_path / f"{deploy.WORKER_DIR_PREFIX}{gone.pid}-abc123"
    live = tmp_path / f"{deploy.WORKER_DIR_PREFIX}{os.getpid()}-def456"
    other = tmp_path / "fedtune-something-else"
    for d in (dead, live, other):
        d.mkdir()
        (d / "worker.sock").write_text("")
    assert deploy.clean_stale_worker_dirs(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and other.exists()


def test_submit_writes_a_flower_app_carrying_the_config(tmp_path):
    import json
    import tomli

    from fedtune.config import config_from_dict

    cfg = load_config(None, ["model.name=tiny-llama", "data.preset=fed-gsm8k-3", "deploy.min_clients=2"])
    app = deploy.write_app(tmp_path / "app", cfg, resume="/srv/runs/x")
    doc = tomli.loads((app / "pyproject.toml").read_text())
    flwr = doc["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "fedtune.flower.server_app:app",
                                  "clientapp": "fedtune.flower.client_app:app"}
    assert config_from_dict(json.loads(flwr["config"]["fedtune-config"])) == cfg
    assert flwr["config"]["resume"] == "/srv/runs/x"
    with pytest.raises(Exception, match="global"):
        deploy.submit(load_config(None, ["fl.scenario=global"]), "127.0.0.1:1", tmp_path / "ca.crt")


def test_eval_tasks_are_refused_before_a_deployment_starts(tmp_path, capsys):
    """eval.tasks is simulation-only for now: one clear error at submit (exit 2), not a run that
    silently skips the benchmarks; the ServerApp refuses it too (a plain `flwr run`)."""
    from fedtune.flower.server_app import run_deployed

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("model: {name: tiny-llama}\neval: {tasks: [gsm8k]}\n")
    assert main(["deploy", "submit", str(cfg_file), "--superlink", "127.0.0.1:1", "--ca", str(tmp_path / "ca.crt")]) == 2
    err = capsys.readouterr().err
    assert "eval.tasks" in err and "simulation only" in err and "Traceback" not in err
    with pytest.raises(Exception, match="simulation only"):
        run_deployed(load_config(None, ["eval.tasks=[gsm8k]", f"output.dir={tmp_path / 'run'}"]), grid=None)
