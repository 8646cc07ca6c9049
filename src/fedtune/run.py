"""Build a whole run from a :class:`~fedtune.config.Config` and execute it.

This is the only place that knows every part: config → data + model + adapter → clients,
transport, server → metrics, checkpoints, adapters, report.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from fedtune.adapters import attach_adapter, get_adapter_state, save_adapter
from fedtune.algorithms import get_algorithm
from fedtune.checkpoint import latest_checkpoint, load_checkpoint
from fedtune.client import ClientRuntime, FedClient
from fedtune.config import Config, config_from_dict, save_config
from fedtune.errors import FedtuneError
from fedtune.metrics import MetricsLogger
from fedtune.models import load_model
from fedtune.report import human_bytes, plot_losses, round_table, summary_table
from fedtune.server import GLOBAL, RoundHooks, Server
from fedtune.state import ClientStateStore
from fedtune.transport import InProcessTransport
from fedtune.utils import derive_seed, resolve_device, safe_name, seed_everything

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path
    rows: list[dict[str, Any]]

    def final(self, key: str) -> float | None:
        for r in reversed(self.rows):
            if r.get("kind") == "round" and r.get(key) is not None:
                return r[key]
        return None


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def _prepare_run_dir(cfg: Config, resume: Path | None) -> Path:
    if resume is not None:
        run_dir = Path(resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise FedtuneError(f"--resume {run_dir}: no config.yaml there; is it a fedtune run directory?")
        old = config_from_dict(yaml.safe_load(saved.read_text()))
        if old.fingerprint() != cfg.fingerprint():
            changes = [c for c in _diff(old.to_dict(), cfg.to_dict())
                       if not c.startswith(("output.", "fl.rounds"))]
            raise FedtuneError(
                f"--resume {run_dir}: that run was made by a different config; differences:\n  "
                + "\n  ".join(changes[:10]) + "\nresume with the same config, or start a new run."
            )
        if latest_checkpoint(run_dir) is None:
            raise FedtuneError(f"--resume {run_dir}: no checkpoint there yet; start the run again instead")
        return run_dir
    if cfg.output.dir:
        run_dir = Path(cfg.output.dir)
        if (run_dir / "checkpoints").exists():
            raise FedtuneError(
                f"run directory {run_dir} already holds a run; use --resume {run_dir} to continue it, "
                "or choose another output.dir"
            )
    else:
        run_dir = Path("runs") / f"{cfg.output.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _tokenize_clients(fed, tokenizer, cfg: Config, names: list[str]) -> dict[str, dict[str, Any]]:
    from fedtune.data import tokenize_records

    out: dict[str, dict[str, Any]] = {}
    dropped = truncated = 0
    for client in fed.clients:
        out[client.name] = {}
        for split in ("train", "val", "test"):
            ds = tokenize_records(getattr(client, split), tokenizer, cfg.data)
            out[client.name][split] = ds
            dropped += ds.num_dropped
            truncated += ds.num_truncated
        if len(out[client.name]["train"]) == 0:
            raise FedtuneError(f"client '{client.name}' has no training example left after tokenisation "
                               f"(data.max_length={cfg.data.max_length}, truncation={cfg.data.truncation})")
    if dropped or truncated:
        log.warning("tokenisation: %d examples truncated from the left, %d dropped (longer than "
                    "data.max_length=%d)", truncated, dropped, cfg.data.max_length)
    return out


def _pooled(tok: dict[str, dict[str, Any]]):
    """Concatenate every client's training set (the ``global`` scenario's single client)."""
    from fedtune.data import TokenizedDataset

    return TokenizedDataset.concat([v["train"] for v in tok.values()])


def run(cfg: Config, resume: Path | str | None = None, *, verbose: bool = True) -> RunResult:
    """Run (or resume) the federated fine-tuning described by ``cfg``."""
    t_start = time.perf_counter()
    run_dir = _prepare_run_dir(cfg, Path(resume) if resume else None)
    save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.seed)
    echo = (lambda s: print(s, flush=True)) if verbose else (lambda s: None)

    cluster, followers, threads = None, [], torch.get_num_threads()
    if cfg.train.world_size > 1:  # clustered mode: start the followers first, they load in parallel
        addr, followers = start_followers(cfg)
    try:
        b = _build(cfg, rank_device(resolve_device(cfg.train.device), 0),
                   ClientStateStore(run_dir / "state" / "clients" if cfg.train.client_state == "disk" else None))
        if followers:
            cluster = join_cluster(b.rt, 0, cfg, addr)
        return _run_server(cfg, b, run_dir, resume, echo, verbose, t_start)
    finally:
        if cluster is not None:
            cluster.stop()
        for p in followers:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        torch.set_num_threads(threads)


@dataclass
class _Built:
    """Everything a process needs to act as the clients (and, on the leader, to run the server)."""

    pm: Any
    rt: ClientRuntime
    clients: dict[str, FedClient]
    names: list[str]
    train_clients: list[str]
    init: dict[str, torch.Tensor]
    algorithm: Any


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Clustered mode on GPUs: rank r uses GPU r (mod the GPUs present)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", rank % max(1, torch.cuda.device_count()))
    return device


def _build(cfg: Config, device: torch.device, store: ClientStateStore) -> _Built:
    from fedtune.data import build_federated_data

    model, tokenizer = load_model(cfg.model)
    fed = build_federated_data(cfg.data, cfg.seed)
    if len(fed.clients) < 1:
        raise FedtuneError("the data split produced no clients")
    tok = _tokenize_clients(fed, tokenizer, cfg, [c.name for c in fed.clients])
    names = [c.name for c in fed.clients]
    torch.manual_seed(derive_seed(cfg.seed, "adapter-init"))
    pm = attach_adapter(model, cfg.peft, tokenizer).to(device)
    init = get_adapter_state(pm)
    algorithm = get_algorithm(cfg.fl.algorithm, weighting=cfg.fl.weighting)
    rt = ClientRuntime(model=pm, pad_id=tokenizer.pad_token_id, cfg=cfg, device=device,
                       algorithm=algorithm, store=store)
    clients: dict[str, FedClient] = {n: FedClient(n, rt, **tok[n]) for n in names}
    if cfg.fl.scenario == "global":
        clients[GLOBAL] = FedClient(GLOBAL, rt, train=_pooled(tok))
        train_clients = [GLOBAL]
    else:
        train_clients = names
    return _Built(pm, rt, clients, names, train_clients, init, algorithm)


def start_followers(cfg: Config, host: str = "127.0.0.1") -> tuple[str, list]:
    """Clustered mode, leader side: spawn ranks 1..world_size-1 on this machine, each building the
    model and clients from ``cfg`` (:func:`follower_main`). Returns the rendezvous address for
    :func:`join_cluster` and the processes. Splits this machine's CPU threads between the ranks."""
    from fedtune.distributed import free_port, spawn_followers, threads_per_rank

    addr = f"tcp://{host}:{free_port()}"
    procs = spawn_followers(cfg.train.world_size, follower_main, (addr, cfg.to_dict()))
    torch.set_num_threads(threads_per_rank(cfg.train.world_size))
    return addr, procs


