"""Run checkpoints: everything needed to continue a killed run and land on the same adapter.

Layout of ``RUN_DIR/checkpoints/round_00012/``::

    server.safetensors   the algorithm's server state (Algorithm.state_dict: the global adapter(s),
                         server optimizer moments, control variates, ...) as tensors; JSON meta
                         (round, fingerprint, clients, algorithm name and its JSON state)
    rng.safetensors      global torch (CPU, CUDA), NumPy and Python RNG states (restored on resume)
    clients/             every client's persistent state (optimizer, data position, loss scale, ...)
    adapter/, adapters/  the round's PEFT adapter(s), written before ``latest`` names the checkpoint

A checkpoint is written into a temp directory and renamed into place, and ``latest`` (a text file
naming it) is replaced atomically afterwards, so a crash at any moment leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.state import ClientStateStore
from fedtune.utils import atomic_write_text

log = logging.getLogger(__name__)

TensorDict = dict[str, torch.Tensor]


def _save_rng_state(path: Path) -> None:
    """The global torch (CPU, and every CUDA device when present), NumPy and Python ``random``
    states as safetensors + JSON (never pickle). fedtune seeds each of its own draws from (seed,
    round, client), so resuming does not depend on these; they are restored so that anything else
    drawing from the global generators (a plug-in algorithm, a model's own code) continues the same
    sequence too."""
    from safetensors.torch import save_file

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = st
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next], "cuda_devices": len(tensors) - 2}
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})


def restore_rng_state(checkpoint: Path) -> None:
    """Put the global RNGs back as :func:`save_checkpoint` found them (see ``_save_rng_state``)."""
    from safetensors import safe_open

    path = Path(checkpoint) / "rng.safetensors"
    if not path.is_file():
        log.warning("%s has no RNG state (an older checkpoint); the global RNGs are not restored", checkpoint)
        return
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
        torch.set_rng_state(f.get_tensor("torch_cpu"))
        cuda = [f.get_tensor(f"torch_cuda_{i}") for i in range(meta["cuda_devices"])]
        keys = f.get_tensor("numpy_keys").numpy().astype(np.uint32)
    if cuda:
        here = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if here != len(cuda):
            log.warning("the checkpoint has the RNG state of %d CUDA device(s), this machine %d: restoring %d",
                        len(cuda), here, min(here, len(cuda)))
        for i in range(min(here, len(cuda))):
            torch.cuda.set_rng_state(cuda[i], i)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, keys, pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _pack(state: dict[str, TensorDict]) -> tuple[TensorDict, list[str]]:
    """Grouped tensors as one flat dict: ``<i>/<name>`` with ``i`` indexing the returned group
    names (any group name is safe, client ids included)."""
    groups = sorted(state)
    return {f"{i}/{name}": t.contiguous() for i, g in enumerate(groups) for name, t in state[g].items()}, groups


def _unpack(tensors: TensorDict, groups: list[str]) -> dict[str, TensorDict]:
    out: dict[str, TensorDict] = {g: {} for g in groups}
    for key, t in tensors.items():
        i, _, name = key.partition("/")
        out[groups[int(i)]][name] = t
    return out


def save_checkpoint(run_dir: Path, rnd: int, server_state: dict[str, TensorDict], store: ClientStateStore,
                    meta: dict[str, Any], keep: int = 2, then: Callable[[], None] | None = None) -> Path:
    """Write round ``rnd``'s checkpoint; ``then()`` runs once it is in place but before ``latest``
    names it (the round's PEFT adapters are written there), so ``latest`` always names a
    complete checkpoint: a crash in between resumes from the previous one."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round_{rnd:05d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        tensors, groups = _pack(server_state)
        full_meta = dict(meta, round=rnd, groups=groups)
        save_file(tensors, str(tmp / "server.safetensors"), metadata={"meta": json.dumps(full_meta)})
        _save_rng_state(tmp / "rng.safetensors")
        store.snapshot(tmp / "clients")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if then is not None:
        then()
    atomic_write_text(root / "latest", final.name)
    # prune old checkpoints (never the one just written)
    older = sorted(p for p in root.glob("round_*") if p.is_dir() and p != final)
    for p in older[: max(0, len(older) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    marker = root / "latest"
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    return path if (path / "server.safetensors").is_file() else None


def load_checkpoint(path: Path, store: ClientStateStore) -> tuple[int, dict[str, TensorDict], dict[str, Any]]:
    """(round, the algorithm's server state as saved, the checkpoint's metadata); restores ``store``."""
    from safetensors import safe_open

    with safe_open(str(path / "server.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    store.restore(path / "clients")
    return int(meta["round"]), _unpack(tensors, list(meta.get("groups", []))), meta


# ---- integrity on resume -------------------------------------------------------------------
# What a resume reads from a checkpoint is checked before any of it is used: every file parses as
# safetensors with its sizes consistent (a truncated file is caught by its length), the JSON
# metadata parses, and server.safetensors says which round it holds. Nothing here depends on which
# tensors server.safetensors holds, only on its ``meta`` carrying ``round``.

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 << 20


def _round_number(name: str) -> int | None:
    import re

    m = re.fullmatch(r"round_(\d{5,9})", name)
    return int(m.group(1)) if m else None


def check_safetensors_file(path: Path, meta_key: str | None = None) -> tuple[str | None, dict[str, Any] | None]:
    """(problem, parsed ``meta_key`` metadata): problem is None when ``path`` is a complete
    safetensors file (header JSON valid, every tensor's byte range matching its dtype and shape,
    the ranges tiling the data exactly up to the end of the file) whose ``meta_key`` metadata, when
    asked for, is a JSON object. Reads only the header."""
    import math

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is {size} bytes, shorter than a safetensors header", None
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                return f"{path.name} is truncated (its header declares {n} bytes, the file holds {size - 8})", None
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return f"{path.name} is missing", None
    except OSError as e:
        return f"{path.name} cannot be read ({e.strerror or e})", None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return f"{path.name} has a malformed header", None
    if not isinstance(header, dict):
        return f"{path.name} has a malformed header", None
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            nbytes = _DTYPE_BYTES[dtype] * math.prod(int(s) for s in shape)
            ok = isinstance(start, int) and isinstance(end, int) and 0 <= start <= end and end - start == nbytes
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            return f"{path.name}: tensor {str(name)[:60]!r} has an invalid entry in the header", None
        spans.append((start, end))
    pos = 0
    for start, end in sorted(spans):
        if start != pos:
            return f"{path.name}: its tensors' byte ranges overlap or leave gaps (damaged header)", None
        pos = end
    if 8 + n + pos != size:
        state = "truncated" if 8 + n + pos > size else "longer than its header says"
        return f"{path.name} is {state} ({size} bytes, its header describes {8 + n + pos})", None
    if meta_key is None:
        return None, None
    raw = (header.get("__metadata__") or {}).get(meta_key) if isinstance(header.get("__metadata__"), dict) else None
    try:
        meta = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        return f"{path.name} has no valid '{meta_key}' metadata", None
    return None, meta


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with checkpoint directory ``path`` (None: every file a resume reads is intact):
    ``server.safetensors`` (its meta names this round), ``rng.safetensors`` (when present; older
    checkpoints lack it) and every client state in ``clients/``."""
    path = Path(path)
    problem, meta = check_safetensors_file(path / "server.safetensors", "meta")
    if problem:
        return problem
    rnd = meta.get("round")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd != _round_number(path.name):
        return f"server.safetensors holds round {rnd!r}, not the round its directory is named for"
    if (path / "rng.safetensors").exists():
        problem, _ = check_safetensors_file(path / "rng.safetensors", "meta")
        if problem:
            return problem
    clients = path / "clients"
    if not clients.is_dir():
        return "the clients/ directory (every client's state) is missing"
    for f in sorted(clients.iterdir()):
        if f.name.startswith("."):
            continue  # a temp file of an interrupted atomic write
        if f.suffix != ".safetensors" or not f.is_file():
            return f"clients/{f.name[:80]} is not a client state file"
        problem, _ = check_safetensors_file(f)
        if problem is None:
            state_meta = _state_meta(f)
            problem = None if state_meta is not None else f"{f.name} has malformed metadata"
        if problem:
            return f"client state {problem}"
    return None


def _state_meta(path: Path) -> dict[str, Any] | None:
    """The JSON ``meta`` of a client state file ({} when it has none), None when it is malformed."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    raw = (header.get("__metadata__") or {}).get("meta", "{}") if isinstance(header.get("__metadata__"), dict) else "{}"
    try:
        meta = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def find_resumable_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint a resume should use, and what was wrong with the ones passed over.

    The one ``latest`` names when it is intact (the normal case: no notes). Otherwise — ``latest``
    missing, garbage, or naming a damaged checkpoint — the newest intact checkpoint older than the
    one it names (``checkpoint.keep`` keeps that many), each skipped one noted with its problem.
    ``(None, notes)`` when none is intact (no notes at all: the run has no checkpoint yet).
    """
    root = Path(run_dir) / "checkpoints"
    notes: list[str] = []
    dirs = []
    if root.is_dir():
        dirs = sorted(((r, p) for p in root.iterdir() if p.is_dir() and (r := _round_number(p.name)) is not None),
                      reverse=True)
    marker = root / "latest"
    named = None
    if marker.is_file():
        try:
            text = marker.read_bytes()[:200].decode("utf-8", "replace").strip()
        except OSError as e:
            text = f"<unreadable: {e.strerror}>"
        named = _round_number(text)
        if named is None:
            notes.append(f"checkpoints/latest holds {text[:40]!r}, not a checkpoint name")
    elif dirs:
        notes.append("checkpoints/latest is missing")
    if named is not None:
        target = root / f"round_{named:05d}"
        problem = verify_checkpoint(target) if target.is_dir() else "it is missing"
        if problem is None:
            return target, notes
        notes.append(f"{target.name} (named by checkpoints/latest): {problem}")
        # newer directories were never named complete by `latest` (a crash before it was updated)
        dirs = [(r, p) for r, p in dirs if r < named]
    for _, p in dirs:
        problem = verify_checkpoint(p)
        if problem is None:
            return p, notes
        notes.append(f"{p.name}: {problem}")
    return None, notes
