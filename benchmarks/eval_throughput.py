#!/usr/bin/env python
"""Evaluation throughput: fedtune's batched engine vs one-prompt-at-a-time generation (FS-LLM).

Both arms generate greedy completions of the same HumanEval prompts with the same
SmolLM2-135M-Instruct weights and the same ``max_new_tokens``, and count generated tokens up to
and including the one that completes a stop sequence (or EOS, or the budget).

* ``ours``: :meth:`fedtune.eval.engine.Engine.generate` — prompts sorted by length, left-padded
  batches, KV cache, per-sequence stop criteria, finished rows dropped from the batch.
* ``one_at_a_time`` (baseline, FS-LLM's ``eval_for_code/humaneval.py`` loop): one
  ``model.generate(input_ids)`` call per prompt. FS-LLM generates to ``max_new_tokens`` and cuts
  at the stop sequences afterwards; the baseline here gets the same stop sequences *inside*
  generate (``stop_strings``), so it does no wasted work after a stop — in its favour.

The machine is shared and noisy, so the arms are interleaved: the prompts are processed in chunks
(one engine batch), and each chunk is run by both arms back to back, in alternating order. The
ratio is total generated tokens / total seconds of ours ÷ the same of the baseline; the median of
the per-chunk ratios is reported too, and the fraction of completions that are identical between
the arms (greedy decoding of the same model should agree, up to float noise from padding).

Usage: ``python benchmarks/eval_throughput.py [--quick] [--device cuda|cpu] [--dtype bfloat16]
[--model tiny-llama]``. The device defaults to CUDA when there is one, else the CPU; the JSON
records the device's real name (the GPU model, or the CPU model). Progress goes to stderr; the
last line of stdout is one JSON object with the headline ``ratio``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from _common import make_log  # benchmarks/_common.py

log = make_log("eval_throughput")


def device_name(dev) -> str:
    """What the numbers were measured on: the GPU's name, or the CPU's model name."""
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized: 8 prompts, 48 new tokens")
    ap.add_argument("--prompts", type=int, default=None, help="HumanEval prompts (default 32, quick 8)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 128, quick 48")
    ap.add_argument("--batch-size", type=int, default=None, help="engine batch = chunk size (default 16, quick 8)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="auto", help="cuda, cpu, cuda:1, ... (default: cuda if available, else cpu)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="weights' dtype (default float32)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's choice)")
    args = ap.parse_args()
    n_prompts = args.prompts or (8 if args.quick else 32)
    max_new = args.max_new_tokens or (48 if args.quick else 128)
    bs = args.batch_size or (8 if args.quick else 16)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from fedtune.config import ModelConfig
    from fedtune.eval.data import load_eval_source
    from fedtune.eval.engine import Engine, GenRequest, cut_at_stop
    from fedtune.eval.tasks.humaneval import STOP
    from fedtune.models import load_model
    from fedtune.utils import resolve_device

    dev = resolve_device(args.device)
    log(f"loading {args.model} ({args.dtype}) on {device_name(dev)}")
    model, tok = load_model(ModelConfig(name=args.model, dtype=args.dtype))
    model.to(dev)
    problems = load_eval_source("humaneval", None)[:n_prompts]
    reqs = [GenRequest(p["prompt"], max_new, STOP) for p in problems]
    engine = Engine(model, tok, device=dev, batch_size=bs, max_batch_tokens=1 << 30, progress=False)

    def sync() -> None:  # GPU work is asynchronous: wait for it before reading the clock
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def ours(chunk: list[GenRequest]) -> tuple[int, float, list[str]]:
        sync()
        t0 = time.perf_counter()
        gens = engine.generate(chunk)
        sync()
        return sum(g.num_tokens for g in gens), time.perf_counter() - t0, [g.text for g in gens]

    eos = tok.eos_token_id

    @torch.no_grad()
    def one_at_a_time(chunk: list[GenRequest]) -> tuple[int, float, list[str]]:
        sync()
        t0 = time.perf_counter()
        n, texts = 0, []
        for r in chunk:
            ids = tok(r.prompt, return_tensors="pt").to(dev)
            out = model.generate(**ids, max_new_tokens=r.max_new_tokens, do_sample=False, stop_strings=list(STOP),
                                 tokenizer=tok, pad_token_id=tok.pad_token_id)
            new = out[0, ids["input_ids"].shape[1]:].tolist()
            if eos in new:
                new = new[: new.index(eos) + 1]
            n += len(new)
            texts.append(cut_at_stop(tok.decode([t for t in new if t != eos], skip_special_tokens=True), STOP)[0])
        sync()
        return n, time.perf_counter() - t0, texts

    # warm-up (first calls allocate and compile kernels), not timed
    ours(reqs[:2])
    one_at_a_time(reqs[:1])

    totals = {"ours": [0, 0.0], "one_at_a_time": [0, 0.0]}
    chunk_ratios, same, outputs = [], 0, {}
    chunks = [reqs[i:i + bs] for i in range(0, len(reqs), bs)]
    for c, chunk in enumerate(chunks):
        arms = [("ours", ours), ("one_at_a_time", one_at_a_time)]
        if c % 2:
            arms.reverse()
        rates = {}
        for name, fn in arms:
            n, s, texts = fn(chunk)
            totals[name][0] += n
            totals[name][1] += s
            rates[name] = n / s
            outputs[name] = texts
        same += sum(a == b for a, b in zip(outputs["ours"], outputs["one_at_a_time"]))
        chunk_ratios.append(rates["ours"] / rates["one_at_a_time"])
        log(f"chunk {c + 1}/{len(chunks)}: ours {rates['ours']:.1f} tok/s, one-at-a-time "
            f"{rates['one_at_a_time']:.1f} tok/s, ratio {chunk_ratios[-1]:.2f}")
    tps = {k: v[0] / v[1] for k, v in totals.items()}
    result = {
        "benchmark": "eval_throughput",
        "ratio": round(tps["ours"] / tps["one_at_a_time"], 3),
        "median_chunk_ratio": round(statistics.median(chunk_ratios), 3),
        "ours_tokens_per_s": round(tps["ours"], 2),
        "one_at_a_time_tokens_per_s": round(tps["one_at_a_time"], 2),
        "ours_seconds": round(totals["ours"][1], 1),
        "one_at_a_time_seconds": round(totals["one_at_a_time"][1], 1),
        "generated_tokens": {k: v[0] for k, v in totals.items()},
        "identical_completions": f"{same}/{len(reqs)}",
        "prompts": len(reqs), "max_new_tokens": max_new, "batch_size": bs, "model": args.model,
        "device": device_name(dev), "device_type": dev.type, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "quick": args.quick,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
