"""Run checkpoints: everything needed to continue a killed run and land on the same adapter.

Layout of ``RUN_DIR/checkpoints/round_00012/``::

    server.safetensors   global adapter(s) + algorithm state; JSON meta (round, fingerprint, RNG)
    clients/             every client's persistent state (optimizer, schedule/data position, ...)

A checkpoint is written into a temp directory and renamed into place, and ``latest`` (a text file
naming it) is replaced atomically afterwards, so a crash at any moment leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.state import ClientStateStore
from fedtune.utils import atomic_write_text

TensorDict = dict[str, torch.Tensor]


def _rng_state() -> dict[str, Any]:
    st = random.getstate()
    return {"python": [st[0], list(st[1]), st[2]], "numpy": np.random.get_state()[1].tolist()[:4],
            "torch_seed": int(torch.initial_seed())}


def save_checkpoint(run_dir: Path, rnd: int, models: dict[str, TensorDict], store: ClientStateStore,
                    meta: dict[str, Any], keep: int = 2) -> Path:
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round_{rnd:05d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        tensors = {f"{key}/{name}": t.contiguous() for key, sd in models.items() for name, t in sd.items()}
        full_meta = dict(meta, round=rnd, rng=_rng_state(), models=sorted(models))
        save_file(tensors, str(tmp / "server.safetensors"), metadata={"meta": json.dumps(full_meta)})
        store.snapshot(tmp / "clients")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    from safetensors import safe_open

    models: dict[str, TensorDict] = {}
    with safe_open(str(path / "server.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
        for name in f.keys():
            key, _, tname = name.partition("/")
            models.setdefault(key, {})[tname] = f.get_tensor(name)
    for key in meta.get("models", []):
        models.setdefault(key, {})
    store.restore(path / "clients")
    return int(meta["round"]), models, meta
