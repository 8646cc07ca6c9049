"""Attention for training a 16-bit model on the CPU: grouped-query math with fp32 scores.

torch's CPU flash-attention kernel is fast in the forward pass, but its bf16 backward is slow: on a
2-core AMX Xeon one SmolLM2 layer (batch 8 x 160 tokens, 9 query and 3 key/value heads) took
17.6 ms in that backward against 1.6 ms forward (docs/benchmarks.md#train_throughput). Its forward,
and the row log-sum-exp it returns, are good: :class:`GroupedAttention` keeps them and does the
backward itself with batched matmuls, which run on the bf16 matrix units, and without a copy of the
keys and values per query head: each key/value head's query heads are stacked as one ``(G·T, d)``
matrix.

The backward recomputes ``P`` from the saved log-sum-exp (FlashAttention's recomputation, arXiv
2205.14135): ``S = Q Kᵀ · scale`` with fp32 inputs and output (as flash attention keeps its scores
in fp32: bf16 scores lose ~3 significant digits before ``exp``) plus the mask as a 0 / -inf fp32
bias, ``P = exp(S − lse)`` (its argument floored where ``exp`` would be slow:
:func:`_probabilities`), ``dV = Pᵀ dO``, ``dP = dO Vᵀ`` (fp32: ``dP − rowsum(P ∘ dP)``
cancels), ``dS = P ∘ (dP − δ) · scale``, ``dQ = dS K``, ``dK = dSᵀ Q``. Autocast is off inside
(under it, ``matmul`` would round the fp32 scores to bf16 — up to 16% error in the gradients of
large scores), and the key/value heads are taken a few at a time so that each thread's scores
(~1 MB) stay in its L2 cache through the ten-odd passes over them. Its error against a float64
reference is that of torch's bf16 flash kernel (tests/test_attention.py). In a SmolLM2 LoRA step
on a 2-core AVX512-BF16 EPYC it is 5% faster than SDPA (docs/benchmarks.md#train_throughput). No
library has this backward on the CPU, so it is written here.

It is registered with transformers as :data:`ATTENTION` and serves only the case it was measured
for — CPU, bf16/fp16, gradients on, no attention dropout, no soft-capping, sinks or position bias,
a boolean mask or none, and sequences short enough that one key/value head's fp32 scores fit
:data:`MAX_SCORE_BYTES` (the chunks stop fitting the cache beyond it: against SDPA, one SmolLM2
layer forward and backward read 0.95x at 192 tokens, 1.03x at 256, 1.08x at 384 and 1.24x at 512,
``benchmarks/attention.py``). Longer sequences of a grouped-query model go to
:class:`FoldedFlashAttention`: torch's flash kernel forward *and* backward, with each key/value
head's query heads folded into its rows — 0.81x SDPA at 256 tokens, 0.83x at 384, and a smaller
dK/dV error — up to :data:`MAX_FOLDED_BIAS_BYTES` of folded mask bias (G times the bias SDPA
builds). Everything else (fp32, inference, generation, GPUs, multi-head models' long sequences,
longer ones still) goes to transformers' own SDPA function unchanged. A packed row of a
padding-free batch (:mod:`fedtune.padding_free`) is first put back into its padded layout, so every
path above sees the batch it would have seen padded.
"""

from __future__ import annotations

import logging

import torch

from fedtune import padding_free

log = logging.getLogger(__name__)

#: the name fedtune registers with transformers' attention and mask interfaces.
ATTENTION = "fedtune_cpu_train"


