#!/usr/bin/env python
"""Training attention: fedtune's CPU attention vs torch's SDPA, forward + backward, one layer.

The shape is one SmolLM2-135M attention layer at fedtune's training batch: batch 8, 9 query and 3
key/value heads of 64, bf16, a causal mask with right padding in half the rows (their last quarter
of keys), at lengths 96, 160, 256 and 384. Arms, interleaved repeat by repeat (a shared VM drifts):

* ``sdpa`` (baseline): ``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa`` —
  what transformers' SDPA attention runs (torch's CPU flash kernel, forward and backward);
* ``grouped``: :class:`fedtune.models.attention.GroupedAttention` (flash forward, fedtune's chunked
  backward), what fedtune trains with where one key/value head's scores fit ``MAX_SCORE_BYTES``;
* ``grouped_plain_exp``: the same with its backward's ``exp`` unfloored (``exp_`` on the raw
  ``S − lse``, masked entries ``-inf``): what :func:`fedtune.models.attention._probabilities` saves;
* ``folded``: :class:`fedtune.models.attention.FoldedFlashAttention` (torch's flash kernel forward
  and backward, each key/value head's query heads folded into its rows), what fedtune trains with
  on longer sequences.

Each arm's time is the median over ``--repeats`` of the mean of 10 calls (forward, then
``autograd.grad`` of a fixed output gradient). Usage: ``python benchmarks/attention.py
[--repeats N] [--lengths 96,160,256,384]``. Progress on stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from _common import make_log

log = make_log("attention")
B, H, KV, D = 8, 9, 3, 64


def _case(T: int):
    g = torch.Generator().manual_seed(T)

    def mk(*shape):
        return torch.randn(*shape, generator=g).bfloat16().requires_grad_()

    q, k, v = mk(B, H, T, D), mk(B, KV, T, D), mk(B, KV, T, D)
    keep = torch.ones(T, T, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
    keep[: B // 2, :, :, T * 3 // 4:] = False  # right padding: no query sees the last quarter
    do = torch.randn(B, H, T, D, generator=g).bfloat16()
    return q, k, v, keep, do


def _arms():
    """Each arm: one forward and backward of the layer."""
    from fedtune.models import attention

    def ours(q, k, v, keep, do):
        torch.autograd.grad(attention.GroupedAttention.apply(q, k, v, keep, D**-0.5), (q, k, v), do)

    def folded(q, k, v, keep, do):
        torch.autograd.grad(attention.FoldedFlashAttention.apply(q, k, v, keep, D**-0.5), (q, k, v), do)

    def plain_exp(q, k, v, keep, do):
        floored = attention._probabilities
        attention._probabilities = lambda x, bias, G: x.exp_()
        try:
            ours(q, k, v, keep, do)
        finally:
            attention._probabilities = floored

    def sdpa(q, k, v, keep, do):
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=D**-0.5, enable_gqa=True)
        torch.autograd.grad(o, (q, k, v), do)

    return {"sdpa": sdpa, "grouped": ours, "grouped_plain_exp": plain_exp, "folded": folded}


def _time(step, case, calls: int = 10) -> float:
    step(*case)  # warm
    t = time.perf_counter()
    for _ in range(calls):
        step(*case)
    return (time.perf_counter() - t) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--lengths", default="96,160,256,384")
    args = ap.parse_args()
    from fedtune.models.attention import _fits

    arms = _arms()
    out: dict = {"benchmark": "attention", "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "machine": platform.processor() or platform.machine(), "shape": [B, H, KV, D], "ms": {},
                 "fedtune_ships": {}}
    for T in (int(x) for x in args.lengths.split(",")):
        case = _case(T)
        times: dict[str, list[float]] = {name: [] for name in arms}
        for r in range(args.repeats):
            order = list(arms) if r % 2 == 0 else list(arms)[::-1]
            for name in order:
                times[name].append(_time(arms[name], case))
        med = {name: round(statistics.median(ts), 2) for name, ts in times.items()}
        out["ms"][str(T)] = med
        ships = "grouped" if _fits(case[0], case[1]) else "folded"
        out["fedtune_ships"][str(T)] = ships
        log(f"T={T}: " + ", ".join(f"{n} {t:.2f} ms" for n, t in med.items())
            + f"; fedtune trains with {ships}: / sdpa {med[ships] / med['sdpa']:.2f}; the floor saves "
            f"{1 - med['grouped'] / med['grouped_plain_exp']:.1%} of grouped")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
