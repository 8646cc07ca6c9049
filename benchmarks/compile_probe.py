"""Probe: does ``torch.compile`` of a bf16 LoRA training step pay on this CPU?

SmolLM2-135M-Instruct on a bf16 base, LoRA r=8 (dropout 0.05) on fedtune's default targets,
AdamW, bf16 autocast, HF's loss on random token ids at batch 8:

* ``--mode eager``: 2 warm-up steps, then the median of 6 steps at length 160;
* ``--mode compile``: the same with ``torch.compile(step)`` (static shapes: every new padded length
  would compile again);
* ``--mode dynamic``: ``torch.compile(step, dynamic=True)``, then lengths 160, 144, 176, 160, 120 —
  each one's first step (compile or not) and the median of 3 more;
* ``--mode regional``: the step stays eager, each decoder layer is compiled (``layer.compile(dynamic=
  True)``: one graph for all the layers, the cheap-to-compile form), with inductor's
  ``fallback_random`` (dropout draws torch's own numbers), the KV cache off; lengths as ``dynamic``.

Not a fedtune feature yet: the figures in docs/benchmarks.md#train_throughput decide whether an
opt-in ``train.compile`` is worth building. Last line of stdout: one JSON object.
Usage: ``python benchmarks/compile_probe.py --mode eager|compile|dynamic|regional``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["eager", "compile", "dynamic", "regional"], required=True)
    args = ap.parse_args()
    from fedtune.adapters import attach_adapter, trainable_parameters
    from fedtune.config import ModelConfig, PeftConfig
    from fedtune.models import load_model

    torch.manual_seed(0)
    model, _ = load_model(ModelConfig(name="smollm2-135m-instruct", dtype="bfloat16"))
    pm = attach_adapter(model, PeftConfig(method="lora", r=8, dropout=0.05))
    opt = torch.optim.AdamW([p for _, p in trainable_parameters(pm)], lr=3e-4)

    def step(ids):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss

    f = {"eager": step, "compile": torch.compile(step), "dynamic": torch.compile(step, dynamic=True),
         "regional": step}[args.mode]
    if args.mode == "regional":
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
        pm.get_base_model().config.use_cache = False  # a cache object per call would recompile per layer
        for layer in pm.get_base_model().model.layers:
            layer.compile(dynamic=True)

    def timed(ids):
        t = time.perf_counter()
        f(ids)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    out: dict = {"benchmark": "compile_probe", "mode": args.mode, "batch": 8, "torch": torch.__version__}
    if args.mode in ("dynamic", "regional"):
        out["by_length"] = {}
        for T in (160, 144, 176, 160, 120):
            ids = torch.randint(0, 49152, (8, T))
            first = timed(ids)
            med = statistics.median(timed(ids) for _ in range(3))
            print(f"T {T}: first step {first:.1f} s, median {med:.3f} s", file=sys.stderr, flush=True)
            out["by_length"].setdefault(str(T), []).append({"first_s": round(first, 2), "median_s": round(med, 3)})
    else:
        ids = torch.randint(0, 49152, (8, 160))
        out["warmup_s"] = round(sum(timed(ids) for _ in range(2)), 1)
        out["median_step_s"] = round(statistics.median(timed(ids) for _ in range(6)), 3)
        out["tokens_per_s"] = round(8 * 160 / out["median_step_s"], 1)
        print(f"{args.mode}: warm-up {out['warmup_s']} s, median step {out['median_step_s']} s", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
