"""Per-client state that persists across rounds, kept off the shared model.

A client's optimizer moments, its position in the LR schedule and data stream, its own adapter
(local scenario, personalisation) and algorithm state (SCAFFOLD control variates, codec error
feedback) live in a :class:`ClientState`: named tensors + JSON metadata, stored as one safetensors
file per client. With the ``disk`` store the simulation's memory does not grow with the number
of clients (FS-LLM keeps every client's state in memory); ``memory`` trades RAM for speed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedtune.utils import atomic_write_bytes, fsync_file, safe_name


@dataclass
class ClientState:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors stored under ``prefix/`` with the prefix removed."""
        p = prefix + "/"
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    def set_group(self, prefix: str, tensors: dict[str, torch.Tensor] | None) -> None:
        p = prefix + "/"
        for k in [k for k in self.tensors if k.startswith(p)]:
            del self.tensors[k]
        for k, v in (tensors or {}).items():
            self.tensors[p + k] = v.detach().cpu()

    def to_bytes(self) -> bytes:
        """safetensors bytes (tensors + JSON meta): how a state is stored, or handed to a peer."""
        return _encode_state(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientState:
        return _decode_state(data)


def _encode_state(state: ClientState) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.contiguous() for k, v in state.tensors.items()}
    return save(tensors, metadata={"meta": json.dumps(state.meta, sort_keys=True)})


def _decode_state(data: bytes) -> ClientState:
    from safetensors.torch import load

    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = json.loads((header.get("__metadata__") or {}).get("meta", "{}"))
    return ClientState(tensors=load(data), meta=meta)


class ClientStateStore:
    """Client states in memory (``root=None``) or as files under ``root`` (written atomically)."""

    def __init__(self, root: Path | None = None):
        # the directory is made on first write, so building a run writes nothing before it starts
        self.root = Path(root) if root is not None else None
        self._mem: dict[str, bytes] = {}

    def _path(self, cid: str) -> Path:
        assert self.root is not None
        return self.root / f"{safe_name(cid)}.safetensors"

    def get(self, cid: str) -> ClientState:
        if self.root is None:
            data = self._mem.get(safe_name(cid))
        else:
            p = self._path(cid)
            data = p.read_bytes() if p.is_file() else None
        return _decode_state(data) if data is not None else ClientState()

    def put(self, cid: str, state: ClientState) -> None:
        data = _encode_state(state)
        if self.root is None:
            self._mem[safe_name(cid)] = data
        else:
            # Not fsynced: the live store is scratch between checkpoints (a crash resumes from the
            # last checkpoint's snapshot, which *is* made durable below). Saves ~40 ms per client.
            atomic_write_bytes(self._path(cid), data, durable=False)

    def snapshot(self, dest: Path) -> None:
        """Copy every client's state into ``dest`` (hard links where possible: files are
        replaced, never modified, so a link is a true snapshot)."""
        dest.mkdir(parents=True, exist_ok=True)
        if self.root is None:
            for key, data in self._mem.items():
                atomic_write_bytes(dest / f"{key}.safetensors", data)
            return
        for p in self.root.glob("*.safetensors"):
            try:
                os.link(p, dest / p.name)
            except OSError:
                shutil.copy2(p, dest / p.name)
            fsync_file(dest / p.name)  # the live store skips fsync; a checkpoint must be durable

    def restore(self, src: Path) -> None:
        """Replace all states with the snapshot in ``src``."""
        if self.root is None:
            self._mem = {p.stem: p.read_bytes() for p in src.glob("*.safetensors")}
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.root.glob("*.safetensors"):
            p.unlink()
        for p in src.glob("*.safetensors"):
            shutil.copy2(p, self._path(p.stem))


def optimizer_to_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer's state_dict into named tensors + JSON (no pickle)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{key}"] = val.detach().cpu().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = val
    meta = {"param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, meta


def optimizer_from_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    for idx, vals in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(vals)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