class GroupedAttention(torch.autograd.Function):
    """``softmax(Q Kᵀ · scale + mask) V`` for ``q (B, H, T, d)``, ``k, v (B, KV, S, d)`` (``KV``
    divides ``H``; query head h reads key/value head ``h // (H / KV)``); ``keep`` is a boolean
    ``(B or 1, 1, T, S)`` mask, True where a query may attend (transformers' SDPA convention), or
    None for causal attention of the last ``T`` of ``S`` positions. Returns ``(B, H, T, d)``.
    A row with nothing to attend to gives zeros."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                scale: float) -> torch.Tensor:
        T, S = q.shape[2], k.shape[2]
        G = q.shape[1] // k.shape[1]  # query heads per key/value head
        with _no_autocast(q):
            bias = _mask_bias(keep, T, S, q.device)
            # torch's CPU flash kernel: fp32 scores in cache-sized blocks, and the row log-sum-exp
            # (0 for a row with nothing to attend to, whose output is 0)
            kh, vh = (k, v) if G == 1 else (k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, kh, vh, 0.0, False, attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, k, v, bias, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, bias, lse = ctx.saved_tensors
        (B, H, T, d), (KV, S) = q.shape, k.shape[1:3]
        G = H // KV
        with _no_autocast(q):
            qg, dog = q.reshape(B * KV, G * T, d), do.reshape(B * KV, G * T, d)  # a head's queries as rows
            k, v, lse = k.reshape(B * KV, S, d), v.reshape(B * KV, S, d), lse.reshape(B * KV, G * T, 1)
            dq, dk, dv = torch.empty_like(qg), torch.empty_like(k), torch.empty_like(v)
            for c in _chunks(B * KV, G * T * S):
                b = _bias_of(bias, KV, c)
                p = _probabilities(_scores(qg[c], k[c], ctx.scale, b, G).sub_(lse[c]), b, G)  # P again
                torch.matmul(p.to(v.dtype).transpose(-1, -2), dog[c], out=dv[c])
                dp = torch.matmul(dog[c].float(), v[c].float().transpose(-1, -2))
                delta = (dp * p).sum(dim=-1, keepdim=True)
                ds = p.mul_(dp.sub_(delta)).mul_(ctx.scale).to(qg.dtype)
                torch.matmul(ds, k[c], out=dq[c])
                torch.matmul(ds.transpose(-1, -2), qg[c], out=dk[c])
        return dq.view(B, KV, G, T, d).reshape(B, H, T, d), dk.view(B, KV, S, d), dv.view(B, KV, S, d), None, None


class FoldedFlashAttention(torch.autograd.Function):
    """:class:`GroupedAttention`'s contract, by torch's CPU flash kernel forward and backward, with
    the ``G`` query heads of each key/value head stacked as the rows of one ``(G·T, d)`` query
    (row ``g·T + t``), the mask's bias repeated over them: one head of ``G·T`` queries per
    key/value head, so no copy of the keys and values per query head and no sum of their
    gradients over the group (SDPA's ``enable_gqa`` does both), and the kernel works in larger
    blocks (it sizes them by the query length: 256 rows from 768 on, 64 below). For sequences past
    :data:`MAX_SCORE_BYTES`: one SmolLM2 layer forward and backward (batch 8, 9 query and 3
    key/value heads, right padding) 19.5 ms against SDPA's 24.0 at 256 tokens, 43.6 against 50.5
    at 384, dK/dV closer to float64 than SDPA's (0.018 / 0.029 against 0.035 / 0.084 at 256);
    at 192 tokens and below :class:`GroupedAttention` is as fast or faster (13.8 against 16.4 ms
    at 192 in one run, equal at 160 in another; the same in the step) and closer to float64 in
    dK/dV (2-core AVX512 EPYC, docs/benchmarks.md#train_throughput). The arithmetic is the flash
    kernel's own; only the layout is fedtune's."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                scale: float) -> torch.Tensor:
        (B, H, T, d), (KV, S) = q.shape, k.shape[1:3]
        G = H // KV
        with _no_autocast(q):
            bias = _folded_bias(keep, T, S, G, q.device)
            qf = q.reshape(B, KV, G * T, d)  # a key/value head's queries as rows
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qf, k, v, 0.0, False, attn_mask=bias, scale=scale)
        ctx.save_for_backward(qf, k, v, bias, o, lse)
        ctx.scale = scale
        return o.view(B, H, T, d)

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        qf, k, v, bias, o, lse = ctx.saved_tensors
        with _no_autocast(qf):
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                do.reshape(qf.shape), qf, k, v, o, lse, 0.0, False, attn_mask=bias, scale=ctx.scale)
        return dq.reshape(do.shape), dk, dv, None, None


