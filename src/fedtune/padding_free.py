"""Padding-free training batches: a batch's examples run as one row of their real tokens only.

A right-padded batch of ``B`` examples of longest length ``T`` spends every per-token operation —
the frozen linears, LoRA, norms, SwiGLU, rotary embeddings, dropout — on its pad positions too
(11% of the tokens of ``benchmarks/train_throughput.py``'s length-grouped batches, a third without
grouping). Here the ``N`` real tokens of the batch are concatenated into one row ``(1, N)``, with
positions restarting at 0 for every example (transformers' ``position_ids``), and the model runs on
that row. Only attention mixes tokens: for it the row's queries, keys and values are put back into
the padded ``(B, T)`` layout (:meth:`Layout.pad`, zeros at the pad positions), attended with exactly
the mask the padded batch gets (causal, real keys only: :attr:`Layout.keep`) by the same kernels,
and the output is gathered back (:meth:`Layout.unpad`). LoRA dropout draws its mask over the padded
shape and keeps the real rows (:func:`padded_draw`), so every element gets the draw it gets in the
padded batch. The row is filled up to a multiple of :data:`ROW_MULTIPLE` tokens with copies of a
pad position (matmuls over such row counts run faster), which attention never reads and the loss
never sees. So a step computes what the padded step computes — the same examples, masks, targets
and mean — on the real tokens only; what can differ is the summation order inside matmuls over a
different number of rows (tests/test_padding_free.py compares both ways of running a batch). On
train_throughput's batches: +6.8% tokens/s, 8 of 8 alternating pairs (docs/benchmarks.md).

Why not a library: transformers recognises packed rows from ``position_ids`` and builds a
block-diagonal mask for them, but its SDPA and eager paths then compute ``N × N`` attention, most
of it masked; variable-length attention kernels exist for CUDA (flash-attn) only. The layout is held
in a context variable for the duration of a micro-batch's forward and backward (gradient
checkpointing replays the forward inside the backward), set by :func:`fedtune.training.train_local`.

Where it applies (:func:`supported`): models on fedtune's training attention
(:data:`fedtune.models.attention.ATTENTION`, the only attention function that knows the layout),
whose forward takes ``position_ids`` and gives the padded batch's logits on a packed row — tried
once per model on two short rows (a model that mixes tokens outside attention, such as a
convolution, fails it and keeps padded batches, as does one whose absolute positions do not follow
``position_ids``; rotary embeddings only see differences of positions within an example) — and
batches that have padding at all and no sliding attention window shorter than them.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from fedtune.utils import close_enough, eval_mode

log = logging.getLogger(__name__)


#: packed rows are padded to a multiple of this many tokens: bf16 matmuls over a number of rows
#: that is one run 9-45% faster on an AVX512 EPYC (969 rows: 3.22 ms for 576 -> 1536, 976 rows: 2.22
#: ms; docs/benchmarks.md#train_throughput), and fewer distinct shapes meet oneDNN's kernel cache.
ROW_MULTIPLE = 16


@dataclass(frozen=True)
class Layout:
    """Where a padded ``(rows, length)`` batch's ``tokens`` real tokens are: ``index`` (ascending
    for the real tokens) into its flattened ``rows · length`` positions, then as many filler
    entries pointing at a pad position as round the packed row up to :data:`ROW_MULTIPLE`; ``keep``
    the ``(rows, 1, length, length)`` boolean attention mask of the padded batch (query t sees keys
    up to t that are real). Fillers are computed like pad positions are: attention never reads them
    and the loss never sees them, so they get exactly zero gradient."""

    index: torch.Tensor
    tokens: int
    rows: int
    length: int
    keep: torch.Tensor

    @property
    def width(self) -> int:
        """The packed row's length: the real tokens and the fillers."""
        return self.index.numel()

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """A packed row's ``(width, *rest)`` values → ``(rows, length, *rest)``: the real tokens in
        place, zeros at the pad positions (fillers dropped)."""
        out = x.new_zeros((self.rows * self.length, *x.shape[1:]))
        n = self.tokens
        return out.index_copy(0, self.index[:n], x[:n]).view(self.rows, self.length, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """``(rows, length, *rest)`` → the packed row's ``(width, *rest)``: the real tokens in order,
        then the fillers (copies of a pad position)."""
        return x.reshape(self.rows * self.length, *x.shape[2:]).index_select(0, self.index)

    def holds(self, x: torch.Tensor, dim: int = 1) -> bool:
        """Whether ``x`` is this batch's packed row: batch dimension 1, :attr:`width` along ``dim``."""
        return x.dim() > dim and x.shape[0] == 1 and x.shape[dim] == self.width


_current: ContextVar[Layout | None] = ContextVar("fedtune_padding_free", default=None)


def current() -> Layout | None:
    """The layout of the micro-batch running now, or None (padded batches)."""
    return _current.get()


@contextlib.contextmanager
def active(layout: Layout | None) -> Iterator[None]:
    """Run a packed micro-batch's forward and backward inside this block (None: nothing changes)."""
    token = _current.set(layout)
    try:
        yield
    finally:
        _current.reset(token)


def plan(attention_mask: torch.Tensor, window: int | None = None) -> Layout | None:
    """The layout of a right-padded batch (``attention_mask`` ``(B, T)``: each row's ones first),
    or None where padding-free gains nothing or does not apply: no padding, one row, a row that is
    not right-padded, or a sliding ``window`` shorter than the batch."""
    B, T = attention_mask.shape
    real = attention_mask.bool()
    lengths = real.sum(1)
    if B < 2 or bool(real.all()) or (window is not None and T > window):
        return None
    positions = torch.arange(T, device=real.device)
    if not bool((real == (positions[None] < lengths[:, None])).all()):
        return None  # left padding or holes: not the layout collate() builds
    index = real.reshape(-1).nonzero().squeeze(1)
    n = index.numel()
    fillers = -n % ROW_MULTIPLE
    if fillers:
        a_pad_position = (~real).reshape(-1).nonzero()[0]
        index = torch.cat([index, a_pad_position.expand(fillers)])
    keep = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()[None, None] & real[:, None, None, :]
    return Layout(index=index, tokens=n, rows=B, length=T, keep=keep)


def packed_inputs(batch: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """The model inputs of ``batch`` as one row of its real tokens (and fillers): ``input_ids`` and
    ``position_ids`` (each example's positions from 0), ``(1, width)``; no attention mask."""
    B, T = layout.rows, layout.length
    ids = layout.unpad(batch["input_ids"])
    pos = layout.unpad(torch.arange(T, device=ids.device).expand(B, T))
    return {"input_ids": ids[None], "position_ids": pos[None]}


def padded_draw(x: torch.Tensor, draw: Callable[[tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
    """A random mask for ``x`` from ``draw(shape)``: for a packed row of the running micro-batch
    it is drawn over the padded batch's shape and cut to the real tokens, so every token gets the
    draws it gets in the padded batch (the same generator, the same order); else over ``x.shape``."""
    layout = current()
    if layout is None or not layout.holds(x):
        return draw(tuple(x.shape))
    padded = draw((layout.rows, layout.length, *x.shape[2:]))
    return layout.unpad(padded).view(x.shape)


def window_of(model: torch.nn.Module) -> int | None:
    """The model's sliding attention window, if it has one (the padded mask ignores it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or not getattr(config, "use_sliding_window", True):
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if isinstance(window, int) and window > 0 else None


def supported(model: torch.nn.Module) -> bool:
    """Whether ``model`` trains on packed rows (module docstring): on fedtune's training attention,
    ``position_ids`` in its forward, and the padded logits from a packed row of two short examples
    (tried once, in eval mode, cached on the model)."""
    from fedtune.models.attention import ATTENTION

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "_attn_implementation", None) != ATTENTION:
        return False
    ok = getattr(base, "_fedtune_padding_free", None)
    if ok is None:
        ok = _same_logits(model, base)
        base._fedtune_padding_free = ok
        if not ok:
            log.info("%s does not give the padded batch's logits on a packed row: training keeps padded batches",
                     type(base).__name__)
    return ok


@torch.no_grad()
def _same_logits(model: torch.nn.Module, base: torch.nn.Module) -> bool:
    try:
        if "position_ids" not in inspect.signature(base.forward).parameters:
            return False
    except (TypeError, ValueError):
        return False
    device = next(model.parameters()).device
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]], device=device)
    att = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], device=device)
    layout = plan(att)
    try:
        with eval_mode(model):
            want = layout.unpad(model(input_ids=ids, attention_mask=att).logits)[:layout.tokens]
            with active(layout):
                got = model(**packed_inputs({"input_ids": ids}, layout)).logits[0, :layout.tokens]
    except (IndexError, RuntimeError, TypeError, ValueError):
        return False
    return close_enough(got, want, max(torch.finfo(want.dtype).eps, torch.finfo(next(base.parameters()).dtype).eps))
