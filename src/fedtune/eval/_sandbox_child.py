"""The process side of :mod:`fedtune.eval.sandbox`; not imported by fedtune, run as a script.

``python -I -S -B _sandbox_child.py`` reads one JSON job on stdin and runs one *role* of one
HumanEval check:

* ``candidate``: the untrusted program (prompt + model completion). It runs the program's module
  code, then answers calls of the entry point sent as plain values over a pipe. Nothing else.
* ``harness``: the trusted side. It runs the problem's own code and tests (from the dataset) with
  ``candidate`` bound to a proxy that sends the arguments to the candidate and turns the reply back
  into plain values, and writes the verdict on a pipe that only it holds.

Three processes per role:

* **S** (this script's main process; host namespaces) creates the namespaces, forks I, waits for
  it and reports how it ended on stdout (one JSON line). On SIGTERM from the evaluator it kills I
  and waits until the whole namespace is gone. It dies with the evaluator (``PR_SET_PDEATHSIG``).
* **I** (PID 1 of a new PID namespace; new mount, network, IPC and UTS namespaces): builds the
  private root (a read-only tmpfs holding read-only binds of the system's library directories and
  the Python standard library, site-packages masked, a size-limited private ``/tmp`` for the
  candidate, no ``/proc``, ``/dev`` only ``null``/``zero``/``random``/``urandom``), chroots into
  it, forks R, reaps, and exits when R ends: PID 1 exiting makes the kernel kill every other
  process of the namespace, so nothing the program started survives it.
* **R** (the role): closes every descriptor but its pipes, sets the resource limits, drops to an
  unprivileged uid/gid with no supplementary groups, no capabilities and ``no_new_privs``, then
  runs the role. The harness is also non-dumpable.

Without ``isolate`` (``humaneval.sandbox=best-effort`` on a machine where namespaces are not
available) there are no namespaces and no uid change: only the limits, a new session killed at the
end, and the in-process guard below. That is protection against accidents only.

Kept free of fedtune imports: it runs under ``-I -S`` (no site-packages) and, after the chroot,
sees only the standard library.
"""

import builtins
import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38

#: The directory the private root is mounted on, inside the private mount namespace only (the
#: host's /tmp is untouched and, inside, hidden). Nothing the sandbox needs may live below it.
NEWROOT = "/tmp"
#: Largest message either side accepts (bytes of one JSON line).
MAX_MESSAGE = 4 << 20
#: Deepest nesting of a value (lists in lists ...).
MAX_DEPTH = 200

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _c(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _c(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _prctl(option, value):
    _c(_libc.prctl(option, value, 0, 0, 0), f"prctl({option})")


# ---------------------------------------------------------------------------------------------
# Plain values over a pipe. Only these types cross, each encoded by tag, so the harness compares
# values with the builtin types' own semantics: a candidate cannot return an object whose __eq__
# says yes, and numbers never pass through JSON's number syntax (ints as hex: no digit limit).

class ProtocolError(BaseException):
    """A message that is not a well-formed plain value (BaseException: tests cannot swallow it)."""


def encode(v, depth=0):
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if v is None or isinstance(v, bool):
        return None if v is None else bool(v)
    if isinstance(v, int):
        return {"i": format(int(v), "x")}
    if isinstance(v, float):
        return {"f": float(v).hex()}
    if isinstance(v, complex):
        return {"c": [float(v.real).hex(), float(v.imag).hex()]}
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, bytearray):
        return {"Y": bytes(v).hex()}
    if isinstance(v, bytes):
        return {"y": bytes(v).hex()}
    if isinstance(v, tuple):
        return {"t": [encode(x, depth + 1) for x in v]}
    if isinstance(v, list):
        return [encode(x, depth + 1) for x in v]
    if isinstance(v, dict):
        return {"d": [[encode(k, depth + 1), encode(x, depth + 1)] for k, x in v.items()]}
    if isinstance(v, frozenset):
        return {"F": [encode(x, depth + 1) for x in v]}
    if isinstance(v, set):
        return {"S": [encode(x, depth + 1) for x in v]}
    raise TypeError(f"a {type(v).__name__} is not a plain value (None, bool, int, float, complex, str, "
                    "bytes, list, tuple, dict, set)")


def _hashable(x):
    try:
        hash(x)
    except TypeError:
        raise ProtocolError(f"unhashable {type(x).__name__} as a dict key or set element") from None
    return x


def decode(x, depth=0):
    if depth > MAX_DEPTH:
        raise ProtocolError("value nested too deeply")
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, list):
        return [decode(i, depth + 1) for i in x]
    if not isinstance(x, dict) or len(x) != 1:
        raise ProtocolError(f"not a plain value: {type(x).__name__}")
    ((tag, val),) = x.items()
    try:
        if tag == "i" and isinstance(val, str) and len(val) <= MAX_MESSAGE:
            return int(val, 16)
        if tag == "f" and isinstance(val, str) and len(val) < 64:
            return float.fromhex(val)
        if tag == "c" and isinstance(val, list) and len(val) == 2 and all(isinstance(p, str) and len(p) < 64 for p in val):
            return complex(float.fromhex(val[0]), float.fromhex(val[1]))
        if tag in ("y", "Y") and isinstance(val, str):
            return (bytes if tag == "y" else bytearray)(bytes.fromhex(val))
        if isinstance(val, list):
            if tag == "t":
                return tuple(decode(i, depth + 1) for i in val)
            if tag in ("S", "F"):
                return (set if tag == "S" else frozenset)(_hashable(decode(i, depth + 1)) for i in val)
            if tag == "d":
                out = {}
                for pair in val:
                    if not isinstance(pair, list) or len(pair) != 2:
                        raise ProtocolError("malformed dict item")
                    out[_hashable(decode(pair[0], depth + 1))] = decode(pair[1], depth + 1)
                return out
    except ValueError as e:
        raise ProtocolError(f"malformed {tag!r} value: {e}") from None
    raise ProtocolError(f"unknown or malformed tag {tag!r}")


