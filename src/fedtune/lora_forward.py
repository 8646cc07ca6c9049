"""peft's vanilla LoRA forward for training, with its two scalar products applied once, on rank r.

peft's LoRA linear layer (LoRA, arXiv 2106.09685) computes ``result + lora_B(lora_A(dropout(x))) *
scaling`` with ``dropout(x) = x · mask / (1 - p)``: two scalar products over full-width tensors
(``/ (1 - p)`` on the layer's input, ``· scaling`` on its output), each again in the backward — four
elementwise passes a layer on activations of ``tokens x 576`` or ``x 1536`` (SmolLM2), 210 layers a
step. Both are scalars, so they commute with the matmuls:

    result + lora_B(lora_A(x · mask) · (scaling / (1 - p)))

is the same function, with the same mask (the same draws of the same generator: the dropout module's
own :meth:`~fedtune.dropout.MaskDropout.masked`). The mask's product is exact (x or a signed zero),
and the one scale multiplies the ``tokens x r`` activation between A and B — rank 8 against 576
columns — forward and backward alike; the gradient reaching ``lora_B`` is the output's own, with no
product. What moves is where bf16 rounds: peft rounds ``x / (1 - p)`` and ``B(·) · scaling`` to bf16,
here ``A(·) · s`` is rounded instead — products in another order, the precision's rounding apart
(tests/test_lora_forward.py; fp32 to 1e-6). In a SmolLM2 step +3.8% (10 of 10 alternating pairs,
docs/benchmarks.md#train_throughput). No library folds these, so it is written here.

:func:`folded_scales` installs this forward on every plain LoRA linear layer of a model for the
duration of a training micro-batch (its forward and backward: a checkpointed block's recompute runs
it again) and takes it off after; a layer with a LoRA variant (DoRA …), merged or disabled adapters,
per-call adapter names, or a forward already replaced by someone else (accelerate's hooks) keeps
peft's own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def masked_input(dropout: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``dropout(x)`` as (its masked input, the scale still to apply): fedtune's dropout modules
    leave the scale out (:meth:`fedtune.dropout.MaskDropout.masked`), any other module gives its
    own output and 1."""
    masked = getattr(dropout, "masked", None)
    return masked(x) if masked is not None else (dropout(x), 1.0)


def _plain(layer: Any) -> bool:
    """The layer runs vanilla LoRA for all its active adapters, unmerged and enabled."""
    return not (layer.disable_adapters or layer.merged or any(k in layer.lora_variant for k in layer.active_adapters))


def train_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's ``Linear.forward`` for vanilla LoRA with the scales folded (module docstring); any
    other case goes to peft's own."""
    if args or kwargs or not _plain(self):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    dtype = result.dtype
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        masked, scale = masked_input(self.lora_dropout[name], self._cast_input_dtype(x, lora_A.weight.dtype))
        result = result + lora_B(lora_A(masked) * (self.scaling[name] * scale))
    return result.to(dtype)


def _lora_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.lora.layer import Linear as LoraLinear

    return [m for m in model.modules() if isinstance(m, LoraLinear) and "forward" not in vars(m)]


@contextlib.contextmanager
def folded_scales(model: torch.nn.Module) -> Iterator[None]:
    """Every peft LoRA linear layer of ``model`` runs :func:`train_forward` inside the block
    (layers whose forward someone else replaced are left alone); peft's forward is back on exit."""
    layers = _lora_linears(model)
    for m in layers:
        m.forward = train_forward.__get__(m)
    try:
        yield
    finally:
        for m in layers:
            vars(m).pop("forward", None)
