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
