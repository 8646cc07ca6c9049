"""LoRA dropout as training runs it: exact masks kept as booleans, or cheaper masks on the CPU.

peft puts a ``torch.nn.Dropout`` on the input of every LoRA layer, and before it casts that input
to the adapter's dtype (fp32): on a bf16 base under autocast each LoRA layer takes the input to
fp32, draws an fp32 noise tensor (``bernoulli_``, then ``/ (1 - p)``), multiplies, and autocast
casts the product back to bf16 for ``lora_A`` — five passes over the activation and an fp32 noise
tensor kept for the backward, per LoRA layer (7 a block), and the reverse casts in the backward.

:class:`MaskDropout` (the default, swapped in by :func:`set_lora_dropout`) gives the *same numbers*
with less work: it draws the same Bernoulli sample (``bernoulli_(1 - p)`` from the same generator,
over a tensor of the input's shape and strides, so the same draws land on the same elements), keeps
it as a boolean mask (1 byte an element instead of 4), and returns ``x * c * mask`` where ``c`` is
the fp32 value ``1 / (1 - p)`` that torch's dropout multiplies by. With the input cast switched off
(:func:`lora_input_casts_off`, under autocast only) ``x`` stays bf16 and ``x * c`` is computed in
fp32 and rounded once to bf16 — what autocast's cast of peft's fp32 product gave; the gradient
likewise (tests/test_dropout.py checks outputs and gradients bit for bit against peft's own path).
The product takes the mask viewed as bytes (``uint8``, the same 0s and 1s): torch's elementwise
kernels convert a boolean operand one element at a time, a ``uint8`` one vectorised — 0.74 ms
against 0.19 ms for a 1280 × 576 bf16 activation on an AVX512 EPYC, in the forward and again in
the backward (+5% a SmolLM2 LoRA step).
No library does this, so it is written here. Where :mod:`fedtune.mt_bernoulli` has checked that
it reproduces this torch's CPU sampler bit for bit (AMD CPUs, numba installed), the mask comes from
there: the same draws, 9x faster than torch's serial loop (0.30 against 2.7 ms for 1280 × 576).

:class:`FastDropout` (opt-in: ``train.fast_dropout: true``) is another random sample: on a CPU torch
draws each mask element through its Bernoulli sampler from the one Mersenne-Twister generator, a
64-bit draw per element on one thread (~2.7 ms for a 1280 × 576 activation on an AVX512 EPYC): on
SmolLM2 + LoRA that was a quarter to a third of a training step (docs/benchmarks.md#train_throughput;
with the compiled exact masks above, about 4%).
:class:`FastDropout` takes 64-bit words from the same default generator (``random_`` over the full
64-bit range) and reads each as four 16-bit uniforms u ∈ {0, …, 65535}: a quarter of the draws.
With t = round(p · 65536), an element is kept when u ≥ t — probability 1 − t/65536 — and kept
elements are scaled by 65536 / (65536 − t), so E[dropout(x)] = x exactly. The drop probability is
therefore p rounded to a multiple of 2⁻¹⁶ (0.05 → 0.0500031); the gradient is the same mask times
the same scale, as with torch's dropout.

Different random numbers than torch's dropout: a run with it on is another, equally valid sample
of the same training, not the same numbers — hence opt-in, and the default stays bit-compatible.
It is as reproducible and resume-exact as the default: the words come from torch's default CPU
generator, whose state the client state and every checkpoint already carry. On CUDA and other
devices torch's own (fast) dropout runs unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from fedtune import mt_bernoulli, padding_free

_LANES = 65536  # 16-bit uniforms


class _MaskThenScale(torch.nn.Module):
    """Dropout as ``masked(x)`` — the input times a 0/1 mask, and the scale still owed — then that
    scale: :mod:`fedtune.lora_forward` calls ``masked`` alone and applies the scale elsewhere."""

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masked, scale = self.masked(x)
        # (x · mask) · c is (x · c) · mask bit for bit: the 0/1 product is exact, and either way a
        # kept element is x · c rounded once and a dropped one a zero with x's sign
        return masked if scale == 1.0 else masked.mul_(scale)


class FastDropout(_MaskThenScale):
    """Inverted dropout with 16-bit uniforms, four per 64-bit draw (see the module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.cut = round(p * _LANES)  # drop u < cut
        self.scale = _LANES / (_LANES - self.cut)

    def extra_repr(self) -> str:
        return f"p={self.p}, effective_p={self.cut / _LANES:.7f}"

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``x`` times this call's 0/1 mask (exact), and the scale the kept elements still take:
        ``forward`` is their product; :mod:`fedtune.lora_forward` applies the scale elsewhere."""
        if not self.training or self.cut == 0:
            return x, 1.0
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, True), 1.0
        keep = padding_free.padded_draw(x, self._keep)
        return x * keep.view(torch.uint8), self.scale

    def _keep(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
        # int16 lanes are u - 32768: keep u >= cut
        return words.view(torch.int16)[:n].view(shape) >= self.cut - _LANES // 2


class MaskDropout(_MaskThenScale):
    """torch's inverted dropout, the same draws and values, the mask kept as booleans (module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p
        # torch's dropout divides its {0, 1} fp32 noise by (1 - p): this is that quotient, in fp32
        self.scale = (torch.ones((), dtype=torch.float32) / (1 - p)).item() if p < 1 else 0.0

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``x`` times this call's keep mask (a 0/1 product: exact), and the scale ``1 / (1 - p)``
        the kept elements still take: ``forward`` is their product; :mod:`fedtune.lora_forward`
        applies the scale once, on the rank-r activation."""
        if not self.training or self.p == 0 or x.numel() == 0:
            return x, 1.0
        if self.p == 1:
            return x * 0.0, 1.0
        keep = padding_free.padded_draw(x, lambda shape: self._keep(x, shape))
        return x * keep.view(torch.uint8), self.scale  # bytes: torch's bool reads are not vectorised

    def _keep(self, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """torch's draws for ``x`` (``shape`` is ``x``'s), or for the contiguous padded batch of a
        packed row ``x`` (:func:`fedtune.padding_free.padded_draw`)."""
        contiguous = x.is_contiguous() or shape != tuple(x.shape)
        if x.device.type == "cpu" and contiguous and mt_bernoulli.available():
            return mt_bernoulli.bernoulli_keep(shape, 1 - self.p)  # the same draws, compiled
        if shape != tuple(x.shape):
            return torch.empty(shape, dtype=torch.bool, device=x.device).bernoulli_(1 - self.p)
        return torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - self.p)


def set_lora_dropout(model: torch.nn.Module, fast: bool) -> int:
    """Give every LoRA layer of ``model`` :class:`FastDropout` (``fast``) or :class:`MaskDropout`
    (torch's numbers), with the same p; returns how many layers have dropout at all."""
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for key, d in list(drops.items()):
            if fast and isinstance(d, (torch.nn.Dropout, MaskDropout)) and d.p < 1:
                drops[key] = FastDropout(d.p).train(d.training)
            elif not fast and isinstance(d, (torch.nn.Dropout, FastDropout)):
                drops[key] = MaskDropout(d.p).train(d.training)
            n += isinstance(drops[key], (MaskDropout, FastDropout))
    return n


def _castable_lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """peft's plain LoRA linear layers whose dropout gives the cast's numbers on an uncast input."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = []
    for m in model.modules():
        if not isinstance(m, LoraLinear) or any(k in m.active_adapters for k in getattr(m, "lora_variant", {})):
            continue  # DoRA and the other variants use the input beyond A(dropout(x))
        drops = [m.lora_dropout[k] for k in m.active_adapters if k in m.lora_dropout]
        if all(isinstance(d, (MaskDropout, FastDropout, torch.nn.Identity)) or not d.training for d in drops):
            layers.append(m)
    return layers


@contextlib.contextmanager
def lora_input_casts_off(model: torch.nn.Module) -> Iterator[None]:
    """Inside an autocast region: peft's LoRA layers leave their input in the base's dtype instead of
    casting it to the adapter's fp32 (``cast_input_dtype_enabled``). Autocast runs ``lora_A`` in its
    16-bit dtype either way, and :class:`MaskDropout` / :class:`FastDropout` compute ``x * scale``
    in fp32 and round once, so every value is the one the cast path gives — without the fp32 copy of
    the input, its noise tensor and their casts back. Restored on exit (outside autocast an fp32
    adapter on a bf16 input needs the cast)."""
    layers = _castable_lora_layers(model)
    before = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            m.cast_input_dtype_enabled = was
