"""Small shared helpers: atomic writes, seeding, RNG state capture."""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _atomic(path: Path, write: Callable[[Path], None], durable: bool = True) -> None:
    """Write via a temp file in the same directory, fsync, then rename: never half-written.

    ``durable=False`` skips the fsync: the file is still never seen half-written, but a power loss
    may lose the latest version (fine for scratch state that a checkpoint snapshot makes durable).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        if durable:
            fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    _atomic(path, lambda p: p.write_bytes(data), durable)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda p: p.write_text(text))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from parts (e.g. run seed, round, client) independent of call order."""
    import hashlib

    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


#: longest name :func:`safe_name` returns: with a suffix such as ``.safetensors`` and the temp-file
#: decoration of an atomic write it stays far below the 255 bytes a file name may have
SAFE_NAME_MAX = 100


def safe_name(name: str) -> str:
    """A client id made safe as a file or directory name (the id itself stays the display name).

    Names that need changing get a short hash so two ids never collide ("C#" -> "C_-<hash>"); a
    name longer than :data:`SAFE_NAME_MAX` (a meta split grouping 200 categories into 2 clients
    joins them with ``+``) is cut and gets a longer hash of the whole name. Idempotent: a safe
    name maps to itself.
    """
    import hashlib
    import re

    name = str(name)
    cleaned = re.sub(r"[^A-Za-z0-9._+=-]", "_", name).strip(".")
    if cleaned == name and cleaned and len(cleaned) <= SAFE_NAME_MAX:
        return cleaned
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()
    if len(cleaned) + 7 <= SAFE_NAME_MAX:
        return f"{cleaned or '_'}-{digest[:6]}"
    return f"{cleaned[: SAFE_NAME_MAX - 13].rstrip('.')}-{digest[:12]}"


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """``auto`` (CUDA when present, else CPU) or a device this machine has; anything else is a
    :class:`~fedtune.errors.FedtuneError` here, before a run writes anything, rather than a
    RuntimeError/AssertionError from deep inside torch at the first ``.to(device)``. ``setting``
    names where the value came from in the messages (``train.device``, ``--device``)."""
    from fedtune.errors import FedtuneError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise FedtuneError(f"{setting}={name} is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FedtuneError(f"{setting}={name}: this machine has no usable CUDA device (torch "
                               f"{torch.__version__}); use cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise FedtuneError(f"{setting}={name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return dev
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise FedtuneError(f"{setting}={name}: no such device is available on this machine; use cpu or auto")
    return dev


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout) inside the block; each module's own training flag is
    restored on exit (they may differ module by module). For the one-time capability checks that
    run a model twice and compare."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def close_enough(got: torch.Tensor, want: torch.Tensor, eps: float) -> bool:
    """Same shape and equal up to 16 ``eps`` relative to ``want``'s largest magnitude (the rounding
    of one computation done in two batch shapes)."""
    if got.shape != want.shape:
        return False
    got, want = got.float(), want.float()
    return bool((got - want).abs().max() <= 16 * eps * (1 + want.abs().max()))
