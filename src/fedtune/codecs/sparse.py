"""Top-k sparsification: only the k largest-magnitude entries of each tensor travel.

Meant for the *update* (the client's difference from the adapter it received), with error
feedback on the client (see :mod:`fedtune.client`): what is dropped now is added to the next
round's update, so nothing is lost for good (Stich et al. 2018, https://arxiv.org/abs/1809.07599).
Indices travel as int32 gaps between sorted positions (small numbers a compressor squeezes well).
"""

from __future__ import annotations

import math

import torch

from fedtune.codecs.base import FLOAT_DTYPES, PartSpec, TensorStage, numel, register_stage
from fedtune.config import CommConfig
from fedtune.errors import MessageError

MAX_ELEMENTS = 2**31 - 1  # int32 indices


@register_stage
class TopK(TensorStage):
    name = "topk"
    params = ("k",)

    def __init__(self, fraction: float = 0.1):
        self.fraction = fraction

    @classmethod
    def from_config(cls, comm: CommConfig):
        return cls(comm.topk_fraction)

    def encode(self, x):
        flat = x.reshape(-1)
        n = flat.numel()
        if n > MAX_ELEMENTS:
            raise ValueError(f"topk supports tensors of at most {MAX_ELEMENTS} entries")
        k = min(n, max(1, math.ceil(self.fraction * n))) if n else 0
        # ties broken by position (stable sort), so encoding is deterministic
        order = torch.sort(flat.abs().float(), descending=True, stable=True).indices[:k]
        pos = torch.sort(order).values
        gaps = torch.diff(pos, prepend=torch.zeros(1, dtype=pos.dtype)) if k else pos
        return flat[pos].clone(), {"idx": gaps.to(torch.int32)}, {"k": k}

    @classmethod
    def plan(cls, shape, dtype, p):
        if dtype not in FLOAT_DTYPES:
            raise MessageError(f"codec topk applies to floating-point tensors, not {dtype}")
        n, k = numel(shape), p["k"]
        if not (0 <= k <= n and k <= MAX_ELEMENTS and (k >= 1 or n == 0)):
            raise MessageError(f"codec topk: k={k} out of range for a tensor of {n} entries")
        return PartSpec((k,), dtype), {"idx": PartSpec((k,), torch.int32)}

    @classmethod
    def decode(cls, payload, side, p, shape, dtype):
        gaps = side["idx"].to(torch.int64)
        n = numel(shape)
        if gaps.numel():
            if gaps[0] < 0 or (gaps[1:] < 1).any():
                raise MessageError("codec topk: indices must be strictly increasing")
            pos = torch.cumsum(gaps, 0)
            if pos[-1] >= n:
                raise MessageError(f"codec topk: index {int(pos[-1])} out of range for {n} entries")
        else:
            pos = gaps
        dense = torch.zeros(n, dtype=dtype)
        dense[pos] = payload.to(dtype)
        return dense.reshape(shape)
