"""The emulator on the wire, once per client, and what a client keeps of it.

The emulator (hundreds of MB for a real model) travels as its safetensors file, in pieces of at
most ``offsite.chunk_mb`` MiB, as the algorithm's own message kind ``emulator``: each message
carries one ``uint8`` tensor ``emulator/chunk`` (a bounded, variable length: every message stays
far under the wire's size limit and Flower's gRPC limit) and, in its config, the file's content
hash, total size and the chunk's offset. The exchange starts with an *offer* (an empty chunk):
a client that already holds the file under that hash says so and is sent nothing.

On the client the pieces are appended to a staging file; after the last one the file's SHA-256
must equal the hash, and the file is parsed strictly against the emulator this client expects
(the plan in its metadata; exactly the frozen tensors of its own skeleton, with their shapes and
dtypes) before it is moved into place (atomically) and the client is recorded as holding it.
The store lives in the SuperNode's state directory, so a restarted SuperNode still holds the
emulator and is not sent it again (a simulation keeps it under the run directory, or in memory).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedtune.errors import FedtuneError
from fedtune.offsite.emulator import content_hash, file_hash, load_weights, read_emulator
from fedtune.offsite.plan import Plan
from fedtune.utils import atomic_write_bytes, safe_name

log = logging.getLogger(__name__)

#: the message kind and the tensor group of the one-time transfer
EMULATOR = "emulator"
CHUNK = "chunk"


def chunk_bytes(chunk_mb: int) -> int:
    return int(chunk_mb) << 20


def chunks(path: Path, size: int) -> Iterator[tuple[int, bytes]]:
    """``(offset, bytes)`` pieces of ``path`` of at most ``size`` bytes."""
    with open(path, "rb") as f:
        offset = 0
        while True:
            data = f.read(size)
            if not data:
                return
            yield offset, data
            offset += len(data)


class EmulatorStore:
    """What one process's clients hold: emulator files by content hash, and which client holds which.

    ``root=None`` keeps everything in memory (a simulation with ``train.client_state: memory``).
    Files: ``<root>/<hash>.safetensors``; ``<root>/holders/<client>`` names the hash a client holds;
    ``<root>/incoming/<hash>.<client>.part`` is a transfer in progress."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None
        self._mem: dict[str, bytes] = {}
        self._held: dict[str, str] = {}
        self._incoming: dict[tuple[str, str], bytearray] = {}

    # ---- queries ----------------------------------------------------------------------
    def path(self, h: str) -> Path | None:
        if self.root is None:
            return None
        return self.root / f"{h}.safetensors"

    def has_file(self, h: str) -> bool:
        return h in self._mem if self.root is None else self.path(h).is_file()

    def holds(self, cid: str, h: str) -> bool:
        if self.root is None:
            held = self._held.get(cid)
        else:
            marker = self.root / "holders" / safe_name(cid)
            held = marker.read_text().strip() if marker.is_file() else None
        return held == h and self.has_file(h)

    # ---- receiving --------------------------------------------------------------------
    def receive(self, cid: str, h: str, total: int, offset: int, data: bytes, final: bool,
                verify) -> dict[str, float]:
        """Take one piece; on the last, check it whole (hash, then ``verify(path_or_bytes)``) and keep
        it. Returns the reply metrics: ``holds`` (0/1) and ``received`` (bytes so far)."""
        if not (isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h)):
            raise FedtuneError("emulator transfer without a valid content hash")
        if not (isinstance(total, int) and 0 < total and isinstance(offset, int) and 0 <= offset <= total):
            raise FedtuneError("emulator transfer with a malformed size or offset")
        key = (cid, h)
        if self.root is None:
            buf = self._incoming.setdefault(key, bytearray())
            if offset == 0:
                buf.clear()
            if offset != len(buf) or offset + len(data) > total:
                self._incoming.pop(key, None)
                return {"holds": 0, "received": 0}
            buf += data
            got = len(buf)
        else:
            part = self.root / "incoming" / f"{h}.{safe_name(cid)}.part"
            part.parent.mkdir(parents=True, exist_ok=True)
            have = part.stat().st_size if part.is_file() and offset else 0
            if offset != have or offset + len(data) > total:
                part.unlink(missing_ok=True)
                return {"holds": 0, "received": 0}
            with open(part, "r+b" if offset else "wb") as f:
                f.seek(offset)
                f.write(data)
            got = offset + len(data)
        if not final:
            return {"holds": 0, "received": got}
        if got != total:
            self._drop(key)
            return {"holds": 0, "received": got}
        return {"holds": int(self._complete(cid, h, verify)), "received": got}

    def _drop(self, key: tuple[str, str]) -> None:
        self._incoming.pop(key, None)
        if self.root is not None:
            (self.root / "incoming" / f"{key[1]}.{safe_name(key[0])}.part").unlink(missing_ok=True)

    def _complete(self, cid: str, h: str, verify) -> bool:
        if self.root is None:
            data = bytes(self._incoming.pop((cid, h)))
            if content_hash(data) != h:
                log.warning("emulator for %s: content hash mismatch; discarded", cid)
                return False
            verify(data)
            self._mem[h] = data
            self._held[cid] = h
            return True
        part = self.root / "incoming" / f"{h}.{safe_name(cid)}.part"
        if file_hash(part) != h:
            part.unlink(missing_ok=True)
            log.warning("emulator for %s: content hash mismatch; discarded", cid)
            return False
        try:
            verify(part)
        except FedtuneError:
            part.unlink(missing_ok=True)
            raise
        final = self.path(h)
        if final.is_file():
            part.unlink()
        else:
            os.replace(part, final)
        atomic_write_bytes(self.root / "holders" / safe_name(cid), (h + "\n").encode())
        return True

    def read(self, h: str, plan: Plan, spec) -> dict[str, torch.Tensor]:
        """The held emulator's weights, parsed strictly."""
        return read_emulator(self._mem[h] if self.root is None else self.path(h), plan, spec)


