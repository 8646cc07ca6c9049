"""Typed messages between server and clients: named tensors + metrics + config, never pickled.

A :class:`Message` serialises to safetensors bytes: the tensors (any dtype, bfloat16 included,
with name and shape in the header) and a JSON metadata block for metrics/config. ``len()`` of
those bytes is what fedtune reports as bytes up/down, in simulation as in deployment.
The in-process transport really encodes and decodes every message, so both paths run the same
bytes through the same parser.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from fedtune.errors import FedtuneError

_META_KEY = "fedtune"
#: refuse to parse messages whose header declares more than this many bytes (hostile input).
MAX_MESSAGE_BYTES = 4 << 30


@dataclass
class Message:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def encode(msg: Message) -> bytes:
    from safetensors.torch import save

    meta = json.dumps({"metrics": msg.metrics, "config": msg.config}, sort_keys=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in msg.tensors.items()}
    return save(tensors, metadata={_META_KEY: meta})


class MessageError(FedtuneError):
    """A message that failed strict parsing (malformed, non-finite, wrong shapes)."""


def decode(data: bytes, *, expect: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
           allow_nonfinite: bool = False) -> Message:
    """Parse bytes strictly. ``expect`` maps names to (shape, dtype) the receiver requires."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES} limit")
    if len(data) < 8:
        raise MessageError("message shorter than its 8-byte header length")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise MessageError(f"header declares {header_len} bytes but only {len(data) - 8} follow")
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise MessageError(f"malformed message: {e}") from None
    raw_meta = (header.get("__metadata__") or {}).get(_META_KEY, "{}")
    try:
        meta = json.loads(raw_meta)
    except ValueError:
        raise MessageError("malformed message metadata") from None
    if not isinstance(meta, dict):
        raise MessageError("message metadata is not an object")
    if expect is not None:
        if tensors.keys() != expect.keys():
            missing = sorted(expect.keys() - tensors.keys())[:3]
            extra = sorted(tensors.keys() - expect.keys())[:3]
            raise MessageError(f"tensor names differ: missing {missing}, unexpected {extra}")
        for k, (shape, dtype) in expect.items():
            t = tensors[k]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise MessageError(f"tensor '{k}': got {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
    if not allow_nonfinite:
        for k, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise MessageError(f"tensor '{k}' holds NaN or Inf")
    metrics = meta.get("metrics") or {}
    for k, v in metrics.items():
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise MessageError(f"metric '{k}' is not a number")
    return Message(tensors=tensors, metrics=metrics, config=meta.get("config") or {})
