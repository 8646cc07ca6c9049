#!/usr/bin/env python
"""Simulation overhead: one federated round through fedtune vs the same steps in a bare peft loop.

(a) ``fed``: a real federated round, built by :func:`fedtune.run.run` itself (model, data,
    adapter, ``FedClient``s, ``InProcessTransport``, ``Server``, disk client-state store, metrics
    logger): 8 Fed-Dolly clients x ``local_steps`` steps, batch 1, fp32, SmolLM2-135M + LoRA r=8,
    in-loop eval off, checkpoints only at the end (never reached while timing). To interleave the
    two paths, the benchmark hands ``run`` a ``Server`` subclass whose ``run()`` drives the rounds
    itself; everything else (construction, ``run_round``) is fedtune's own code.
(b) ``bare``: the same steps over the same examples in the same order (each client's own
    ``BatchStream`` order, clients in round order) in a plain loop: one PeftModel, one AdamW,
    ``forward -> backward -> clip_grad_norm_(1.0) -> step``; no federation, no adapter/optimizer
    swapping, no serialisation. By default the loop trains the clients' own PeftModel instance
    (its own adapter values are swapped in before and out after the timed loop), so both paths
    run on the same weights in the same memory; ``--bare-model separate`` uses a second copy of
    the model wrapped with peft directly (measured slower on this VM for identical work, which is
    why it is not the default). Clipping is kept because fedtune's config does it
    (``train.max_grad_norm=1.0``), and the loss is computed as fedtune computes it
    (:func:`fedtune.training.lm_loss`, the LM head only on labelled positions): both are training
    math, not simulation overhead.

Both paths are warmed up (one step per client, not timed), then alternate (fed/bare, bare/fed,
...) ``--repeats`` times; ``ratio`` is the median over repeats of fed_seconds / bare_seconds
(each fed round timed around ``Server.run_round``, which includes metric logging). The main fedtune
functions are wrapped with timers (microseconds per call, a few hundred calls per round) to show
where the difference goes; the other processes' CPU use is reported because the box is shared.

Usage: ``python benchmarks/sim_overhead.py [--quick]``; progress on stderr, one JSON object as the
last stdout line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _common import CpuMonitor, data_dir, make_log  # benchmarks/_common.py

log = make_log("sim_overhead")


# ---- timers around fedtune functions (breakdown only; not used by the bare loop) -------------
TIMES: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def _timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            TIMES[name] += time.perf_counter() - t0
            CALLS[name] += 1

    return wrapper


def install_timers() -> None:
    import fedtune.client as client
    import fedtune.state as state
    import fedtune.transport as transport
    from fedtune.algorithms.fedavg import FedAvg
    from fedtune.metrics import MetricsLogger

    for name in ("set_adapter_state", "get_adapter_state", "make_optimizer", "optimizer_from_state",
                 "optimizer_to_state", "train_local"):
        setattr(client, name, _timed(f"client.{name}", getattr(client, name)))
    client.FedClient.fit = _timed("client.FedClient.fit (total)", client.FedClient.fit)
    state.ClientStateStore.get = _timed("state.store.get (read+decode)", state.ClientStateStore.get)
    state.ClientStateStore.put = _timed("state.store.put (encode+write)", state.ClientStateStore.put)
    state.atomic_write_bytes = _timed("state.atomic_write_bytes (write+fsync)", state.atomic_write_bytes)
    transport.encode = _timed("transport.encode", transport.encode)
    transport.decode = _timed("transport.decode", transport.decode)
    for name in ("aggregate", "begin", "fold", "finish"):  # batch or streaming aggregation, whichever exists
        if hasattr(FedAvg, name):
            setattr(FedAvg, name, _timed(f"server.fedavg.{name}", getattr(FedAvg, name)))
    MetricsLogger.log = _timed("metrics.log", MetricsLogger.log)
    MetricsLogger.flush = _timed("metrics.flush", MetricsLogger.flush)


class Bench:
    def __init__(self, args):
        self.args = args
        self.result: dict = {}


def make_bench_server(bench: Bench):
    from fedtune.server import Server

    class BenchServer(Server):
        """fedtune's Server; only ``run`` is replaced, to interleave rounds with the bare loop."""

        def run(self, start_round: int = 1):
            try:
                return drive(self, bench)
            finally:
                self.logger.close()

    return BenchServer


