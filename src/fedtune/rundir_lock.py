"""One writer per run directory: a lock file (``RUN_DIR/run.lock``) held with ``flock``.

A run, a ``--resume`` and a deployment's ServerApp hold the lock of their run directory from
before they change anything in it until they end. A second writer on the same directory (a second
run, a second ``--resume``) gets one :class:`RunDirBusy` error naming the holder (pid, host, start
time, command) and touches nothing; without the lock both used to exit 0 with their metrics
interleaved in one ``metrics.jsonl`` and the first run's result overwritten.

Why ``flock``: the kernel releases it when the holding process ends, however it ends (an exception,
Ctrl-C, SIGTERM, ``kill -9``, a crash), so a lock is never left behind by a dead process and needs no
pid-liveness guessing; the pid/host/start time written into the file are only for the message, and
a file naming a process that no longer holds the lock is simply taken over. ``flock`` works on local
file systems and on NFS (Linux emulates it with NFS byte-range locks). The file descriptor is not
inherited by child processes (Python opens it close-on-exec), so a follower process that outlives
its leader does not keep the directory locked.

The lock file stays in the run directory (emptied on release): removing it would let a process
that opened it just before the removal lock a file nobody else can see. :meth:`RunDirLock.acquire`
checks after locking that the file it locked is still the one at the path (a run directory renamed
aside by ``output.overwrite`` carries its lock file with it) and retries otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunDirBusy(FedtuneError):
    """The run directory is locked by another live process."""


def _describe(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "another process (which has not written its details yet)"
    here = socket.gethostname()
    host = holder.get("host") or "?"
    where = f"on this machine ({host})" if host == here else f"on host {host}"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    cmd = holder.get("command")
    return f"pid {holder['pid']} {where}, started {when}" + (f" ({cmd})" if cmd else "")


def _read(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw) if raw.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


class RunDirLock:
    """The lock of one run directory (which must exist when :meth:`acquire` is called)."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self._fd: int | None = None
        #: the details a dead holder left in the file, when this process took its lock over
        self.took_over: dict[str, Any] | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunDirLock:
        """Take the lock (no waiting) or raise :class:`RunDirBusy` naming the holder."""
        if self._fd is not None:
            return self
        for _ in range(100):  # retried only when the locked file was moved away meanwhile
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                raise FedtuneError(f"run directory {self.dir} does not exist") from None
            except OSError as e:
                raise FedtuneError(f"cannot open the lock file {self.path}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise RunDirBusy(
                    f"run directory {self.dir} is in use by {_describe(holder)}; two writers would "
                    f"interleave their metrics and checkpoints. Wait for it to end (or stop it: kill "
                    f"{holder.get('pid', 'PID')}), or choose another output.dir") from None
            except OSError as e:
                os.close(fd)
                raise FedtuneError(f"cannot lock {self.path}: {e.strerror or e}") from None
            st = os.fstat(fd)
            try:
                cur = os.stat(self.path)
            except FileNotFoundError:
                cur = None
            if cur is not None and (cur.st_ino, cur.st_dev) == (st.st_ino, st.st_dev):
                break
            os.close(fd)  # the directory was renamed or the file replaced under us: lock the new one
        else:  # pragma: no cover - would need 100 replacements racing this loop
            raise FedtuneError(f"could not lock {self.path}: it keeps being replaced")
        previous = _read(fd)
        if previous.get("pid"):
            self.took_over = previous
            log.info("run directory %s: taking over the lock left by %s (no longer running)",
                     self.dir, _describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        except OSError as e:  # a full disk: the lock itself holds, only the details are missing
            log.warning("could not write the holder's details into %s: %s", self.path, e)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (idempotent). Also happens on its own when the process ends."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_of(run_dir: str | Path) -> dict[str, Any] | None:
    """Who holds ``run_dir``'s lock now (their details), or None when nobody does. Reads only."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that ``finally`` blocks run (a run directory being set up is
    taken back, the lock released at once, followers stopped) instead of the process vanishing."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block (main thread only), SIGTERM raises :class:`Terminated`."""
    try:
        old = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            raise Terminated()

        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM as it is
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
