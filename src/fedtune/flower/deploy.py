"""``fedtune deploy ...``: thin wrappers that start Flower's own programs with the right flags.

Each command prints the Flower command line it runs, so nothing is hidden: a user can run the plain
Flower commands instead (docs/deployment.md lists them).

* ``certs``     — a CA, the SuperLink's TLS certificate, SuperNode authentication keys;
* ``superlink`` — ``flower-superlink`` with TLS (and ``--enable-supernode-auth`` with ``--auth``);
* ``register``  — ``flwr supernode register KEY.pub`` (node authentication: allow one SuperNode);
* ``supernode`` — fedtune's warm worker plus ``flower-supernode`` for one organisation;
* ``submit``    — packs the fedtune config into a Flower App and ``flwr run``s it;
* ``worker``    — the warm worker alone (``supernode`` starts it for you).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedtune.config import Config
from fedtune.errors import FedtuneError

CONNECTION = "fedtune"  # the Flower CLI connection name fedtune writes
#: SuperExec polls its SuperNode for new tasks every second by default; a tenth of that takes
#: ~0.9 s off every message at negligible cost (one local HTTP call per 0.1 s).
TASK_POLL_S = "0.1"


def _exe(name: str) -> str:
    """A Flower program next to this Python (the venv's bin), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FedtuneError(f"'{name}' not found; install Flower with: pip install 'fedtune[flower]'")
    return found


def _need_file(path: str | Path, what: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FedtuneError(f"{what} '{p}' not found; create test certificates with: fedtune deploy certs --out DIR --host ADDRESS")
    return str(p.resolve())


def flwr_home(path: str | Path | None = None) -> Path:
    """Where the Flower CLI keeps its connections: ``--flwr-home``, ``$FLWR_HOME``, or fedtune's own
    directory (so fedtune never edits a user's ``~/.flwr``)."""
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get("FLWR_HOME"):
        return Path(os.environ["FLWR_HOME"])
    return Path.home() / ".cache" / "fedtune" / "flwr"


def write_connection(home: Path, superlink: str, ca: str | Path) -> None:
    """The Flower CLI connection ``fedtune`` (address and CA) in ``home/config.toml``."""
    import tomli_w

    from fedtune.utils import atomic_write_text

    home.mkdir(parents=True, exist_ok=True)
    cfg = {"superlink": {"default": CONNECTION,
                         CONNECTION: {"address": superlink, "root-certificates": _need_file(ca, "CA certificate")}}}
    atomic_write_text(home / "config.toml", tomli_w.dumps(cfg))


def superlink_command(certs: Path, *, host: str = "0.0.0.0", port: int = 9093, auth: bool = False,
                      database: str | None = "superlink.db") -> list[str]:
    """``flower-superlink`` with TLS. ``database``: its state (registered SuperNodes, runs) in a
    SQLite file, so that a restarted SuperLink still knows its SuperNodes: with Flower's default
    in-memory state a SuperNode's next heartbeat after a SuperLink restart is refused (401) and
    the SuperNode exits. ``None``: in memory."""
    certs = Path(certs)
    cmd = [_exe("flower-superlink"),
           "--ssl-ca-certfile", _need_file(certs / "ca.crt", "CA certificate"),
           "--ssl-certfile", _need_file(certs / "server.pem", "SuperLink certificate"),
           "--ssl-keyfile", _need_file(certs / "server.key", "SuperLink key"),
           "--host", host, "--port", str(port),
           # the fedtune app is installed on every machine; never let Flower pip/uv-install a FAB's deps
           "--disable-runtime-dependency-installation"]
    if auth:
        cmd.append("--enable-supernode-auth")
    if database:
        cmd += ["--database", database]
    return cmd


def node_config(client_id: str, *, data: str | None = None, state_dir: str | None = None,
                worker: str | None = None, allow_remote_code: bool = False, model_dirs: list[str] = (),
                data_dir: str | None = None, cache_dir: str | None = None, max_world_size: int = 1) -> str:
    """``--node-config`` text: space-separated ``key=value`` with TOML (here JSON-compatible) strings.
    The keys after ``worker`` are the node's policy (:class:`fedtune.flower.node.NodePolicy`)."""
    items = {"client-id": client_id, "data": data, "state-dir": state_dir, "worker": worker,
             "allow-remote-code": "true" if allow_remote_code else None,
             "model-dirs": os.pathsep.join(model_dirs) or None, "data-dir": data_dir, "cache-dir": cache_dir,
             "max-world-size": max_world_size if max_world_size != 1 else None}
    return " ".join(f"{k}={json.dumps(str(v))}" for k, v in items.items() if v)


def supernode_command(superlink: str, ca: str | Path, client_id: str, *, runtime_port: int = 9094,
                      key: str | Path | None = None, **node) -> list[str]:
    """``flower-supernode`` for one organisation; ``node``: :func:`node_config`'s keywords."""
    cmd = [_exe("flower-supernode"), "--root-certificates", _need_file(ca, "CA certificate"),
           "--superlink", superlink, "--port", str(runtime_port),
           "--node-config", node_config(client_id, **node)]
    if key is not None:
        cmd += ["--auth-supernode-private-key", _need_file(key, "SuperNode private key")]
    return cmd


def worker_command(socket_path: str, ready_file: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "fedtune.cli", "deploy", "worker", "--socket", socket_path,
           "--parent-pid", str(os.getpid())]
    return cmd + (["--ready-file", ready_file] if ready_file else [])


#: a warm worker's socket lives in ``<tmp>/fedtune-worker-<pid of fedtune deploy supernode>-XXXX``
#: (a short path: Unix socket paths are limited to ~100 bytes, too few for many state dirs)
WORKER_DIR_PREFIX = "fedtune-worker-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale_worker_dirs(tmp: str | Path | None = None) -> list[Path]:
    """Remove this user's worker socket directories whose ``fedtune deploy supernode`` is gone (a
    SIGKILLed one cannot clean up after itself); return them."""
    import re

    removed = []
    for d in Path(tmp or tempfile.gettempdir()).glob(WORKER_DIR_PREFIX + "*"):
        m = re.fullmatch(re.escape(WORKER_DIR_PREFIX) + r"(\d+)-\w+", d.name)
        try:
            mine = d.is_dir() and not d.is_symlink() and d.stat().st_uid == os.getuid()
        except OSError:
            continue
        if m and mine and not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _dirs(paths, what: str) -> list[str]:
    out = []
    for d in paths:
        p = Path(d).expanduser().resolve()
        if not p.is_dir():
            raise FedtuneError(f"{what} '{d}' is not a directory")
        out.append(str(p))
    return out


def run_supernode(superlink: str, ca: str | Path, client_id: str, *, runtime_port: int = 9094,
                  data: str | None = None, state_dir: str | None = None, key: str | Path | None = None,
                  warm: bool = True, allow_remote_code: bool = False, model_dirs: list[str] = (),
                  data_dir: str | None = None, cache_dir: str | None = None, max_world_size: int = 1,
                  echo=print) -> int:
    """Start the warm worker (unless ``warm`` is False) and ``flower-supernode``; return when the
    SuperNode exits (or on SIGTERM/SIGINT, after stopping both). ``allow_remote_code``,
    ``model_dirs``, ``data_dir``, ``cache_dir`` and ``max_world_size`` are this node's policy for
    the runs it is sent (:class:`fedtune.flower.node.NodePolicy`)."""
    if data is not None:
        data = str(Path(data).expanduser().resolve())
        if not Path(data).is_file():
            raise FedtuneError(f"--data '{data}' not found")
    if max_world_size < 1:
        raise FedtuneError(f"--max-world-size must be at least 1, not {max_world_size}")
    policy = dict(allow_remote_code=allow_remote_code, model_dirs=_dirs(model_dirs, "--model-dir"),
                  data_dir=(_dirs([data_dir], "--data-dir")[0] if data_dir else None),
                  cache_dir=str(Path(cache_dir).expanduser().resolve()) if cache_dir else None,
                  max_world_size=max_world_size)
    state_dir = str(Path(state_dir or f"fedtune-state-{client_id}").expanduser().resolve())
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    clean_stale_worker_dirs()
    procs: list[subprocess.Popen] = []
    sock = None
    env = dict(os.environ, FLWR_SUPEREXEC_TASK_POLL_INTERVAL=os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", TASK_POLL_S))

    def stop(*_):
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    old = {s: signal.signal(s, lambda *a: (stop(), sys.exit(0))) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if warm:
            sock = str(Path(tempfile.mkdtemp(prefix=f"{WORKER_DIR_PREFIX}{os.getpid()}-")) / "worker.sock")
            ready = sock + ".ready"
            wcmd = worker_command(sock, ready)
            echo("$ " + " ".join(wcmd))
            procs.append(subprocess.Popen(wcmd, env=env))
            t0 = time.monotonic()
            while not Path(ready).exists():
                if procs[0].poll() is not None:
                    raise FedtuneError("the fedtune worker exited at start; see its error above")
                if time.monotonic() - t0 > 120:
                    raise FedtuneError("the fedtune worker did not start within 120 s")
                time.sleep(0.1)
        cmd = supernode_command(superlink, ca, client_id, runtime_port=runtime_port, key=key, data=data,
                                state_dir=state_dir, worker=sock, **policy)
        echo("$ " + " ".join(cmd))
        procs.append(subprocess.Popen(cmd, env=env))
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return next(p.returncode for p in procs if p.returncode is not None) or 0
    finally:
        stop()
        for s, h in old.items():
            signal.signal(s, h)
        if sock:
            shutil.rmtree(Path(sock).parent, ignore_errors=True)


def watch_parent(pid: int) -> None:
    """Exit this process when ``pid`` (the ``fedtune deploy supernode`` that started it) is gone."""
    def loop():
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)
            time.sleep(1.0)

    threading.Thread(target=loop, daemon=True).start()


def write_app(app_dir: Path, cfg: Config, resume: str | None = None) -> Path:
    """A Flower App directory for this run: a pyproject.toml naming fedtune's ServerApp/ClientApp,
    with the resolved fedtune config in its run config (the code itself is the installed fedtune)."""
    import tomli_w

    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("fedtune")
    except PackageNotFoundError:
        v = "0.0.0"
    doc = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "fedtune-run", "version": v, "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedtune",
            "components": {"serverapp": "fedtune.flower.server_app:app", "clientapp": "fedtune.flower.client_app:app"},
            "config": {"fedtune-config": json.dumps(cfg.to_dict(), sort_keys=True), "resume": resume or ""},
        }}},
    }
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(doc))
    return app_dir


