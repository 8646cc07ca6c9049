"""A whole deployment on one machine (127.0.0.1 only), for tests and benchmarks.

Starts a SuperLink and SuperNodes with the real ``fedtune deploy`` commands, and always cleans up.

Every process is started in its own session (process group) through the real ``fedtune deploy``
commands and killed as a group in ``close()`` (called from fixtures' finally blocks), so nothing
outlives a test even when it fails. Ports are chosen free at start; readiness is polled, never
slept on.
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


class Deployment:
    """A SuperLink plus named SuperNodes on 127.0.0.1, with TLS (and optionally node auth)."""

    def __init__(self, root: Path, *, auth: bool = False, nodes: tuple[str, ...] = ()):
        self.root = Path(root)
        self.certs = self.root / "certs"
        self.home = self.root / "flwr-home"
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.auth = auth
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
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

    def start_superlink(self) -> None:
        args = ["deploy", "superlink", "--certs", str(self.certs), "--host", HOST, "--port", str(self.port),
                "--database", str(self.root / "superlink.db")]
        self._start("superlink", args + (["--auth"] if self.auth else []))

        def up():
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError("superlink exited:\n" + self.log("superlink"))
            with socket.socket() as s:
                return s.connect_ex((HOST, self.port)) == 0
        wait_until(up, 120, "the SuperLink to listen")

    def register(self, name: str) -> None:
        self._fedtune(["deploy", "register", str(self.certs / f"{name}.pub"), "--superlink", self.address,
                       "--ca", str(self.certs / "ca.crt"), "--flwr-home", str(self.home)])

    def start_supernode(self, client_id: str, *, key: str | None = None, name: str | None = None,
                        extra: list[str] = ()) -> subprocess.Popen:
        name = name or client_id
        args = ["deploy", "supernode", "--superlink", self.address, "--ca", str(self.certs / "ca.crt"),
                "--client-id", client_id, "--state-dir", str(self.root / "state" / name),
                "--runtime-port", str(free_port()), "--flwr-home", str(self.home), *extra]
        if key:
            args += ["--key", str(self.certs / key)]
        return self._start(name, args)

    def wait_connected(self, names: list[str] | tuple[str, ...], timeout: float = 180) -> None:
        """Wait until each named SuperNode (as last started) has registered with the SuperLink.

        Without ``deploy.clients`` a run takes the clients whose SuperNodes are connected when it
        starts; a test or benchmark that submits right after starting its SuperNodes waits here."""
        def connected(name: str) -> bool:
            p = self.procs.get(name)
            if p is not None and p.poll() is not None:
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
        p = self.procs.pop(name, None)
        if p is None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(20)

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
