#!/usr/bin/env python
"""Training memory: peak RSS of a federated run round by round vs a bare peft loop.

Two arms, each in a fresh subprocess (so peaks never mix), on the quickstart's settings
(configs/quickstart.yaml: SmolLM2-135M-Instruct + LoRA r=8 on Fed-Dolly, batch 2, max_length 256,
``precision``/``model.dtype`` as that config says, resolved for this machine):

* ``fedtune``: :func:`fedtune.run.run` on the quickstart config for ``--rounds`` rounds (val loss
  every round, a checkpoint every round — the quickstart as shipped). Peak RSS is read after
  every round (``VmHWM``: the high-water mark of this process only).
* ``bare`` (baseline): the same model file loaded with ``transformers``, LoRA attached with
  ``peft.get_peft_model`` (same r, alpha, dropout, target modules), ``torch.optim.AdamW``, and
  HF's own loss (``model(input_ids, attention_mask, labels).loss``) — no fedtune code in the
  training loop. It trains batches of the same size from the same tokenised client data, collated
  the same way, *longest first*: a loop's peak is set by its largest batch (every buffer and the
  optimizer state exist after the first step), so the baseline meets the largest batch the
  federated run can meet — its worst case, not a lucky draw. ``--bare-steps`` of them (default
  12: the longest 24 examples are all cut at ``max_length`` here, so the peak is reached on the
  first step and the rest confirm it).

``ratio`` = fedtune's peak after the last round / bare peak (target <= 1.2); ``growth`` =
peak after the last round / peak after round 2 - 1 (target <= 2%).

Usage: ``python benchmarks/train_memory.py [--quick] [--rounds N] [--clients K]``; ``--quick``
is 4 rounds over 4 clients (growth then compares round 4 with round 2). Progress on stderr; the
last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, data_dir, make_log  # benchmarks/_common.py

log = make_log("train_memory")
CONFIG = REPO / "configs" / "quickstart.yaml"


def _overrides(args, out_dir: str) -> list[str]:
    return [f"data.data_dir={data_dir()}", f"fl.rounds={args.rounds}", f"data.num_clients={args.clients}",
            f"output.dir={out_dir}", "output.tensorboard=false"] + list(args.set or [])


def child_fedtune(args) -> dict:
    import psutil
    import torch

    import fedtune.training as ft
    from fedtune.config import load_config
    from fedtune.hardware import runtime_config
    from fedtune.metrics import peak_rss_mb
    from fedtune.run import run

    peaks: dict[int, float] = {}
    rss: dict[int, float] = {}
    longest: dict[int, int] = {}
    seen = [0]  # the largest training batch so far (tokens incl. padding): a new one may raise the peak
    real_collate = ft.collate

    def collate(*a, **kw):
        batch = real_collate(*a, **kw)
        if torch.is_grad_enabled():  # a training batch (evaluation runs under no_grad)
            seen[0] = max(seen[0], batch["input_ids"].numel())
        return batch

    def at_round_end(rnd, row):
        peaks[rnd], rss[rnd] = round(peak_rss_mb(), 1), round(psutil.Process().memory_info().rss / 2**20, 1)
        longest[rnd] = seen[0]

    ft.collate = collate  # observes the training batches; fedtune's code runs unchanged
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-mem-") as tmp:
        cfg = load_config(CONFIG, _overrides(args, str(Path(tmp) / "run")))
        t0 = time.perf_counter()
        res = run(cfg, verbose=False, on_round_end=at_round_end)
        rounds = [r for r in res.rows if r["kind"] == "round" and r["round"] > 0]
        rt = runtime_config(cfg, torch.device("cpu"))
        return {"peak_mb_by_round": peaks, "rss_mb_at_round_end": rss, "longest_batch_tokens_so_far": longest,
                "seconds": round(time.perf_counter() - t0, 1),
                "steps": sum(int(r.get("clients") or 0) for r in rounds) * cfg.train.local_steps,
                "val_loss_last": rounds[-1].get("val_loss"), "precision": rt.train.precision,
                "model_dtype": rt.model.dtype}


def child_bare(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from fedtune.config import load_config
    from fedtune.hardware import runtime_config
    from fedtune.metrics import peak_rss_mb
    from fedtune.models import (  # the model file and its module names only
        ARCHITECTURES,
        load_model,
    )
    from fedtune.run import load_client_data
    from fedtune.training import autocast_context, collate

    cfg = runtime_config(load_config(CONFIG, _overrides(args, "/nonexistent")), torch.device("cpu"))
    model, tok = load_model(cfg.model)
    model.set_attn_implementation("sdpa")  # transformers' own attention, not fedtune's CPU training one
    targets = cfg.peft.target_modules or ARCHITECTURES[model.config.model_type].lora_targets
    pm = get_peft_model(model, LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
                                          target_modules=targets, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=cfg.train.lr)
    data = load_client_data(cfg, tok)
    examples = [(ids, lab) for c in data.values() for ids, lab in zip(c["train"].input_ids, c["train"].labels)]
    examples.sort(key=lambda e: -len(e[0]))  # longest first: the largest batch the run can meet
    steps, bs = args.bare_steps, cfg.train.batch_size
    pm.train()
    t0 = time.perf_counter()
    for s in range(steps):
        chunk = examples[(s * bs) % len(examples):][:bs]
        batch = collate([e[0] for e in chunk], [e[1] for e in chunk], tok.pad_token_id, torch.device("cpu"))
        with autocast_context(cfg.train.precision, torch.device("cpu")):
            loss = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"peak_mb": round(peak_rss_mb(), 1), "seconds": round(time.perf_counter() - t0, 1), "steps": steps,
            "longest_batch_tokens": max(len(e[0]) for e in examples[:bs]) * bs,
            "precision": cfg.train.precision, "model_dtype": cfg.model.dtype}


def spawn(arm: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", arm, "--rounds", str(args.rounds), "--clients", str(args.clients),
           "--bare-steps", str(args.bare_steps)]
    for s in args.set or []:
        cmd += ["--set", s]
    log(f"arm {arm}: {' '.join(cmd[2:])}")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **dict(e.split("=", 1) for e in args.env or [])}
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if p.returncode != 0:
        raise SystemExit(f"arm {arm} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 rounds over 4 clients")
    ap.add_argument("--rounds", type=int, default=None, help="federated rounds (default 10; quick 4)")
    ap.add_argument("--clients", type=int, default=None, help="clients (default 8; quick 4)")
    ap.add_argument("--only-fedtune", action="store_true", help="skip the bare arm (growth experiments)")
    ap.add_argument("--bare-steps", type=int, default=12, help="steps of the bare loop, longest batches first")
    ap.add_argument("--set", action="append", help="extra config override for both arms (key=value)")
    ap.add_argument("--env", action="append", help="environment variable for both arms (KEY=VALUE), e.g. "
                    "MALLOC_MMAP_THRESHOLD_=131072")
    ap.add_argument("--child", choices=["fedtune", "bare"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.rounds = args.rounds or (4 if args.quick else 10)
    args.clients = args.clients or (4 if args.quick else 8)
    if args.child:
        out = (child_fedtune if args.child == "fedtune" else child_bare)(args)
        print(json.dumps(out), flush=True)
        return
    if args.rounds < 2:
        raise SystemExit("--rounds must be at least 2 (growth compares the last round with round 2)")
    t0 = time.perf_counter()
    bare = {"peak_mb": float("nan"), "steps": 0} if args.only_fedtune else spawn("bare", args)
    log(f"bare peft loop: peak {bare['peak_mb']:.0f} MB over {bare['steps']} steps")
    fed = spawn("fedtune", args)
    peaks = {int(k): v for k, v in fed["peak_mb_by_round"].items()}
    log("fedtune peak by round: " + ", ".join(f"{k}: {v:.0f}" for k, v in sorted(peaks.items())))
    last = peaks[max(peaks)]
    ratio, growth = last / bare["peak_mb"], last / peaks[2] - 1
    log(f"ratio {ratio:.3f}, growth round 2 -> {max(peaks)}: {growth:+.2%}")
    print(json.dumps({
        "benchmark": "train_memory", "quick": args.quick, "rounds": args.rounds, "clients": args.clients,
        "ratio": round(ratio, 4), "growth": round(growth, 4), "target": "ratio <= 1.2, growth <= 0.02",
        "meets_target": ratio <= 1.2 and growth <= 0.02, "bare": bare, "fedtune": fed,
        "settings": {"config": "configs/quickstart.yaml", "overrides": args.set or [], "env": args.env or [],
                     "machine": platform.machine(), "cpu_count": os.cpu_count()},
        "seconds_total": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
