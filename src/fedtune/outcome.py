"""How a run ended: whether it trained anything at all, and disk failures in the middle of it.

Both are judged outside the round loop (from the logged rows, around ``Server.run``), so the
simulation (:func:`fedtune.run.run`) and the deployment (:func:`fedtune.flower.server_app.run_deployed`)
share them without the server knowing.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError


@contextmanager
def disk_errors(run_dir: Path):
    """A full or read-only disk in the middle of a run: one clear error (checkpoints are written
    atomically, so the last complete one is intact and the run resumes from it)."""
    import errno

    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
            raise
        raise FedtuneError(f"writing to the run directory {run_dir} failed ({e.strerror or e}: "
                           f"{e.filename or ''}); the last complete checkpoint is intact: fix the disk, "
                           f"then continue with --resume {run_dir}") from None


class RunFailed(FedtuneError):
    """The run went through its rounds but trained nothing (every update rejected, or every local
    step skipped as non-finite): its adapter is the untrained one, so it must not report success."""


def check_training_happened(rows: list[dict[str, Any]], adapter_dir: Path | None = None, echo=None) -> None:
    """From the logged rows alone: raise :class:`RunFailed` when no client update was ever accepted
    (or every accepted one skipped all its steps as non-finite), naming the rejection reasons seen;
    warn (``echo``) about rounds in which every client failed and clients that never contributed.

    Round rows carry ``clients`` (sampled) and ``rejected`` (how many failed); fit client rows carry
    ``rejected`` (the reason, or None) and, when accepted, ``steps``/``skipped_nonfinite``.
    Used by the simulation and the deployment alike (both end in :func:`finish_run`)."""
    from collections import Counter

    rounds = [r for r in rows if r.get("kind") == "round" and r.get("round", 0) >= 1 and "clients" in r]
    if not rounds:
        return
    fits = [r for r in rows if r.get("kind") == "client" and r.get("round", 0) >= 1 and "rejected" in r]
    reasons = Counter(str(r["rejected"])[:200] for r in fits if r.get("rejected"))
    accepted = sum(max(0, int(r.get("clients") or 0) - int(r.get("rejected") or 0)) for r in rounds)
    ok = [r for r in fits if not r.get("rejected")]
    stepped = [r for r in ok if "steps" in r]
    trained = any(int(r.get("steps") or 0) > int(r.get("skipped_nonfinite") or 0) for r in stepped)

    def seen(counter: Counter) -> str:
        return "; ".join(f"{why} ({n}x)" for why, n in counter.most_common(5)) or "no reason recorded"

    untrained = f"; the adapter{f' in {adapter_dir}' if adapter_dir else ''} is the untrained one"
    if accepted == 0:
        raise RunFailed(f"no client update was accepted in any of the {len(rounds)} round(s): every one was "
                        f"rejected ({seen(reasons)}){untrained}. Check the data, train.lr and "
                        "train.precision (a non-finite loss or update is rejected)")
    if stepped and not trained:
        skipped = sum(int(r.get("skipped_nonfinite") or 0) for r in stepped)
        raise RunFailed(f"every local step of every client was skipped as non-finite ({skipped} steps in "
                        f"{len(rounds)} round(s)): nothing was trained{untrained}. The loss or its gradients "
                        "overflow: lower train.lr, or use train.precision=fp32 or bf16")
    if echo is None:
        return
    dead = [r["round"] for r in rounds if r.get("clients") and r.get("rejected") == r.get("clients")]
    if dead:
        echo(f"warning: every client failed in round(s) {', '.join(map(str, dead[:20]))}: the global adapter "
             f"did not change there ({seen(reasons)})")
    never = sorted({r["client"] for r in fits} - {r["client"] for r in ok})
    if never:
        echo(f"warning: client(s) {', '.join(map(str, never[:20]))} never contributed an accepted update")