def _reject_constant(name):
    raise ProtocolError(f"bare JSON constant {name}")


def _reject_number(text):
    raise ProtocolError("bare JSON number")


def recv(f):
    """One message (a JSON object) or None at end of file; ProtocolError for anything else."""
    line = f.readline(MAX_MESSAGE + 1)
    if not line:
        return None
    if len(line) > MAX_MESSAGE or not line.endswith(b"\n"):
        raise ProtocolError(f"message larger than {MAX_MESSAGE >> 20} MiB or cut off")
    try:
        msg = json.loads(line, parse_constant=_reject_constant, parse_int=_reject_number,
                         parse_float=_reject_number)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"not JSON: {type(e).__name__}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("message is not an object")
    return msg


def send(f, msg):
    f.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
    f.flush()


def describe(e):
    """``Type: first line of the message`` (at most 200 characters of it), as the reasons read."""
    if isinstance(e, SystemExit):
        return f"called exit({e.code!r}) before the tests finished"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------
# The roles (run in R)

def role_candidate(job, rf, wf):
    g = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(job["code"], "program.py", "exec"), g)
    except BaseException as e:  # noqa: BLE001 - every fault of the program is its failure
        send(wf, {"error": describe(e)})
        return
    fn = g.get(job["entry_point"])
    if not callable(fn):
        send(wf, {"error": f"NameError: the program defines no function {job['entry_point']!r}"})
        return
    send(wf, {"ready": True})
    while True:
        req = recv(rf)
        if req is None:
            return
        args, kwargs = decode(req["a"]), decode(req["k"])
        try:
            reply = {"ok": encode(fn(*args, **kwargs))}
        except BaseException as e:  # noqa: BLE001
            name = "SystemExit" if isinstance(e, SystemExit) else type(e).__name__
            reply = {"raise": [name, describe(e), isinstance(e, Exception)]}
        send(wf, reply)


class ProgramEnded(BaseException):
    """The candidate stopped answering (it exited, crashed or was killed)."""


class ProgramExited(BaseException):
    """The candidate called exit() (or raised another non-Exception) while being tested."""


def _exception_class(name, is_exception):
    cls = getattr(builtins, name, None) if isinstance(name, str) else None
    if is_exception is True and isinstance(cls, type) and issubclass(cls, Exception):
        return cls
    return RuntimeError if is_exception is True else ProgramExited


