"""The LM head's cross-entropy in row chunks, with its gradient taken in the forward pass.

A causal LM's loss projects every labelled position's hidden state onto the whole vocabulary
(49,152 tokens for SmolLM2), takes a log-softmax and picks the label's entry. Done as one tensor
(``F.cross_entropy(lm_head(h).float(), y)``) a batch of 800 labelled positions materialises the
logits in the compute dtype, again in fp32, the log-softmax output (kept for the backward), and
the same three again as gradients: about 0.7 GB for a 135M-parameter model, each buffer above
glibc's mmap threshold, so every step maps and page-faults them afresh. Profiled on a 2-core AMX
Xeon (batch 8 x 160 tokens, bf16): the loss and its backward were 1.3 s of a 4.3 s step while the
head's matmuls themselves took 0.23 s (docs/benchmarks.md#train_throughput).

:class:`ChunkedHeadCrossEntropy` takes the hidden states of the labelled positions and the frozen
head weight and walks the rows in chunks of :data:`CHUNK_ROWS`: per chunk the logits (in the dtype
the head runs in, then fp32 as before), their log-sum-exp, the loss terms, and — when the hidden
states need a gradient — ``d loss / d logits = (softmax - onehot) / n`` pushed straight through the
head (``dlogits @ W``) into a saved ``(n, d)`` input gradient. No full-vocabulary tensor outlives a
chunk; the backward only multiplies the saved gradient by the incoming scalar. This is the idea of
Liger-Kernel's fused linear cross-entropy (arXiv 2410.10989), whose kernels are Triton (GPU only);
no CPU library does it, so it is written here in plain torch ops.

Same numbers as the one-tensor loss: the logits of a row do not depend on other rows, so chunking
changes no value; the loss is the same fp32 mean (summed in another order); the gradient is the
same ``(softmax - onehot) / n`` cast to the head's dtype and multiplied by ``W`` — the one difference
is where an upstream factor other than 1 (gradient accumulation's ``n / total``) is applied: after
that product instead of before the cast, a rounding of the compute dtype. fp16 is not taken here:
its loss scaler must scale the logits' gradient before the fp16 cast, or small gradients underflow.

Only a plain frozen ``nn.Linear`` head whose output the model returns unchanged qualifies (no logit
soft-capping or scaling, no adapter on the head): :func:`fused_head_supported` checks that once per
model against the model's own logits, and :func:`fedtune.training.lm_loss` falls back otherwise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from fedtune.utils import close_enough, eval_mode

log = logging.getLogger(__name__)

#: rows of logits per chunk. On a 2-core AMX Xeon (800 labelled rows x 49,152 tokens, bf16, forward +
#: backward) 32 rows took 193 ms, 64 164 ms, 128 149 ms, 256 146 ms against 304 ms for the one-tensor
#: loss; at 128 the chunk's buffers (bf16 and two fp32 copies of the logits) are 63 MB in all.
CHUNK_ROWS = 128
#: the last, partial chunk is padded with zero rows to a multiple of this, so the head's matmul
#: meets at most CHUNK_ROWS / ROW_MULTIPLE shapes however many labelled tokens a batch has: oneDNN
#: compiles and caches a kernel per shape (docs/benchmarks.md#train_memory).
ROW_MULTIPLE = 16


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """``mean_i CE(hidden[i] @ weight.T + bias, targets[i])``, chunked; gradient for ``hidden`` only.

    ``compute_dtype`` is the dtype the head's matmul runs in (autocast's, or the weight's); the
    logits are then taken to fp32 as ``lm_loss`` always did. ``weight`` and ``bias`` must be frozen.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                compute_dtype: torch.dtype) -> torch.Tensor:
        n, d = hidden.shape
        grad = ctx.needs_input_grad[0]
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        rows = min(CHUNK_ROWS, -(-n // ROW_MULTIPLE) * ROW_MULTIPLE)
        # one set of buffers for every chunk: a fresh 12 MB tensor per chunk and op costs a page
        # fault per 4 KB page each time (glibc maps and unmaps buffers this large)
        h_c = hidden.new_zeros((rows, d), dtype=compute_dtype)
        logits = hidden.new_empty((rows, w.shape[0]), dtype=compute_dtype)
        shifted = hidden.new_empty((rows, w.shape[0]), dtype=torch.float32)
        probs = torch.empty_like(shifted)
        dh = torch.empty_like(hidden) if grad else None
        dh_c = hidden.new_empty((rows, d), dtype=compute_dtype) if grad else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, CHUNK_ROWS):
                r = min(CHUNK_ROWS, n - s)
                m = min(rows, -(-r // ROW_MULTIPLE) * ROW_MULTIPLE)  # rows the matmuls run on
                h_c[:r].copy_(hidden[s : s + r])
                h_c[r:m].zero_()
                torch.mm(h_c[:m], w.t(), out=logits[:m])
                if b is not None:
                    logits[:m].add_(b)
                x = shifted[:r].copy_(logits[:r])  # the logits in fp32, as lm_loss always took them
                x.sub_(x.amax(dim=1, keepdim=True))
                e = torch.exp(x, out=probs[:r])
                z = e.sum(dim=1, keepdim=True)
                y = targets[s : s + r, None]
                total += (z.log() - x.gather(1, y)).sum(dtype=torch.float64)
                if grad:  # d(mean CE)/d logits = (softmax - onehot) / n, through the head
                    e.div_(z.mul_(n))
                    e.scatter_add_(1, y, e.new_full((r, 1), -1.0 / n))
                    logits[:r].copy_(e)
                    logits[r:m].zero_()
                    torch.mm(logits[:m], w, out=dh_c[:m])
                    dh[s : s + r].copy_(dh_c[:r])
        if grad:
            ctx.save_for_backward(dh)
        return (total / n).float()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (dh,) = ctx.saved_tensors
        return dh * grad_output, None, None, None, None  # a 0-dim factor keeps dh's dtype


def _compute_dtype(device: torch.device, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's ``F.linear`` would run in here: autocast's when it is on, else the weight's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


def _head(model: torch.nn.Module) -> torch.nn.Linear | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return head if type(head) is torch.nn.Linear else None  # an adapter-wrapped head is not plain


@contextlib.contextmanager
def _bypassed(head: torch.nn.Module) -> Iterator[None]:
    """Within the block ``head(x)`` returns ``x``: the model hands back the hidden states it would
    have projected (already cut to the kept positions by ``logits_to_keep``)."""
    previous = head.__dict__.get("forward")  # an instance-level forward (accelerate hooks) is kept
    head.forward = lambda x: x
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def head_hidden(forward: Callable, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                keep: torch.Tensor) -> torch.Tensor:
    """The hidden states the LM head sees at the positions ``keep`` marks, ``(num_kept, d)``.
    ``forward`` is what the caller trains through (the model, or its DDP wrapper); ``batch`` holds
    the model's inputs (``labels`` there are not passed on)."""
    head = _head(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with _bypassed(head):
        out = forward(**inputs, logits_to_keep=keep)
    return out.logits


def head_loss(forward: Callable, model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor,
              targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the kept positions against ``targets`` through the chunked head."""
    head = _head(model)
    h = head_hidden(forward, model, batch, keep)
    return ChunkedHeadCrossEntropy.apply(h, head.weight, head.bias, targets, _compute_dtype(h.device, head.weight))


@torch.no_grad()
def fused_head_supported(model: torch.nn.Module) -> bool:
    """Whether :func:`head_loss` computes ``model``'s own loss: a frozen plain ``nn.Linear`` head
    whose output the model returns as its logits (no soft-capping, scaling or bias trick after
    it), tried once on two short rows against the model's own logits and cached on the model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ok = getattr(base, "_fedtune_fused_head", None)
    if ok is not None:
        return ok
    head = _head(model)
    ok = head is not None and not head.weight.requires_grad and (head.bias is None or not head.bias.requires_grad)
    if ok:
        ok = _same_logits(model, head)
    base._fedtune_fused_head = ok
    if not ok:
        log.info("%s: the LM head is not a plain frozen linear layer whose output is the logits; the loss "
                 "materialises the logits", type(base).__name__)
    return ok


def chunked_head_applies(model: torch.nn.Module) -> bool:
    """Whether :func:`head_loss` serves ``model`` now: :func:`fused_head_supported`, and the head
    does not run in fp16 (whose loss scale must reach the logits' gradient before its fp16 cast,
    which this function takes in the forward)."""
    if not fused_head_supported(model):
        return False
    weight = _head(model).weight
    return _compute_dtype(weight.device, weight) != torch.float16


def _same_logits(model: torch.nn.Module, head: torch.nn.Linear) -> bool:
    device = head.weight.device
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]], device=device)
    keep = torch.tensor([[False, True, True], [True, False, True]], device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    try:
        with eval_mode(model):
            want = model(**batch, logits_to_keep=keep).logits
            h = head_hidden(model, model, batch, keep)
            got = F.linear(h, head.weight, head.bias)
    except (IndexError, RuntimeError, TypeError, ValueError):
        return False
    return close_enough(got, want, max(torch.finfo(want.dtype).eps, 1e-5))
