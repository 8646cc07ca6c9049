"""Value codecs: fp16/bf16 casts and int8/int4 with one fp32 scale per block of values."""

from __future__ import annotations

from typing import ClassVar

import torch

from fedtune.codecs.base import FLOAT_DTYPES, PartSpec, TensorStage, numel, register_stage
from fedtune.config import CommConfig
from fedtune.errors import MessageError

MAX_BLOCK = 1 << 20


def _need_float(name: str, dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise MessageError(f"codec {name} applies to floating-point tensors, not {dtype}")


class _Cast(TensorStage):
    target: ClassVar[torch.dtype]

    def encode(self, x):
        y = x
        if self.target == torch.float16:
            # saturate instead of overflowing to Inf (which the receiver would reject as non-finite)
            lim = torch.finfo(torch.float16).max
            y = x.clamp(-lim, lim)
        return y.to(self.target), {}, {}

    @classmethod
    def plan(cls, shape, dtype, p):
        _need_float(cls.name, dtype)
        return PartSpec(shape, cls.target), {}

    @classmethod
    def decode(cls, payload, side, p, shape, dtype):
        return payload.to(dtype)


@register_stage
class Fp16(_Cast):
    name = "fp16"
    target = torch.float16


@register_stage
class Bf16(_Cast):
    name = "bf16"
    target = torch.bfloat16


class _BlockQuant(TensorStage):
    """Symmetric absmax quantisation per block: ``q = round(x / s)``, ``s = max|x_block| / qmax``.

    The payload is flattened; the last block may be short. Scales are fp32 (fp16 scales would
    underflow for the small magnitudes of adapter updates).
    """

    params = ("block",)
    qmax: ClassVar[int]

    def __init__(self, block: int = 64):
        self.block = block

    @classmethod
    def from_config(cls, comm: CommConfig):
        return cls(comm.block_size)

    def _quantise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1).float()
        n, b = flat.numel(), self.block
        nb = -(-n // b)
        padded = torch.zeros(nb * b, dtype=torch.float32)
        padded[:n] = flat
        blocks = padded.view(nb, b)
        scale = blocks.abs().amax(dim=1) / self.qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(blocks / safe[:, None]).clamp_(-self.qmax, self.qmax)
        return q.reshape(-1)[:n], scale

    # how the integer codes are stored: subclasses say
    @classmethod
    def _pack(cls, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def _unpack(cls, payload: torch.Tensor, n: int) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def _packed_spec(cls, n: int) -> PartSpec:
        raise NotImplementedError

    def encode(self, x):
        q, scale = self._quantise(x)
        return self._pack(q), {"scale": scale}, {"block": self.block}

    @classmethod
    def plan(cls, shape, dtype, p):
        _need_float(cls.name, dtype)
        b = p["block"]
        if not 2 <= b <= MAX_BLOCK:
            raise MessageError(f"codec {cls.name}: block {b} out of range 2..{MAX_BLOCK}")
        n = numel(shape)
        return cls._packed_spec(n), {"scale": PartSpec((-(-n // b),), torch.float32)}

    @classmethod
    def decode(cls, payload, side, p, shape, dtype):
        scale, b, n = side["scale"], p["block"], numel(shape)
        if not torch.isfinite(scale).all() or (scale < 0).any():
            raise MessageError(f"codec {cls.name}: scales must be finite and non-negative")
        padded = torch.zeros(scale.numel() * b, dtype=torch.float32)
        padded[:n] = cls._unpack(payload, n).float()
        return (padded.view(-1, b) * scale[:, None]).reshape(-1)[:n].reshape(shape).to(dtype)


@register_stage
class Int8(_BlockQuant):
    name = "int8"
    qmax = 127

    @classmethod
    def _pack(cls, q):
        return q.to(torch.int8)

    @classmethod
    def _unpack(cls, payload, n):
        return payload

    @classmethod
    def _packed_spec(cls, n):
        return PartSpec((n,), torch.int8)


@register_stage
class Int4(_BlockQuant):
    """Codes in -7..7 stored as ``q + 8`` in 4-bit nibbles, two per byte (low nibble first)."""

    name = "int4"
    qmax = 7

    @classmethod
    def _pack(cls, q):
        u = (q + 8).to(torch.uint8)
        if u.numel() % 2:
            u = torch.cat([u, torch.full((1,), 8, dtype=torch.uint8)])
        return u[0::2] | (u[1::2] << 4)

    @classmethod
    def _unpack(cls, payload, n):
        u = torch.stack([payload & 0xF, payload >> 4], dim=1).reshape(-1)[:n]
        return u.to(torch.int16) - 8

    @classmethod
    def _packed_spec(cls, n):
        return PartSpec(((n + 1) // 2,), torch.uint8)


__all__ = ["Fp16", "Bf16", "Int8", "Int4"]