def role_harness(job, rf, wf, vf):
    failure = []  # sticky: once the candidate misbehaves the check has failed, whatever the tests do

    def verdict(status, reason=""):
        vf.write(json.dumps({"status": status, "reason": reason}).encode() + b"\n")
        vf.flush()

    def reply():
        try:
            msg = recv(rf)
        except ProtocolError as e:
            failure.append(f"the program answered with a malformed message ({e})")
            raise ProtocolError(failure[0]) from None
        if msg is None:
            failure.append("ENDED")
            raise ProgramEnded()
        return msg

    def candidate(*args, **kwargs):
        if failure:
            raise ProtocolError(failure[0])
        send(wf, {"a": encode(list(args)), "k": encode(dict(kwargs))})
        msg = reply()
        if set(msg) == {"ok"}:
            try:
                return decode(msg["ok"])
            except ProtocolError as e:
                failure.append(f"the program returned a malformed value ({e})")
                raise
        if set(msg) == {"raise"} and isinstance(msg["raise"], list) and len(msg["raise"]) == 3:
            name, text, is_exc = msg["raise"]
            cls = _exception_class(name, is_exc)
            text = text[:300] if isinstance(text, str) else ""
            if cls is ProgramExited:
                failure.append(text or "the program exited before the tests finished")
                raise ProgramExited(failure[0])
            try:
                exc = cls(text.split(": ", 1)[1] if ": " in text else "")
            except Exception:  # noqa: BLE001 - a class that wants other arguments (UnicodeDecodeError)
                exc = RuntimeError(text)
            raise exc
        failure.append("the program answered with a malformed message")
        raise ProtocolError(failure[0])

    g = {"__name__": "__fedtune_check__", "__builtins__": builtins}
    exec(compile(job["harness"], "tests.py", "exec"), g)  # the problem's own code and tests: trusted
    try:
        first = reply()
    except (ProgramEnded, ProtocolError):
        verdict("failed", failure[0])
        return
    if set(first) != {"ready"}:
        err = first.get("error")
        verdict("failed", err[:300] if isinstance(err, str) else "the program answered with a malformed message")
        return
    g[job["entry_point"]] = candidate  # tests that name the function call the candidate too (HumanEval/33)
    try:
        g["check"](candidate)
    except BaseException as e:  # noqa: BLE001
        verdict("failed", failure[0] if failure else describe(e))
        return
    verdict("failed", failure[0]) if failure else verdict("passed")


# ---------------------------------------------------------------------------------------------
# In-process guard, best-effort mode only (no isolation): turns the commonest accidents (a fork
# loop, deleting files, killing processes) into exceptions. Hostile code gets round it (posix,
# ctypes); with isolation it is not used, the kernel enforces the limits instead.

def _best_effort_guard():
    import shutil
    import subprocess

    def disabled(*a, **k):
        raise OSError("disabled in the fedtune sandbox (best-effort mode)")

    for mod, names in ((os, ("fork", "forkpty", "system", "kill", "killpg", "remove", "unlink", "removedirs",
                             "rmdir", "truncate", "replace", "rename", "renames", "execv", "execve", "execvp",
                             "spawnv", "spawnve", "posix_spawn", "posix_spawnp", "popen")),
                       (shutil, ("rmtree", "move", "chown")),
                       (subprocess, ("Popen", "run", "call", "check_call", "check_output"))):
        for n in names:
            if hasattr(mod, n):
                setattr(mod, n, disabled)


# ---------------------------------------------------------------------------------------------
# Isolation (in I, as root, in the new namespaces)