def submit_command(app_dir: Path, *, stream: bool = False) -> list[str]:
    return [_exe("flwr"), "run", str(app_dir), CONNECTION, "--format", "json"] + (["--stream"] if stream else [])


def check_deployable(cfg: Config) -> None:
    """One clear error, before anything starts, for what only the simulation can run."""
    if cfg.fl.scenario == "global":
        raise FedtuneError("fl.scenario 'global' pools every client's data in one place, which a deployment "
                           "cannot do; use 'fed' or 'local' (or run 'global' in simulation)")
    if cfg.eval.tasks:
        raise FedtuneError(f"eval.tasks {cfg.eval.tasks} (benchmarks in the round loop) run in simulation only for "
                           "now; remove eval.tasks from the deployed config and evaluate the saved adapter "
                           "afterwards with: fedtune eval RUN_DIR --tasks ...")


def submit(cfg: Config, superlink: str, ca: str | Path, *, resume: str | None = None, stream: bool = False,
           home: str | Path | None = None, echo=print) -> str:
    """Submit ``cfg`` as a Flower run; return its run id."""
    check_deployable(cfg)
    if cfg.output.dir and not Path(cfg.output.dir).is_absolute():
        echo(f"note: output.dir '{cfg.output.dir}' is relative to the SuperLink's working directory")
    h = flwr_home(home)
    write_connection(h, superlink, ca)
    with tempfile.TemporaryDirectory(prefix="fedtune-app-") as tmp:
        app_dir = write_app(Path(tmp) / "app", cfg, resume)
        cmd = submit_command(app_dir, stream=stream)
        echo(f"$ FLWR_HOME={h} " + " ".join(cmd))
        res = subprocess.run(cmd, env=dict(os.environ, FLWR_HOME=str(h)), capture_output=not stream, text=True)
    if res.returncode != 0:
        raise FedtuneError(f"flwr run failed ({res.returncode}): {(res.stderr or res.stdout or '').strip()[-2000:]}")
    if stream:
        return ""
    try:
        out = json.loads(res.stdout[res.stdout.index("{"):])
        return str(out["run-id"])
    except (ValueError, KeyError):
        raise FedtuneError(f"flwr run gave no run id: {res.stdout.strip()[-500:]}") from None


def register_command(public_key: str | Path, client_ids: str | None = None) -> list[str]:
    """``flwr supernode register``; ``client_ids`` (comma-separated) become the node's registered
    name, which the server reads with the node's id: that node may then hold only these clients."""
    cmd = [_exe("flwr"), "supernode", "register", _need_file(public_key, "SuperNode public key"), CONNECTION]
    if client_ids:
        ids = [c.strip() for c in client_ids.split(",") if c.strip()]
        if not ids:
            raise FedtuneError("--client-id needs at least one client id")
        cmd += ["--name", ",".join(ids)]
    return cmd