class ClientEmulator:
    """The client half's view of its emulator: the store, the plan and spec it expects, and which
    emulator (and re-alignment) the shared model currently holds."""

    def __init__(self, store: EmulatorStore, plan: Plan, spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 chunk_size: int, lowrank: dict[str, tuple[int, ...]] | None = None):
        self.store, self.plan, self.spec, self.chunk_size = store, plan, spec, chunk_size
        self.lowrank = lowrank or {}  # realign factor name -> shape
        self.loaded: tuple[int, str] | None = None  # (id of the model, hash)
        self.base: dict[str, torch.Tensor] = {}  # W₀ of the re-aligned weights

    def verify(self, source) -> None:
        read_emulator(source if isinstance(source, (bytes, bytearray)) else Path(source), self.plan, self.spec)

    def exchange(self, cid: str, config: dict[str, Any], chunk: torch.Tensor) -> dict[str, float]:
        h = config.get("hash")
        if config.get("offer"):
            return {"holds": int(self.store.holds(cid, h)), "received": 0}
        data = chunk.numpy().tobytes()
        return self.store.receive(cid, h, config.get("size"), config.get("offset"), data, bool(config.get("final")),
                                  self.verify)

    def ensure(self, model: torch.nn.Module, cid: str, h: str | None, factors: dict[str, torch.Tensor] | None) -> None:
        """Make ``model`` hold emulator ``h`` (loaded from the store once per model) and apply the
        round's re-alignment factors."""
        if not h or not self.store.holds(cid, h):
            raise FedtuneError(f"client {cid} does not hold emulator {str(h)[:12]}... (it is sent once, before the "
                               "client's first fit or evaluation)")
        if self.loaded != (id(model), h):
            weights = self.store.read(h, self.plan, self.spec)
            load_weights(model, weights, names=set(self.spec))
            self.base = {n: weights[n] for n in {k.rsplit(".", 1)[0] for k in self.lowrank}}
            self.loaded = (id(model), h)
        if self.lowrank:
            from fedtune.offsite.distill import apply_lowrank

            apply_lowrank(model, self.base, factors or {})