def _under(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def _bind_ro(src, dst, is_dir, device=False):
    if is_dir:
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    _mount(src, dst, None, MS_BIND | MS_REC)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC * device | MS_NODEV * (not device)
    _mount(None, dst, None, flags)


def build_root(job):
    """Mount the private root on NEWROOT and chroot into it (all before any untrusted code)."""
    expose = []
    for p in job["expose"]:
        p = os.path.normpath(p)
        if os.path.lexists(p) and not any(_under(p, q) for q in expose):
            expose.append(p)
    for p in expose:
        if _under(os.path.realpath(p), NEWROOT) or _under(p, NEWROOT):
            raise OSError(f"{p} lies below {NEWROOT}, which the sandbox mounts its private root on")
    masks = [m for m in job["mask"] if os.path.isdir(m) and any(_under(m, q) for q in expose)]
    links = {p: os.readlink(p) for p in expose if os.path.islink(p)}
    kinds = {p: os.path.isdir(p) for p in expose}
    _mount("tmpfs", NEWROOT, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    os.umask(0o022)
    for p in sorted(expose, key=len):
        dst = NEWROOT + p
        if p in links:  # /lib -> usr/lib on merged-/usr systems: the same link, its target is exposed too
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(links[p], dst)
        else:
            _bind_ro(p, dst, kinds[p])
    for m in masks:  # an interpreter's site-packages (the dataset may be installed there)
        _mount("tmpfs", NEWROOT + m, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,nr_inodes=1")
    for dev in ("null", "zero", "random", "urandom"):
        if os.path.exists("/dev/" + dev):
            _bind_ro("/dev/" + dev, f"{NEWROOT}/dev/{dev}", False, device=True)
    if job["tmp_mb"] > 0:
        os.makedirs(NEWROOT + "/tmp", exist_ok=True)
        _mount("tmpfs", NEWROOT + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
               f"size={job['tmp_mb']}m,nr_inodes=1024,mode=0700,uid={job['uid']},gid={job['gid']}")
    _mount(None, NEWROOT, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(NEWROOT)
    os.chdir("/")


#: The role's pipes are renumbered to these descriptors (and every other one is closed).
ROLE_FDS = {"in": 3, "out": 4, "verdict": 5}


def run_role(job, status_w):
    """R: tidy descriptors, limit, drop privileges, run the role; never returns. A failure before
    the role starts is the sandbox's (reported as a setup error), one after it is the program's."""
    import fcntl

    try:
        high = {name: fcntl.fcntl(fd, fcntl.F_DUPFD, 1000 + ROLE_FDS[name]) for name, fd in job["fds"].items()}
        status = fcntl.fcntl(status_w, fcntl.F_DUPFD, 1010)
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.closerange(3, 1000)  # the lifeline, the original pipe numbers, everything else
        for name, fd in high.items():
            os.dup2(fd, ROLE_FDS[name])
            os.close(fd)
        os.closerange(1011, 1 << 16)
        work = "/tmp" if job["isolate"] else job["workdir"]  # the private writable directory
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"})
        if job["tmp_mb"] > 0:
            os.chdir(work)
        for name, value in job["limits"].items():
            if name == "RLIMIT_NPROC" and os.getuid() == 0 and not job["isolate"]:
                continue  # never binds root (best-effort as root)
            resource.setrlimit(getattr(resource, name), (value, value))
        if job["isolate"]:
            os.setgroups([])
            os.setgid(job["gid"])
            os.setuid(job["uid"])
            if os.getuid() == 0 or os.geteuid() == 0 or os.getegid() != job["gid"] or os.getgroups():
                raise OSError("could not drop root privileges")
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        if job["role"] == "harness":
            _prctl(PR_SET_DUMPABLE, 0)  # nobody else may trace it or read its memory
        rf = os.fdopen(ROLE_FDS["in"], "rb")
        wf = os.fdopen(ROLE_FDS["out"], "wb")
        vf = os.fdopen(ROLE_FDS["verdict"], "wb") if job["role"] == "harness" else None
    except BaseException as e:  # noqa: BLE001
        os.write(status_w if "status" not in locals() else status,
                 (json.dumps({"setup_error": f"{type(e).__name__}: {e}"}) + "\n").encode())
        os._exit(70)
    os.close(status)
    code = 0
    try:
        if vf is not None:
            role_harness(job, rf, wf, vf)
        else:
            if not job["isolate"]:
                _best_effort_guard()
            role_candidate(job, rf, wf)
    except BaseException:  # noqa: BLE001 - the exit status says it; the pipes carry the rest
        code = 70
    os._exit(code)


def init(job, status_w, lifeline):
    """I: PID 1 of the namespaces (or the session leader without isolation); never returns."""
    import select

    def report(msg):
        os.write(status_w, (json.dumps(msg) + "\n").encode())

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if select.select([lifeline], [], [], 0)[0]:  # S died before we asked to die with it
            os._exit(1)
        os.close(lifeline)
        if job["isolate"]:
            build_root(job)
        os.setsid()  # its own session and process group, no controlling terminal
        r = os.fork()
        if r == 0:
            run_role(job, status_w)
        for fd in job["fds"].values():
            os.close(fd)
        while True:  # PID 1 reaps every orphan of the namespace; R's status is the result
            pid, status = os.wait()
            if pid == r:
                break
        report({"wait_status": status})
    except BaseException as e:  # noqa: BLE001
        report({"setup_error": f"{type(e).__name__}: {e}"})
        os._exit(1)
    if not job["isolate"]:
        os.killpg(0, signal.SIGKILL)  # the session's leftovers (a setsid() escapes this: best effort)
    os._exit(0)  # PID 1 exits: the kernel kills every process left in the namespace


def main():
    job = json.loads(sys.stdin.buffer.read())
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the evaluator died: so do we, and the namespace
    if os.getppid() != job["parent_pid"]:
        return 1
    out = sys.stdout
    if job["isolate"]:
        try:
            _c(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
            _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount reaches the host
        except OSError as e:
            out.write(json.dumps({"setup_error": str(e)}) + "\n")
            return 0
    status_r, status_w = os.pipe()
    lifeline_r, lifeline_w = os.pipe()  # I sees end-of-file on it once S is gone
    child = os.fork()
    if child == 0:
        os.close(status_r)
        os.close(lifeline_w)
        init(job, status_w, lifeline_r)
    os.close(status_w)
    os.close(lifeline_r)
    for fd in job["fds"].values():
        os.close(fd)
    signal.signal(signal.SIGTERM, lambda *a: os.kill(child, signal.SIGKILL))
    os.waitpid(child, 0)  # returns once I, and with it the whole namespace, is gone
    chunks = []
    while True:
        b = os.read(status_r, 65536)
        if not b:
            break
        chunks.append(b)
    msg = {}
    for line in b"".join(chunks).splitlines():  # R's setup error (if any), then I's report
        try:
            part = json.loads(line)
        except ValueError:
            continue
        if isinstance(part, dict):
            msg = {**part, **msg} if "setup_error" in msg else {**msg, **part}
    out.write(json.dumps(msg) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
