#!/usr/bin/env python
"""Offsite tuning: what a client saves by training on the emulator instead of the full model.

Both arms are a FedOT client's local training as fedtune runs it (:func:`fedtune.training.train_local`
through the client's own model, built by :func:`fedtune.offsite.roles.build_client_model` and filled
from an emulator file, exactly as a client fills it from the bytes it receives), on SmolLM2-135M-
Instruct (30 blocks) with the adapter = the bottom 2 and top 2 blocks trained whole, AdamW, fp32,
batch 4, Fed-Dolly examples cut to 128 tokens:

* ``emulator``: the emulator at drop 0.5 (13 of the 26 middle blocks kept: 17 blocks in all);
* ``full``: the same client with drop 0 — the emulator is then the full model (30 blocks), the
  same adapter blocks trained: what the client would run if it were given the full model.

Step time: both models live in this process and their steps are interleaved (one step of each in
turn, the order alternating), so both see the same background load; the median step of each is
compared. Peak memory: each arm trains alone in a fresh subprocess, which reports its peak RSS
(``VmHWM``) and its RSS after the imports (the interpreter, torch and transformers, the same in
both); ``memory_ratio`` compares the peaks, ``memory_ratio_net`` the peaks less that baseline.
The one-time download is the emulator file's size (drop 0.5 and drop 0.2), next to the adapter
message a client receives every round.

Usage: ``python benchmarks/offsite.py [--quick]`` (``--quick``: 3 measured steps per arm, 64-token
examples). Progress on stderr; the last stdout line is JSON whose ``ratio`` is emulator / full
median step time (expected near 17/30 ≈ 0.57: the blocks a step runs through).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, CpuMonitor, data_dir, make_log  # benchmarks/_common.py

log = make_log("offsite")


def config(drop: float, max_length: int):
    from fedtune.config import load_config

    return load_config(None, ["model.name=smollm2-135m-instruct", "offsite.enabled=true", f"offsite.drop={drop}",
                              "offsite.bottom=2", "offsite.top=2", "offsite.train=full", "train.batch_size=4",
                              "train.lr=1e-4", "train.precision=fp32", f"data.max_length={max_length}",
                              "data.preset=fed-dolly", f"data.data_dir={data_dir()}"])


def examples(cfg, tokenizer, n: int):
    from fedtune.data import build_federated_data, tokenize_records

    dcfg = cfg.data.model_copy(update={"max_records_per_client": n // 8 + 2, "max_eval_records_per_client": 1})
    fed = build_federated_data(dcfg, 0)
    records = [r for c in fed.clients for r in c.train][:n]
    return tokenize_records(records, tokenizer, dcfg)


def client(cfg, tokenizer, emulator_file: Path):
    """A client's model exactly as a FedOT client builds it: the skeleton from the config, the
    weights from the emulator file, the adapter blocks (here: the full model's own) set."""
    import torch

    from fedtune.offsite import emulator as E
    from fedtune.offsite.roles import build_client_model

    model, ce = build_client_model(cfg, tokenizer, torch.device("cpu"), None)
    E.load_weights(model, E.read_emulator(emulator_file, ce.plan, ce.spec), names=set(ce.spec))
    return model, ce.plan


def trainer(model, ds, cfg, pad_id):
    import torch

    from fedtune.adapters import trainable_parameters
    from fedtune.training import BatchStream, make_optimizer, train_local

    opt = make_optimizer([p for _, p in trainable_parameters(model)], cfg.train)
    stream = BatchStream(ds.lengths, cfg.train.batch_size, 0, True)
    step = [0]

    def one() -> float:
        stats = train_local(model, ds, stream, opt, cfg.train, steps=1, start_step=step[0], total_steps=10**9,
                            pad_id=pad_id, device=torch.device("cpu"))
        step[0] += 1
        return stats.seconds

    return one


def child(args) -> None:
    """``--child DROP FILE``: train one arm alone and report memory (a fresh process per arm)."""
    from fedtune.models import load_tokenizer

    base_rss = _rss_now()
    cfg = config(args.drop, args.max_length)
    tok = load_tokenizer(cfg.model)
    model, _ = client(cfg, tok, Path(args.file))
    ds = examples(cfg, tok, 4 * (args.steps + 1))
    one = trainer(model, ds, cfg, tok.pad_token_id)
    times = [one() for _ in range(args.steps + 1)][1:]
    peak = _peak_rss()
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(base_rss, 1), "params": params,
                      "median_step_s": statistics.median(times)}))


