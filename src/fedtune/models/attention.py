"""Attention for training a 16-bit model on the CPU: grouped-query math with fp32 scores.

torch's CPU flash-attention kernel is fast in fp32 and in the forward pass, but its bf16 backward is
slow: on a 2-core AMX Xeon one SmolLM2 layer (batch 8 x 160 tokens, 9 query and 3 key/value heads)
took 17.6 ms in that backward against 1.6 ms forward — 0.57 s of a 3.5 s LoRA step
(docs/benchmarks.md#train_throughput). Over short sequences plain batched matmuls do better: they
run on the AMX tiles, and grouped-query attention needs no copy of the keys and values per query
head if each key/value head's query heads are stacked as one ``(G·T, d)`` matrix.

:class:`GroupedAttention` computes, per key/value head, ``S = Q Kᵀ · scale`` with fp32 inputs and
output (as flash attention keeps its scores in fp32: bf16 scores lose ~3 significant digits before
``exp``), masks, takes the softmax in fp32, multiplies ``P V`` in the 16-bit dtype, and keeps only
the row log-sum-exp for the backward, where ``P`` is recomputed (FlashAttention's recomputation,
arXiv 2205.14135): ``dV = Pᵀ dO``, ``dP = dO Vᵀ`` (fp32: ``dP − rowsum(P ∘ dP)`` cancels),
``dS = P ∘ (dP − δ) · scale``, ``dQ = dS K``, ``dK = dSᵀ Q``. Its error against a float64 reference
is that of torch's bf16 flash kernel (tests/test_attention.py). No library has a faster CPU
training path for this, so it is written here.

It is registered with transformers as :data:`ATTENTION` and serves only the case it was measured
for — CPU, bf16/fp16, gradients on, no attention dropout, no soft-capping, sinks or position bias,
a boolean mask or none; everything else (fp32, inference, generation, GPUs) goes to transformers'
own SDPA function unchanged.
"""

from __future__ import annotations

import logging

import torch

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
        B, H, T, d = q.shape
        KV, S = k.shape[1], k.shape[2]
        G = H // KV
        qg = q.reshape(B, KV, G * T, d)  # query heads of one key/value head stacked as rows
        keep = _grouped_mask(keep, G, T, S, q.device)
        s = _scores(qg, k, scale, keep)
        m = s.amax(dim=-1, keepdim=True).nan_to_num_(neginf=0.0)  # a fully masked row: max 0, sum 0
        p = s.sub_(m).exp_()
        z = p.sum(dim=-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
        lse = z.log().add_(m)
        o = torch.matmul(p.div_(z).to(v.dtype), v)
        ctx.save_for_backward(qg, k, v, keep, lse)
        ctx.scale, ctx.shape = scale, (B, H, T, d)
        return o.view(B, KV, G, T, d).reshape(B, H, T, d)

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        qg, k, v, keep, lse = ctx.saved_tensors
        B, H, T, d = ctx.shape
        KV = k.shape[1]
        dog = do.reshape(B, KV, (H // KV) * T, d)
        p = _scores(qg, k, ctx.scale, keep).sub_(lse).exp_()  # P again, from the saved log-sum-exp
        dv = torch.matmul(p.to(v.dtype).transpose(-1, -2), dog)
        dp = torch.matmul(dog.float(), v.float().transpose(-1, -2))
        delta = (dp * p).sum(dim=-1, keepdim=True)
        ds = p.mul_(dp.sub_(delta)).mul_(ctx.scale).to(qg.dtype)
        dq = torch.matmul(ds, k).view(B, KV, H // KV, T, d).reshape(B, H, T, d)
        dk = torch.matmul(ds.transpose(-1, -2), qg)
        return dq, dk, dv, None, None


def _grouped_mask(keep: torch.Tensor | None, G: int, T: int, S: int, device) -> torch.Tensor:
    """``keep`` as ``(B or 1, 1, G·T, S)``: row ``g·T + t`` is query position ``t``."""
    if keep is None:  # causal: query t (of the last T positions) sees keys up to S - T + t
        keep = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]
    b = keep.shape[0]
    return keep.expand(b, 1, T, S)[:, :, None].expand(b, 1, G, T, S).reshape(b, 1, G * T, S)


def _scores(qg: torch.Tensor, k: torch.Tensor, scale: float, keep: torch.Tensor) -> torch.Tensor:
    """fp32 ``Q Kᵀ · scale`` with masked entries at -inf."""
    s = torch.matmul(qg.float(), k.float().transpose(-1, -2)).mul_(scale)
    return s.masked_fill_(~keep, float("-inf"))


def training_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: :class:`GroupedAttention` where it was measured
    to pay (module docstring), transformers' SDPA function everywhere else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _serves(query, key, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and not causal:
        attention_mask = torch.ones(1, 1, query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = GroupedAttention.apply(query, key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None  # (B, T, H, d), as transformers' functions return


def _serves(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, dropout: float, kwargs: dict) -> bool:
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad) and not dropout and q.shape[1] % k.shape[1] == 0
            and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1))
            and all(kwargs.get(x) is None for x in ("softcap", "s_aux", "position_bias"))
            and not kwargs.get("output_attentions", False))


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
    register()
    try:
        model.set_attn_implementation(ATTENTION)
    except (ValueError, NotImplementedError, TypeError, AttributeError) as e:
        log.debug("%s keeps SDPA attention: %s", type(model).__name__, e)
        return False
    return config._attn_implementation == ATTENTION
