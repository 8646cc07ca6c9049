"""A whole deployment on one machine (127.0.0.1 only), for tests and benchmarks.

Starts a SuperLink and SuperNodes with the real ``fedtune deploy`` commands, and always cleans up.

Every process is started in its own session (process group) through the real ``fedtune deploy``
commands. Flower starts some of its own helpers in sessions of their own (the SuperLink's
SuperExec, the ServerApp it launches) and relies on their parent-pid watch to end them, so
``kill()``/``close()`` (called from fixtures' finally blocks) collect each process's whole tree
first and signal every process in it; :meth:`Deployment.survivors` lets a test assert that
nothing it started outlives it.

Ports are chosen free at start, and another process may take one before Flower binds it: a
SuperLink or SuperNode that fails to bind ("address already in use") is started again on a fresh
port, and the SuperLink counts as ready only once the process we started listens on its port.
Readiness is polled, never slept on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float, what: str, interval: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


#: how often a SuperLink or SuperNode is started on a fresh port after another process took its port
BIND_TRIES = 3
_PORT_TAKEN = b"address already in use"


class PortTaken(RuntimeError):
    """The process we started could not bind its port: another process holds it."""


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants, including those in sessions of their own."""
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class Deployment:
    """A SuperLink plus named SuperNodes on 127.0.0.1, with TLS (and optionally node auth).

    ``node_args``: extra ``fedtune deploy supernode`` options for every node (e.g. its policy:
    ``--data-dir`` holding the data files the run names)."""

    def __init__(self, root: Path, *, auth: bool = False, nodes: tuple[str, ...] = (),
                 node_args: list[str] = ()):
        self.root = Path(root)
        self.certs = self.root / "certs"
        self.home = self.root / "flwr-home"
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.auth = auth
        self.node_args = list(node_args)
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: list[psutil.Process] = []  # every process of ours a kill or close has collected
        self._nodes: dict[str, tuple[str, str | None, list[str], int]] = {}  # name -> how it was started
        self._log_from: dict[str, int] = {}
        # Flower starts its own executables (flower-superexec, flwr-clientapp) by name: put this
        # interpreter's bin directory first so they are found even when the venv is not activated.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = dict(os.environ, FLWR_HOME=str(self.home), PYTHONUNBUFFERED="1", PATH=path)
        self._fedtune(["deploy", "certs", "--out", str(self.certs), "--host", HOST]
                      + [a for n in nodes for a in ("--node", n)])

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _fedtune(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], env=self.env, check=True,
                              capture_output=True, text=True, timeout=300, **kw)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        path = self.logs / f"{name}.log"
        self._log_from[name] = path.stat().st_size if path.exists() else 0  # this start's part of the log
        log = open(path, "ab")
        p = subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], env=self.env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[name] = p
        return p

    def _port_taken(self, name: str) -> bool:
        with open(self.logs / f"{name}.log", "rb") as f:
            f.seek(self._log_from.get(name, 0))
            return _PORT_TAKEN in f.read()

    def _listening(self, name: str, port: int) -> bool:
        """Whether the process we started as ``name`` (or one of its children) listens on ``port``:
        a connection test would also pass if another process held the port."""
        for proc in process_tree(self.procs[name].pid):
            try:
                conns = proc.net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
                return True
        return False

    def start_superlink(self) -> None:
        """Start the SuperLink; the first start retries on a fresh port if its port was taken (a
        restart keeps the port: the SuperNodes dial it)."""
        first = not (self.root / "superlink.db").exists()
        for attempt in range(BIND_TRIES):
            args = ["deploy", "superlink", "--certs", str(self.certs), "--host", HOST, "--port", str(self.port),
                    "--database", str(self.root / "superlink.db")]
            self._start("superlink", args + (["--auth"] if self.auth else []))

            def up():
                if self.procs["superlink"].poll() is not None:
                    if self._port_taken("superlink"):
                        raise PortTaken(f"port {self.port} taken")
                    raise RuntimeError("superlink exited:\n" + self.log("superlink"))
                return self._listening("superlink", self.port)
            try:
                wait_until(up, 120, "the SuperLink to listen")
                return
            except PortTaken:
                self.kill("superlink")
                if not first or attempt == BIND_TRIES - 1:
                    raise
                self.port = free_port()

    def register(self, name: str, client_ids: str | None = None) -> None:
        self._fedtune(["deploy", "register", str(self.certs / f"{name}.pub"), "--superlink", self.address,
                       "--ca", str(self.certs / "ca.crt"), "--flwr-home", str(self.home)]
                      + (["--client-id", client_ids] if client_ids else []))

    def start_supernode(self, client_id: str, *, key: str | None = None, name: str | None = None,
                        extra: list[str] = (), _tries_left: int = BIND_TRIES) -> subprocess.Popen:
        name = name or client_id
        self._nodes[name] = (client_id, key, list(extra), _tries_left)
        args = ["deploy", "supernode", "--superlink", self.address, "--ca", str(self.certs / "ca.crt"),
                "--client-id", client_id, "--state-dir", str(self.root / "state" / name),
                "--runtime-port", str(free_port()), "--flwr-home", str(self.home), *self.node_args, *extra]
        if key:
            args += ["--key", str(self.certs / key)]
        return self._start(name, args)

    def _restart_if_port_taken(self, name: str) -> bool:
        """A SuperNode that exited because another process took its runtime port: start it again
        on a fresh port (True), unless it has used up its tries."""
        client_id, key, extra, tries = self._nodes.get(name, (None, None, [], 0))
        if client_id is None or tries <= 1 or not self._port_taken(name):
            return False
        self.kill(name)
        self.start_supernode(client_id, key=key, name=name, extra=extra, _tries_left=tries - 1)
        return True

    def wait_connected(self, names: list[str] | tuple[str, ...], timeout: float = 180) -> None:
        """Wait until each named SuperNode (as last started) has registered with the SuperLink.

        Without ``deploy.clients`` a run takes the clients whose SuperNodes are connected when it
        starts; a test or benchmark that submits right after starting its SuperNodes waits here."""
        def connected(name: str) -> bool:
            p = self.procs.get(name)
            if p is not None and p.poll() is not None:
                if self._restart_if_port_taken(name):
                    return False
                raise RuntimeError(f"SuperNode {name} exited:\n" + self.log(name))
            with open(self.logs / f"{name}.log", "rb") as f:
                f.seek(self._log_from.get(name, 0))
                return b"SuperNode ID:" in f.read()
        wait_until(lambda: all(connected(n) for n in names), timeout, f"SuperNodes {', '.join(names)} to connect")

    def submit(self, cfg_file: Path, overrides: list[str] = (), resume: Path | None = None) -> str:
        args = ["deploy", "submit", "--superlink", self.address, "--ca", str(self.certs / "ca.crt"),
                "--flwr-home", str(self.home), str(cfg_file), *overrides]
        if resume:
            args += ["--resume", str(resume)]
        out = self._fedtune(args).stdout
        return out.strip().splitlines()[-1]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal ``name``'s process group and every process of its tree (collected before the
        first signal: an orphan no longer shows as anyone's child); SIGKILL what is left after 20 s."""
        p = self.procs.pop(name, None)
        if p is None:
            return
        tree = process_tree(p.pid)
        self.seen += tree
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        for proc in tree:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=20)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=20)
        try:
            p.wait(20)  # reap our direct child
        except subprocess.TimeoutExpired:
            pass

    def survivors(self) -> list[psutil.Process]:
        """Processes a kill or close collected that still run (zombies do not count)."""
        out = []
        for proc in self.seen:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
            except psutil.NoSuchProcess:
                pass
        return out

    def log(self, name: str) -> str:
        p = self.logs / f"{name}.log"
        return p.read_text(errors="replace")[-6000:] if p.exists() else ""

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_for_run(run_dir: Path, timeout: float, dep: Deployment | None = None, *, until: str = "done:") -> str:
    """Poll ``run_dir/server.log`` until it holds ``until`` (or an error line)."""
    log = Path(run_dir) / "server.log"

    def finished():
        text = log.read_text() if log.exists() else ""
        if "\nerror:" in "\n" + text and until != "error:":
            raise RuntimeError("run failed:\n" + text[-3000:])
        return text if until in text else None
    try:
        return wait_until(finished, timeout, f"'{until}' in {log}", interval=0.5)
    except TimeoutError:
        extra = "\n".join(f"--- {n}\n{dep.log(n)}" for n in (dep.procs if dep else []))
        raise TimeoutError(f"run did not finish; server.log:\n{log.read_text() if log.exists() else ''}\n{extra}")


def round_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows
