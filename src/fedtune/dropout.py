"""LoRA dropout with cheaper random masks on the CPU (opt-in: ``train.fast_dropout: true``).

peft puts a ``torch.nn.Dropout`` on the input of every LoRA layer. On a CPU torch draws each mask
element through its Bernoulli sampler from the one Mersenne-Twister generator, a 32-bit number
per element on one thread (~6 ms for a 1320 × 576 activation here): on SmolLM2 + LoRA that was a
quarter to a third of a training step (docs/benchmarks.md#train_throughput). No library offers a
faster CPU dropout, so this one is written here.

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

import torch

_LANES = 65536  # 16-bit uniforms


class FastDropout(torch.nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cut == 0:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, True)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
        # int16 lanes are u - 32768: keep u >= cut
        keep = words.view(torch.int16)[:n].view(x.shape) >= self.cut - _LANES // 2
        return x * keep * self.scale


def set_lora_dropout(model: torch.nn.Module, fast: bool) -> int:
    """Give every LoRA layer of ``model`` :class:`FastDropout` (``fast``) or torch's dropout back,
    with the same p; returns how many layers have dropout at all."""
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for key, d in list(drops.items()):
            if fast and type(d) is torch.nn.Dropout:
                drops[key] = FastDropout(d.p).train(d.training)
            elif not fast and isinstance(d, FastDropout):
                drops[key] = torch.nn.Dropout(d.p).train(d.training)
            n += isinstance(drops[key], (torch.nn.Dropout, FastDropout))
    return n