#: fp32 scores one thread works on at a time: about what stays in a core's L2 cache
CHUNK_BYTES = 1 << 20
#: the largest fp32 scores of one key/value head (G·T·S·4 bytes) this attention takes; longer go to SDPA
MAX_SCORE_BYTES = 1 << 19
#: the largest folded mask bias (batch rows x G x T x S fp32, G times the bias SDPA builds) that
#: :class:`FoldedFlashAttention` takes; longer sequences go to SDPA (64 MiB: batch 8 of 1,024-token
#: sequences with 3 query heads a key/value head would need 96 MiB a forward)
MAX_FOLDED_BIAS_BYTES = 64 << 20


def _chunks(n: int, scores_per_unit: int) -> list[slice]:
    """Slices of the ``n`` key/value heads (over the batch) to process together: each thread gets
    about :data:`CHUNK_BYTES` of scores, so the ten-odd passes over them stay in cache."""
    per_thread = max(1, CHUNK_BYTES // (4 * scores_per_unit))
    step = per_thread * torch.get_num_threads()
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _no_autocast(t: torch.Tensor):
    """Autocast off on ``t``'s device: every dtype in here is chosen explicitly."""
    return torch.autocast(t.device.type, enabled=False)


_last_bias: tuple = ()  # (keep, its version, T, S, bias): every layer of a forward gets the same mask


def _mask_bias(keep: torch.Tensor | None, T: int, S: int, device) -> torch.Tensor:
    """``keep`` as an additive fp32 ``(B or 1, 1, T, S)`` bias: 0 where a query may attend, -inf
    elsewhere (one fp32 add per score; torch's reads of boolean tensors are not vectorised). The
    layers of one forward share one mask object, so they share its bias (built once, saved once)."""
    global _last_bias
    if keep is not None and _last_bias and _last_bias[0] is keep and _last_bias[1:4] == (keep._version, T, S):
        return _last_bias[4]
    mask = keep
    if mask is None:  # causal: query t (of the last T positions) sees keys up to S - T + t
        mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]
    mask = mask.expand(mask.shape[0], 1, T, S)
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(~mask, float("-inf"))
    if keep is not None:
        _last_bias = (keep, keep._version, T, S, bias)
    return bias


_last_folded: tuple = ()  # (the bias it was folded from, G, folded bias)


def _folded_bias(keep: torch.Tensor | None, T: int, S: int, G: int, device) -> torch.Tensor:
    """:func:`_mask_bias` with its ``T`` rows repeated for each of ``G`` query heads: ``(B or 1, 1,
    G·T, S)``, row ``g·T + t`` = row ``t`` (built once for the layers of a forward)."""
    global _last_folded
    bias = _mask_bias(keep, T, S, device)
    if _last_folded and _last_folded[0] is bias and _last_folded[1] == G:
        return _last_folded[2]
    folded = bias.expand(bias.shape[0], G, T, S).reshape(bias.shape[0], 1, G * T, S)
    _last_folded = (bias, G, folded)
    return folded