def join_cluster(rt: ClientRuntime, rank: int, cfg: Config, addr: str):
    """Join the client's process group as ``rank`` and wrap the shared model in DDP; sets
    ``rt.cluster``, after which ``FedClient.fit`` trains on all ranks (the leader dispatches)."""
    from fedtune.distributed import Cluster, DataParallel, backend_for, init_group

    init_group(rank, cfg.train.world_size, addr, backend_for(rt.device, cfg.train.dist_backend))
    rt.cluster = Cluster(rank, cfg.train.world_size, DataParallel(rt.model, rt.device))
    return rt.cluster


def follower_main(rank: int, world: int, addr: str, cfg_dict: dict) -> None:
    """Entry point of a clustered-mode follower process (rank >= 1; see fedtune.distributed)."""
    from fedtune.distributed import follow, threads_per_rank

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads_per_rank(world))
    cfg = config_from_dict(cfg_dict)
    seed_everything(cfg.seed)
    b = _build(cfg, rank_device(resolve_device(cfg.train.device), rank), ClientStateStore(None))
    follow(join_cluster(b.rt, rank, cfg, addr), b.clients, b.rt.store)


def _run_server(cfg: Config, b: _Built, run_dir: Path, resume, echo, verbose: bool, t_start: float) -> RunResult:
    from fedtune.data import get_template

    pm, rt, clients, names, train_clients, init = b.pm, b.rt, b.clients, b.names, b.train_clients, b.init
    store, algorithm = rt.store, b.algorithm
    echo(f"fedtune: {cfg.model.name} + {cfg.peft.method}, {len(names)} clients "
         f"({cfg.fl.scenario}, {cfg.fl.algorithm}), {cfg.fl.rounds} rounds"
         f"{f' on {cfg.train.world_size} processes per client' if cfg.train.world_size > 1 else ''} → {run_dir}")
    num_train = {cid: clients[cid].num_train for cid in train_clients}
    models = {cid: dict(init) for cid in names} if cfg.fl.scenario == "local" else {GLOBAL: init}

    template = get_template(cfg.data.template)

    def save_adapters(rnd: int, current: dict[str, dict[str, torch.Tensor]], final: bool) -> None:
        roots = [run_dir / "checkpoints" / f"round_{rnd:05d}"] + ([run_dir] if final else [])
        extra = {"round": rnd, "template": template.to_dict(), "scenario": cfg.fl.scenario,
                 "config_fingerprint": cfg.fingerprint()}
        for root in roots:
            for key, sd in current.items():
                dest = root / "adapter" if key == GLOBAL else root / "adapters" / safe_name(key)
                save_adapter(pm, sd, dest, extra)
                (dest / "fedtune_template.json").write_text(json.dumps(template.to_dict(), indent=2))

    start = 1
    resume_round = None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        resume_round, models, _ = load_checkpoint(ckpt, store)
        start = resume_round + 1
        echo(f"resuming from {ckpt} (round {resume_round})")
    logger = MetricsLogger(run_dir, tensorboard=cfg.output.tensorboard, resume_round=resume_round)

    hooks = _console_hooks(cfg, echo, verbose)
    task_eval = None
    if cfg.eval.tasks:  # benchmark tasks in the loop, on the shared model (fedtune.eval)
        from fedtune.eval.inloop import InLoopEvaluator

        task_eval = InLoopEvaluator(cfg, pm, tokenizer, device, template, echo=echo)
    server = Server(cfg=cfg, algorithm=algorithm, transport=InProcessTransport(clients),
                    train_clients=train_clients, eval_clients=names, num_train=num_train, models=models,
                    store=store, logger=logger, run_dir=run_dir, save_adapters=save_adapters, hooks=hooks,
                    task_eval=task_eval)
    server.run(start_round=start)

    rows = logger.rows
    plot = plot_losses(rows, run_dir / "losses.png")
    adapter_dir = run_dir / ("adapter" if cfg.fl.scenario != "local" else "adapters")
    echo("\nsummary\n" + summary_table(rows))
    first = next((r for r in rows if r.get("kind") == "round" and r.get("val_loss") is not None), None)
    result = RunResult(run_dir=run_dir, adapter_dir=adapter_dir, rows=rows)
    last_val = result.final("val_loss")
    sent = sum((r.get("bytes_down") or 0) + (r.get("bytes_up") or 0) for r in rows if r.get("kind") == "round")
    elapsed = time.perf_counter() - t_start
    echo(f"\nadapter: {adapter_dir}")
    if plot:
        echo(f"loss curves: {plot}")
    change = ""
    if first is not None and last_val is not None:
        change = f"val loss {first['val_loss']:.4f} → {last_val:.4f} ({(last_val / first['val_loss'] - 1) * 100:+.1f}%), "
    echo(f"done: {cfg.fl.rounds} rounds × {len(train_clients)} clients ({cfg.fl.scenario}), {change}"
         f"{human_bytes(sent)} exchanged, {elapsed / 60:.1f} min")
    return result


def _console_hooks(cfg: Config, echo, verbose: bool) -> RoundHooks:
    if not verbose:
        return RoundHooks()
    from tqdm.auto import tqdm

    bar: dict[str, Any] = {}

    def start(rnd: int, sampled: list[str]) -> None:
        bar["b"] = tqdm(total=len(sampled), desc=f"round {rnd}/{cfg.fl.rounds}", unit="client",
                        leave=False, file=sys.stderr, disable=not cfg.output.progress)

    def reply(kind: str, r) -> None:
        b = bar.get("b")
        if b is not None and kind == "fit":
            loss = r.message.metrics.get("train_loss") if r.message else None
            b.set_postfix(client=r.cid, loss=f"{loss:.3f}" if loss is not None else "rejected")
            b.update(1)

    def end(rnd: int, row: dict[str, Any], client_rows: list[dict[str, Any]]) -> None:
        b = bar.pop("b", None)
        if b is not None:
            b.close()
        echo(round_table(rnd, row, client_rows))

    return RoundHooks(on_round_start=start, on_reply=reply, on_round_end=end)
