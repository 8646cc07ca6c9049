"""Useful FLOPs of one LoRA training step on a decoder: what model FLOP utilisation counts.

Counted (multiply-adds as 2 FLOPs; norms, activations, softmax and the optimizer are left out —
under 1% here):

* every frozen linear of every block: forward ``2·L·in·out``; backward only the input gradient
  (``2·L·in·out``, the weights are frozen). In the first block q, k and v read the embedding
  itself: nothing before them trains, so their input needs no gradient, autograd does not
  compute it and neither do we count it (everything after them depends on a LoRA output);
* every LoRA pair (A: in→r, B: r→out): forward ``2·L·r·(in+out)``; backward the two weight
  gradients plus the input gradients (through B always, through A except where the frozen
  linear above needs none);
* attention: ``QKᵀ`` and ``AV``, ``2·L·L_k·head_dim`` each per head, where ``L_k`` is ``(L+1)/2``
  for causal attention (only the lower triangle is useful work) or ``L`` for ``attention="full"``
  (what a dense kernel computes, and what ``torch.utils.flop_counter`` counts); backward twice
  the forward (dS, dV, dQ, dK);
* the LM head (frozen, tied or not) on the positions where it runs: ``2·n·d·V`` forward and the
  same again for its input gradient.

Padding is never counted: ``L`` is each example's real length. Written here because no library
counts useful work this way (``torch.utils.flop_counter`` counts what ran, padding and dense
attention included — the tests use it, with eager attention, as the oracle for this formula).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: the linears of block 0 that read the (frozen) embedding itself: their input needs no gradient.
_EMBEDDING_READERS = ("q_proj", "k_proj", "v_proj")


def _block_linears(c) -> dict[str, tuple[int, int]]:
    d, inter = c.hidden_size, c.intermediate_size
    hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return {"q_proj": (d, q), "k_proj": (d, kv * hd), "v_proj": (d, kv * hd), "o_proj": (q, d),
            "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}


def step_flops(config, lengths: Sequence[int], head_positions: int, *, lora_r: int,
               lora_targets: Iterable[str], attention: str = "causal") -> dict[str, float]:
    """FLOPs of one forward + backward over examples of real ``lengths`` (Llama-family
    ``config``: hidden_size, intermediate_size, heads, kv heads, layers, vocab_size), with the LM
    head run on ``head_positions`` positions in all. Returns the parts and ``total``."""
    if attention not in ("causal", "full"):
        raise ValueError(f"attention must be causal or full, got {attention!r}")
    linears, targets = _block_linears(config), set(lora_targets)
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tokens = sum(lengths)
    base = lora = 0.0
    for layer in range(config.num_hidden_layers):
        for name, (i, o) in linears.items():
            needs_input_grad = not (layer == 0 and name in _EMBEDDING_READERS)
            base += 2 * tokens * i * o * (2 if needs_input_grad else 1)
            if name in targets:
                r = lora_r
                # forward A and B; backward: grad of A, grad of B, input grad through B (always),
                # through A (when the input needs a gradient)
                lora += 2 * tokens * r * (i + o) + 2 * tokens * r * (i + o) + 2 * tokens * r * o \
                    + (2 * tokens * r * i if needs_input_grad else 0)
    pairs = sum(L * ((L + 1) / 2 if attention == "causal" else L) for L in lengths)
    attn = config.num_hidden_layers * config.num_attention_heads * 2 * (2 * pairs * hd) * 3  # fwd + 2x bwd
    head = 2 * head_positions * config.hidden_size * config.vocab_size * 2
    return {"base": base, "lora": lora, "attention": attn, "lm_head": head, "total": base + lora + attn + head}