def _bias_of(bias: torch.Tensor, KV: int, c: slice) -> torch.Tensor:
    """The bias rows of the key/value heads in ``c`` (unit ``u`` is batch row ``u // KV``)."""
    if bias.shape[0] == 1:
        return bias
    return bias.index_select(0, torch.arange(c.start, c.stop, device=bias.device) // KV)


def _scores(qg: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor, G: int) -> torch.Tensor:
    """fp32 ``Q Kᵀ · scale`` plus the mask's bias, ``(n, G·T, S)`` (row ``g·T + t`` is query ``t``
    of the key/value head's ``g``-th query head)."""
    s = torch.matmul(qg.float(), k.float().transpose(-1, -2)).mul_(scale)
    n, GT, S = s.shape
    s.view(n, G, GT // G, S).add_(bias)
    return s


#: the floor of ``exp``'s argument in the backward: e^-87 ≈ 1.6e-38 is still a normal fp32 number
EXP_FLOOR = -87.0


def _probabilities(x: torch.Tensor, bias: torch.Tensor, G: int) -> torch.Tensor:
    """``exp(x)`` in place for ``x = S − lse`` of shape ``(n, G·T, S)``, masked entries exactly 0.

    torch's vectorised CPU ``exp`` is slow where its result underflows: 3x on ``-inf`` (the causal
    mask's half of the scores) and up to 15x on arguments below about -87 (2-core AVX512 EPYC,
    docs/benchmarks.md#train_throughput; ``torch.set_flush_denormal`` does not change it). So the
    argument is floored at :data:`EXP_FLOOR` and the masked entries are zeroed by the mask itself (a
    ``uint8`` product: vectorised, unlike a boolean one). A probability below e^-87 becomes e^-87, a
    change of at most 1.6e-38 absolute; every masked entry stays exactly 0, so keys no query may
    attend get exactly zero gradients. Hand-written: no library has this backward (module docstring)."""
    x.clamp_min_(EXP_FLOOR).exp_()
    n, GT, S = x.shape
    x.view(n, G, GT // G, S).mul_((bias == 0).view(torch.uint8))
    return x


def training_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: :class:`GroupedAttention` or
    :class:`FoldedFlashAttention` where each was measured to pay (module docstring), transformers'
    SDPA function everywhere else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = padding_free.current()
    if layout is not None and layout.holds(query, 2) and layout.holds(key, 2):
        return _repadded(layout, module, query, key, value, dropout, scaling, is_causal, kwargs)
    short = _fits(query, key)
    if not _eligible(query, key, attention_mask, dropout, kwargs) or not (short or _folds(query, key, attention_mask)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and not causal:
        attention_mask = torch.ones(1, 1, query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    kind = GroupedAttention if short else FoldedFlashAttention  # long grouped-query sequences: folded flash
    out = kind.apply(query, key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None  # (B, T, H, d), as transformers' functions return


def _repadded(layout: padding_free.Layout, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor, dropout: float, scaling: float | None, is_causal: bool | None, kwargs: dict):
    """A packed row's attention (:mod:`fedtune.padding_free`): its queries, keys and values
    ``(1, H, width, d)`` put back into the padded ``(B, H, T, d)`` layout, attended with the padded
    batch's own mask, the output ``(1, width, H, d)`` gathered from the real positions (and, for the
    row's fillers, from a pad position)."""
    q, k, v = (layout.pad(x[0].transpose(0, 1)).transpose(1, 2) for x in (query, key, value))
    out, _ = training_attention(module, q, k, v, layout.keep, dropout=dropout, scaling=scaling,
                                is_causal=is_causal, **kwargs)
    return layout.unpad(out)[None], None


def _folds(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """A grouped-query case whose folded mask bias (G·T·S fp32 per mask row) fits
    :data:`MAX_FOLDED_BIAS_BYTES` (:class:`FoldedFlashAttention`'s range)."""
    G = q.shape[1] // k.shape[1]
    rows = mask.shape[0] if mask is not None else 1
    return G > 1 and rows * G * q.shape[2] * k.shape[2] * 4 <= MAX_FOLDED_BIAS_BYTES


def _fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """One key/value head's fp32 scores fit :data:`MAX_SCORE_BYTES` (:class:`GroupedAttention`'s range)."""
    return q.shape[1] // k.shape[1] * q.shape[2] * k.shape[2] * 4 <= MAX_SCORE_BYTES


def _eligible(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, dropout: float, kwargs: dict) -> bool:
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad) and not dropout and q.shape[1] % k.shape[1] == 0
            and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1))
            and all(kwargs.get(x) is None for x in ("softcap", "s_aux", "position_bias"))
            and not kwargs.get("output_attentions", False))


def flash_forward_available() -> bool:
    """Whether this torch has the CPU flash-attention op the forward calls (a private aten op:
    present from torch 2.2 on; without it a model keeps transformers' SDPA)."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def register() -> None:
    """Make :data:`ATTENTION` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, training_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the same boolean masks SDPA gets


def use_training_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` (a transformers model that runs SDPA) to :data:`ATTENTION`; True if it did.
    Models on another implementation (eager, flash, a remote-code model without the attention
    interface) are left as they are."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    if not flash_forward_available():
        log.debug("this torch has no CPU flash-attention op; %s keeps SDPA attention", type(model).__name__)
        return False
    register()
    try:
        model.set_attn_implementation(ATTENTION)
    except (ValueError, NotImplementedError, TypeError, AttributeError) as e:
        log.debug("%s keeps SDPA attention: %s", type(model).__name__, e)
        return False
    return config._attn_implementation == ATTENTION