def _peak_rss() -> float:
    """This process's own peak RSS (VmHWM, MiB). Not ``getrusage().ru_maxrss``: Linux keeps that
    across fork + exec, so a child of a 4 GB parent reports the parent's 4 GB whatever it does."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _rss_now() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--drop", type=float, default=0.5, help=argparse.SUPPRESS)
    ap.add_argument("--file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max-length", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = args.steps or (3 if args.quick else 10)
    max_length = args.max_length or (64 if args.quick else 128)
    if args.child:
        args.steps, args.max_length = steps, max_length
        return child(args)

    import torch

    from fedtune.adapters import get_adapter_state
    from fedtune.messages import Message, encode
    from fedtune.offsite.roles import build_server

    monitor = CpuMonitor()
    tmp = Path(tempfile.mkdtemp(prefix="fedtune-offsite-bench-"))
    servers, files = {}, {}
    for drop in (0.5, 0.0, 0.2):
        cfg = config(drop, max_length).model_copy(deep=True)
        cfg.offsite.cache_dir = str(tmp)
        t0 = time.perf_counter()
        srv = build_server(cfg, torch.device("cpu"))
        files[drop] = (srv.path, srv.size)
        log(f"drop {drop}: emulator {srv.size / 2**20:.1f} MiB ({len(srv.plan.kept)} of {srv.plan.middle} middle "
            f"blocks) in {time.perf_counter() - t0:.1f}s")
        servers[drop] = srv
        if drop == 0.5:
            adapter_bytes = len(encode(Message({f"adapter/{k}": v for k, v in get_adapter_state(srv.emulator).items()})))
        del srv
    servers.clear()

    # step time, interleaved in this process
    from fedtune.models import load_tokenizer

    cfg_e, cfg_f = config(0.5, max_length), config(0.0, max_length)
    tok = load_tokenizer(cfg_e.model)
    ds = examples(cfg_e, tok, 4 * (steps + 1) * 2)
    arms = {}
    for name, c, drop in (("emulator", cfg_e, 0.5), ("full", cfg_f, 0.0)):
        model, plan = client(c, tok, files[drop][0])
        arms[name] = {"step": trainer(model, ds, c, tok.pad_token_id), "times": [], "blocks": plan.emulator_layers,
                      "params": sum(p.numel() for p in model.parameters())}
    order = ["emulator", "full"]
    for i in range(steps + 1):
        for name in (order if i % 2 == 0 else order[::-1]):
            t = arms[name]["step"]()
            if i:  # the first step of each warms up
                arms[name]["times"].append(t)
        log(f"step {i}: " + ", ".join(f"{n} {arms[n]['times'][-1]:.2f}s" for n in order if arms[n]["times"]))
    med = {n: statistics.median(a["times"]) for n, a in arms.items()}
    del arms

    # peak memory, each arm alone in a fresh process
    mem = {}
    for name, drop in (("emulator", 0.5), ("full", 0.0)):
        out = subprocess.run([sys.executable, __file__, "--child", "--drop", str(drop), "--file", str(files[drop][0]),
                              "--steps", str(min(steps, 3)), "--max-length", str(max_length)],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
        if out.returncode != 0:
            raise SystemExit(f"child {name} failed: {out.stderr[-2000:]}")
        mem[name] = json.loads(out.stdout.strip().splitlines()[-1])
        log(f"{name}: peak RSS {mem[name]['peak_rss_mb']:.0f} MB (after imports {mem[name]['baseline_rss_mb']:.0f} MB)")
    net = {n: m["peak_rss_mb"] - m["baseline_rss_mb"] for n, m in mem.items()}
    for p, _ in files.values():
        p.unlink(missing_ok=True)
    result = {
        "benchmark": "offsite", "quick": args.quick, "model": "smollm2-135m-instruct", "adapter": "2+2 full blocks",
        "max_length": max_length, "batch_size": 4, "steps_measured": steps,
        "ratio": round(med["emulator"] / med["full"], 3),
        "step_s": {n: round(v, 3) for n, v in med.items()},
        "memory_ratio": round(mem["emulator"]["peak_rss_mb"] / mem["full"]["peak_rss_mb"], 3),
        "memory_ratio_net": round(net["emulator"] / net["full"], 3),
        "peak_rss_mb": {n: m["peak_rss_mb"] for n, m in mem.items()},
        "client_params": {n: m["params"] for n, m in mem.items()},
        # drop 0 keeps every middle block: what the client would download to hold the full model
        "emulator_bytes": {"drop_0.5": files[0.5][1], "drop_0.2": files[0.2][1], "drop_0.0": files[0.0][1]},
        "adapter_message_bytes": adapter_bytes,
        **monitor.result(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
