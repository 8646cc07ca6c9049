"""Checks a run makes before it writes anything: where it writes, and the config against the model
and the federation that only exist once they are loaded.

Each failing check is one :class:`~fedtune.errors.FedtuneError` that names the setting to change.
They run after the model and data are loaded and before the run directory is made (see
:func:`fedtune.run.run`), so a bad value leaves nothing behind instead of failing in round 1 with
a traceback (``data.max_length`` past the model's context, ``peft.r=10**9``) or being silently
changed (``fl.clients_per_round`` larger than the federation used to be capped).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError

#: a run directory needs at least this much free space besides its checkpoints (metrics, config,
#: logs, temp files of atomic writes)
MIN_FREE_BYTES = 16 << 20

#: model config attributes that hold the longest sequence the model was built for, by family
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def existing_ancestor(path: Path) -> Path:
    """The nearest of ``path`` and its parents that exists (as anything: a file, a directory)."""
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output_location(path: Path, setting: str = "output.dir") -> None:
    """``path`` (which may not exist yet) can be made and written: no regular file in the way, the
    directory that will hold it writable (checked by writing, so read-only mounts and root's
    permission bypass are judged by what really happens) and not full. Writes and removes one
    small temp file; raises FedtuneError naming ``setting``."""
    p = Path(path)
    anc = existing_ancestor(p)
    if not anc.is_dir():
        what = "is a file" if anc.is_file() else "is not a directory"
        raise FedtuneError(f"{setting}={p}: {anc} {what}, so no directory can be made below it; choose "
                           f"another {setting}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fedtune-write-test-", dir=anc)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        why = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full",
               errno.EDQUOT: "the disk quota is exhausted", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}.get(e.errno, e.strerror or str(e))
        raise FedtuneError(f"{setting}={p}: cannot write in {anc} ({why}); choose a writable {setting}") from None
    check_free_space(p, 0, setting)


def check_free_space(path: Path, need: int, setting: str = "output.dir") -> None:
    """At least ``need`` + :data:`MIN_FREE_BYTES` bytes free where ``path`` lives."""
    anc = existing_ancestor(Path(path))
    try:
        st = os.statvfs(anc if anc.is_dir() else anc.parent)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if free < need + MIN_FREE_BYTES:
        extra = f" (a checkpoint of this run takes about {_human(need)})" if need else ""
        raise FedtuneError(f"{setting}={path}: only {_human(free)} free on its file system{extra}; free "
                           f"some space or choose another {setting}")


def checkpoint_bytes(adapter: dict[str, Any], num_clients: int, local: bool) -> int:
    """About what one checkpoint of a run needs on disk: the adapter(s) in ``server.safetensors`` and
    in PEFT format, and every client's state (AdamW's two moments plus an error-feedback residual)."""
    size = sum(t.numel() * t.element_size() for t in adapter.values())
    models = num_clients if local else 1
    return size * (2 * models + 3 * num_clients)


def _model_config(model: Any) -> Any:
    cfg = getattr(model, "config", None)
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        try:
            cfg = get_text()
        except Exception:  # noqa: BLE001 - an odd config: use the top-level one
            pass
    return cfg


def _first_int(cfg: Any, keys: tuple[str, ...]) -> tuple[str, int] | None:
    for k in keys:
        v = getattr(cfg, k, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return k, v
    return None


def check_against_model(cfg: Any, model: Any) -> None:
    """``data.max_length`` (plus the virtual tokens of prefix/prompt methods) within the model's
    context, and a LoRA rank no larger than the model's hidden size."""
    mcfg = _model_config(model)
    if mcfg is None:
        return
    ctx = _first_int(mcfg, _CONTEXT_KEYS)
    virtual = cfg.peft.num_virtual_tokens if cfg.peft.method != "lora" else 0
    if ctx is not None and cfg.data.max_length + virtual > ctx[1]:
        plus = f" + peft.num_virtual_tokens={virtual}" if virtual else ""
        raise FedtuneError(
            f"data.max_length={cfg.data.max_length}{plus} exceeds the context of {cfg.model.name} "
            f"({ctx[0]}={ctx[1]}); use data.max_length={max(8, ctx[1] - virtual)} or less")
    hidden = _first_int(mcfg, _HIDDEN_KEYS)
    if cfg.peft.method == "lora" and hidden is not None and cfg.peft.r > hidden[1]:
        raise FedtuneError(f"peft.r={cfg.peft.r} exceeds the hidden size of {cfg.model.name} "
                           f"({hidden[0]}={hidden[1]}); a LoRA rank is at most that (typically 4-64)")


def check_federation(cfg: Any, num_clients: int) -> None:
    """``fl.clients_per_round`` (a count) is at most the clients the data split (or the deployment)
    produced; a fraction is always fine."""
    c = cfg.fl.clients_per_round
    if cfg.fl.scenario != "fed" or c is None or isinstance(c, float) or isinstance(c, bool):
        return
    if c > num_clients:
        raise FedtuneError(
            f"fl.clients_per_round={c} but the federation has {num_clients} client(s); use at most "
            f"{num_clients}, a fraction such as 0.5, or null for all of them")