def drive(server, bench: Bench) -> list:
    import peft
    import torch

    from fedtune.models import arch_info, load_model
    from fedtune.training import BatchStream, label_logits_supported, lm_loss
    from fedtune.utils import derive_seed

    args, cfg = bench.args, server.cfg
    steps = cfg.train.local_steps
    clients = server.transport.clients
    order = list(server.train_clients)  # clients_per_round is None: every client, in this order
    data = {cid: clients[cid].splits["train"] for cid in order}

    if args.bare_model == "shared":
        # The bare loop trains the very PeftModel the clients use (same weights in the same memory),
        # with its own AdamW and its own adapter values, swapped in and out outside the timed region.
        log("bare baseline: the same PeftModel instance, its own adapter values and AdamW")
        from fedtune.adapters import get_adapter_state, set_adapter_state

        bare = clients[order[0]].rt.model
        swap = {"own": get_adapter_state(bare)}
    else:
        log("bare baseline: a second SmolLM2 + the same LoRA config built with peft directly, one AdamW")
        base, _ = load_model(cfg.model)
        pc = cfg.peft
        lcfg = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=pc.r, lora_alpha=pc.alpha,
                               lora_dropout=pc.dropout, bias="none",
                               target_modules=pc.target_modules or list(arch_info(base.config.model_type).lora_targets))
        torch.manual_seed(0)
        bare = peft.get_peft_model(base, lcfg)
        swap = None
    bparams = [p for p in bare.parameters() if p.requires_grad]
    label_only = label_logits_supported(bare)
    bopt = torch.optim.AdamW(bparams, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    # The very same batch order as each FedClient: its BatchStream seed and resumed position.
    streams = {cid: BatchStream(data[cid].lengths, cfg.train.batch_size, derive_seed(cfg.seed, "data", cid),
                                cfg.train.group_by_length) for cid in order}

    def bare_pass(n_steps: int) -> tuple[float, int]:
        plan = [(cid, next(streams[cid])) for cid in order for _ in range(n_steps)]  # untimed index bookkeeping
        if swap is not None:
            swap["fed"] = get_adapter_state(bare)
            set_adapter_state(bare, swap["own"])
        bare.train()
        tokens = 0
        t0 = time.perf_counter()
        for cid, idx in plan:
            d = data[cid]
            ids = torch.tensor([d.input_ids[j] for j in idx])
            lab = torch.tensor([d.labels[j] for j in idx])
            loss = lm_loss(bare, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab},
                           label_only)
            bopt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(bparams, cfg.train.max_grad_norm)
            bopt.step()
            tokens += ids.numel()
        dt = time.perf_counter() - t0
        bopt.zero_grad(set_to_none=True)
        bare.eval()
        if swap is not None:
            swap["own"] = get_adapter_state(bare)
            set_adapter_state(bare, swap["fed"])
        return dt, tokens

    def fed_round(rnd: int) -> tuple[float, dict, dict]:
        TIMES.clear()
        CALLS.clear()
        t0 = time.perf_counter()
        row = server.run_round(rnd)
        dt = time.perf_counter() - t0
        return dt, row, {k: (round(v, 4), CALLS[k]) for k, v in sorted(TIMES.items())}

    log(f"warm-up (not timed): one round of 1 step per client ({len(order)} clients) on each path")
    cfg.train.local_steps = 1
    fed_round(1)
    cfg.train.local_steps = steps
    bare_pass(1)

    mon = CpuMonitor()
    reps = []
    for rep in range(args.repeats):
        rnd = rep + 2
        res = {}
        for path in (("fed", "bare") if rep % 2 == 0 else ("bare", "fed")):
            if path == "fed":
                dt, row, breakdown = fed_round(rnd)
                client_rows = [r for r in server.logger.rows if r.get("kind") == "client" and r.get("round") == rnd]
                train_s = sum(r["train_tokens"] / r["tokens_per_s"] for r in client_rows if r.get("tokens_per_s"))
                res.update(fed_s=dt, fed_row_seconds=row["seconds"], fed_train_local_s=train_s,
                           fed_tokens=row["train_tokens"], breakdown=breakdown,
                           fed_clients=row["clients"], fed_rejected=row["rejected"])
            else:
                dt, tokens = bare_pass(steps)
                res.update(bare_s=dt, bare_tokens=tokens)
        if res["fed_tokens"] != res["bare_tokens"]:
            raise SystemExit(f"paths trained on different tokens: fed {res['fed_tokens']}, bare {res['bare_tokens']}")
        res["ratio"] = res["fed_s"] / res["bare_s"]
        reps.append(res)
        log(f"repeat {rep + 1}/{args.repeats}: fed round {res['fed_s']:.2f} s (train_local {res['fed_train_local_s']:.2f} s),"
            f" bare loop {res['bare_s']:.2f} s, ratio {res['ratio']:.4f}, {res['bare_tokens']} tokens")
    bench.result = {"repeats": reps, "background_load": mon.result(), "clients": order, "steps": steps}
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    ap.add_argument("--steps", type=int, default=None, help="local steps per client (default 10; quick 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed fed/bare pairs (default 2)")
    ap.add_argument("--max-length", type=int, default=None, help="default 256; quick 128")
    ap.add_argument("--bare-model", choices=["shared", "separate"], default="shared",
                    help="bare loop on the clients' own PeftModel instance (default) or on a second copy")
    ap.add_argument("--no-timers", action="store_true", help="do not wrap fedtune functions with timers")
    args = ap.parse_args()
    args.steps = args.steps or (2 if args.quick else 10)
    args.repeats = args.repeats or 2
    args.max_length = args.max_length or (128 if args.quick else 256)
    t_start = time.perf_counter()

    import torch

    import fedtune.run as fr
    from fedtune.config import config_from_dict

    if not args.no_timers:
        install_timers()
    bench = Bench(args)
    records = 1 + args.steps * args.repeats + 1
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-") as tmp:
        cfg = config_from_dict({
            "seed": 0,
            "model": {"name": "smollm2-135m-instruct"},
            "data": {"preset": "fed-dolly", "data_dir": data_dir(), "max_length": args.max_length,
                     "max_records_per_client": max(16, records), "max_eval_records_per_client": 1},
            "peft": {"method": "lora", "r": 8},
            "train": {"local_steps": args.steps, "batch_size": 1, "precision": "fp32"},
            # rounds: warm-up + repeats + 1, so the last round (which always evaluates and
            # checkpoints) is never run while timing.
            "fl": {"rounds": args.repeats + 2},
            "eval": {"every": 0},
            "checkpoint": {"every": 0},
            "output": {"dir": str(Path(tmp) / "run"), "progress": False},
        })
        log(f"fedtune.run.run: SmolLM2 + LoRA r=8, fed-dolly (8 clients) x {args.steps} steps, batch 1, fp32, "
            f"max_length {args.max_length}, client_state={cfg.train.client_state}, torch {torch.get_num_threads()} threads")
        orig = fr.Server
        fr.Server = make_bench_server(bench)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                fr.run(cfg, verbose=False)
        finally:
            fr.Server = orig

    reps = bench.result["repeats"]
    ratio = statistics.median(r["ratio"] for r in reps)
    fed_med = statistics.median(r["fed_s"] for r in reps)
    bare_med = statistics.median(r["bare_s"] for r in reps)
    train_med = statistics.median(r["fed_train_local_s"] for r in reps)
    breakdown: dict[str, float] = defaultdict(float)
    for r in reps:
        for k, (v, _) in r["breakdown"].items():
            breakdown[k] += v / len(reps)
    load = bench.result["background_load"]
    contended = load["other_cpu_cores"] > 0.25
    if contended:
        log(f"WARNING: other processes used {load['other_cpu_cores']:.2f} cores on average while measuring")
    out = {
        "benchmark": "sim_overhead",
        "ratio": round(ratio, 4),
        "target": "<= 1.05",
        "meets_target": ratio <= 1.05,
        "quick": args.quick,
        "contended": contended,
        "fed_round_s_median": round(fed_med, 3),
        "bare_loop_s_median": round(bare_med, 3),
        "ratio_of_medians": round(fed_med / bare_med, 4),
        "fed_train_local_s_median": round(train_med, 3),
        "train_local_over_bare": round(train_med / bare_med, 4),
        "round_minus_train_local_s": round(fed_med - train_med, 3),
        "breakdown_mean_s_per_round": {k: round(v, 4) for k, v in sorted(breakdown.items(), key=lambda kv: -kv[1])},
        "repeats": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in reps],
        "background_load": load,
        "settings": {
            "model": "smollm2-135m-instruct", "peft": "lora r=8 alpha=16 dropout=0.05 (fedtune default targets)",
            "data": "fed-dolly preset (8 meta clients)", "clients": bench.result["clients"],
            "local_steps": args.steps, "batch_size": 1, "precision": "fp32", "max_length": args.max_length,
            "client_state": "disk", "eval_every": 0, "checkpoint_every": 0, "repeats": args.repeats,
            "bare_loop": "PeftModel + AdamW, forward/lm_loss/backward/clip(1.0)/step, same examples and order",
            "bare_model": args.bare_model,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
