"""Build a whole run from a :class:`~fedtune.config.Config` and execute it.

This is the only place that knows every part: config → data + model + adapter → clients,
transport, server → metrics, checkpoints, adapters, report.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from fedtune.adapters import attach_adapter, get_adapter_state, save_adapter
from fedtune.algorithms import Algorithm, Setup, build_algorithm
from fedtune.checkpoint import latest_checkpoint, load_checkpoint, restore_rng_state
from fedtune.client import ClientRuntime, FedClient
from fedtune.config import Config, config_from_dict, save_config
from fedtune.errors import FedtuneError
from fedtune.metrics import MetricsLogger
from fedtune.models import load_model
from fedtune.report import human_bytes, plot_losses, round_table, summary_table
from fedtune.server import GLOBAL, RoundHooks, Server, clients_per_round
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


@dataclass
class RunDir:
    """The run directory of one invocation: checked first, created only once the input is known to
    be good, and taken back if setting up the run fails before its first round.

    A fresh run that fails while being set up leaves nothing behind (not even ``runs/``, when it
    made it); a resumed run is never deleted. ``output.overwrite`` replaces an earlier run in
    ``output.dir``: it is renamed aside (atomic) and deleted once the new run is set up, or put back
    if that fails.
    """

    path: Path
    resume: bool
    replace: bool = False
    _created: Path | None = field(default=None, init=False)  # the topmost directory this invocation made
    _aside: Path | None = field(default=None, init=False)  # the run being replaced, until the new one is set up

    def create(self, cfg: Config) -> None:
        """Make the directory (fresh run) and save the resolved config in it."""
        if not self.resume:
            if self.replace:
                self._aside = self.path.with_name(f".{self.path.name}.replaced-{os.getpid()}")
                shutil.rmtree(self._aside, ignore_errors=True)
                os.replace(self.path, self._aside)
            top = self.path.absolute()
            while not top.parent.exists():
                top = top.parent
            self._created = top if not top.exists() else None
            self.path.mkdir(parents=True, exist_ok=True)
            # an earlier attempt that died before its first checkpoint may have left client state
            # here; it is not resumable, and a fresh run must not pick it up
            for old in (self.path / "state" / "clients").glob("*.safetensors"):
                old.unlink()
        save_config(cfg, self.path / "config.yaml")

    def commit(self) -> None:
        """The run is set up: drop the replaced run, nothing is taken back any more."""
        if self._aside is not None:
            shutil.rmtree(self._aside, ignore_errors=True)
        self._aside = self._created = None

    def rollback(self) -> None:
        """Setup failed: remove what this invocation created, put a replaced run back."""
        if self._created is not None:  # (a replaced run's directory is always new: it was moved aside)
            shutil.rmtree(self._created, ignore_errors=True)
        if self._aside is not None:
            os.replace(self._aside, self.path)
        self._aside = self._created = None

    @contextmanager
    def setting_up(self, cfg: Config):
        """``create`` now; ``rollback`` if the block raises, else ``commit``."""
        try:
            self.create(cfg)
            yield self.path
        except BaseException:
            self.rollback()
            raise
        self.commit()


def plan_run_dir(cfg: Config, resume: Path | None) -> RunDir:
    """Check where the run goes without writing anything (a resume: that it is the same run)."""
    if resume is not None:
        run_dir = Path(resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise FedtuneError(f"--resume {run_dir}: no config.yaml there; is it a fedtune run directory?")
        old = config_from_dict(yaml.safe_load(saved.read_text()))
        if old.fingerprint() != cfg.fingerprint():
            changes = [c for c in _diff(old.to_dict(), cfg.to_dict())
                       if not c.startswith(("output.", "fl.rounds", "deploy."))]
            raise FedtuneError(
                f"--resume {run_dir}: that run was made by a different config; differences:\n  "
                + "\n  ".join(changes[:10]) + "\nresume with the same config, or start a new run."
            )
        if latest_checkpoint(run_dir) is None:
            raise FedtuneError(f"--resume {run_dir}: no checkpoint there yet; start the run again instead")
        return RunDir(run_dir, resume=True)
    if not cfg.output.dir:
        return RunDir(Path("runs") / f"{cfg.output.name}-{time.strftime('%Y%m%d-%H%M%S')}", resume=False)
    run_dir = Path(cfg.output.dir)
    holds_run = (run_dir / "checkpoints").exists()
    if cfg.output.overwrite and (holds_run or (run_dir / "config.yaml").is_file()):
        if not (run_dir / "config.yaml").is_file():
            raise FedtuneError(f"output.overwrite: {run_dir} has checkpoints but no config.yaml; it is not "
                               "a fedtune run directory, so it is left alone; choose another output.dir")
        return RunDir(run_dir, resume=False, replace=True)
    if holds_run:
        raise FedtuneError(
            f"run directory {run_dir} already holds a run; use --resume {run_dir} to continue it, "
            "output.overwrite=true to replace it, or choose another output.dir"
        )
    return RunDir(run_dir, resume=False)


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


@dataclass
class AdapterModel:
    """The frozen base model with its adapter attached, and the adapter's initial tensors.

    Built identically by the simulation, the deployment's server (which needs it only for the
    adapter's shapes, initialisation and saving in PEFT format) and each deployed client.
    """

    model: torch.nn.Module  # PeftModel over the frozen base
    tokenizer: Any
    init: dict[str, torch.Tensor]
    device: torch.device


def build_adapter_model(cfg: Config, base=None, device: torch.device | None = None) -> AdapterModel:
    """Attach ``cfg.peft`` to the base model (``base``: an already loaded (model, tokenizer))."""
    device = device if device is not None else resolve_device(cfg.train.device)
    model, tokenizer = base if base is not None else load_model(cfg.model)
    torch.manual_seed(derive_seed(cfg.seed, "adapter-init"))
    pm = attach_adapter(model, cfg.peft, tokenizer).to(device)
    return AdapterModel(model=pm, tokenizer=tokenizer, init=get_adapter_state(pm), device=device)


def load_client_data(cfg: Config, tokenizer) -> dict[str, dict[str, Any]]:
    """Every client's tokenised train/val/test splits, in the splitter's client order."""
    from fedtune.data import build_federated_data

    fed = build_federated_data(cfg.data, cfg.seed)
    if len(fed.clients) < 1:
        raise FedtuneError("the data split produced no clients")
    return _tokenize_clients(fed, tokenizer, cfg, [c.name for c in fed.clients])


def adapter_saver(cfg: Config, am: AdapterModel, run_dir: Path):
    """``save_adapters(round, models, final)`` for :class:`~fedtune.server.Server`: PEFT-format
    adapters (with the prompt template) in the round's checkpoint and, at the end, the run dir."""
    from fedtune.data import get_template

    template = get_template(cfg.data.template)

    def save_adapters(rnd: int, current: dict[str, dict[str, torch.Tensor]], final: bool) -> None:
        roots = [run_dir / "checkpoints" / f"round_{rnd:05d}"] + ([run_dir] if final else [])
        extra = {"round": rnd, "template": template.to_dict(), "scenario": cfg.fl.scenario,
                 "config_fingerprint": cfg.fingerprint()}
        files = {"fedtune_template.json": json.dumps(template.to_dict(), indent=2)}  # inside the atomic rename
        for root in roots:
            for key, sd in current.items():
                dest = root / "adapter" if key == GLOBAL else root / "adapters" / safe_name(key)
                save_adapter(am.model, sd, dest, extra, files=files)

    return save_adapters


def algorithm_setup(cfg: Config, algorithm: Algorithm, clients: list[str], num_train: dict[str, int],
                    init: dict[str, torch.Tensor]) -> Setup:
    """Check the federation against the algorithm (before anything is written) and give the
    algorithm its round-0 server state; the same for the simulation and the deployment."""
    setup = Setup(clients=list(clients), num_train=dict(num_train), rounds=cfg.fl.rounds,
                  per_round=clients_per_round(cfg.fl.clients_per_round, len(clients)), adapter=dict(init))
    algorithm.check(setup)
    algorithm.init(setup)
    return setup


def resume_state(run_dir: Path, store: ClientStateStore, algorithm: Algorithm, echo) -> tuple[int, int, dict[str, Any]]:
    """Load the last checkpoint into ``algorithm`` and ``store``: (round it holds, first round to
    run, its metadata)."""
    ckpt = latest_checkpoint(run_dir)
    resume_round, server_state, meta = load_checkpoint(ckpt, store)
    if meta.get("algorithm", algorithm.name) != algorithm.name:
        raise FedtuneError(f"--resume {run_dir}: its checkpoint holds {meta['algorithm']}'s state, this run is "
                           f"{algorithm.name}")
    algorithm.load_state_dict(server_state, meta.get("algorithm_meta", {}))
    restore_rng_state(ckpt)  # last: nothing draws between here and the next round
    echo(f"resuming from {ckpt} (round {resume_round})")
    return resume_round, resume_round + 1, meta


def start_run(cfg: Config, resume: Path | str | None) -> Path:
    """Create (or check, when resuming) the run directory and save the resolved config there."""
    rd = plan_run_dir(cfg, Path(resume) if resume else None)
    rd.create(cfg)
    rd.commit()
    seed_everything(cfg.seed)
    return rd.path


def run(cfg: Config, resume: Path | str | None = None, *, verbose: bool = True) -> RunResult:
    """Run (or resume) the federated fine-tuning described by ``cfg``."""
    t_start = time.perf_counter()
    echo = (lambda s: print(s, flush=True)) if verbose else (lambda s: None)
    # Whatever can reject the input comes before anything is written: the device, the run
    # directory (checked only), then the model, the data and the eval tasks (in _build).
    device = rank_device(resolve_device(cfg.train.device, "train.device"), 0)
    rd = plan_run_dir(cfg, Path(resume) if resume else None)
    seed_everything(cfg.seed)

    cluster, followers, threads = None, [], torch.get_num_threads()
    if cfg.train.world_size > 1:  # clustered mode: start the followers first, they load in parallel
        addr, followers = start_followers(cfg, follower_main, (cfg.to_dict(),))
    try:
        # the disk store creates its directory on first use, so nothing is written yet
        b = _build(cfg, device, ClientStateStore(rd.path / "state" / "clients" if cfg.train.client_state == "disk"
                                                 else None))
        task_eval = _task_evaluator(cfg, b, echo)
        if followers:
            cluster = join_cluster(b.rt, 0, cfg, addr)
        with rd.setting_up(cfg):
            server, logger, start = _setup_server(cfg, b, rd.path, resume, echo, verbose, task_eval)
        server.run(start_round=start)
        return finish_run(cfg, logger, rd.path, len(b.train_clients), t_start, echo,
                          per_client=GLOBAL not in b.algorithm.adapters())
    finally:
        stop_cluster(cluster, followers, threads)


@dataclass
class _Built:
    """Everything a process needs to act as the clients (and, on the leader, to run the server)."""

    am: AdapterModel
    rt: ClientRuntime
    clients: dict[str, FedClient]
    names: list[str]
    train_clients: list[str]
    algorithm: Any
    #: offsite tuning (fedtune.offsite.roles.Roles): how adapters are saved, the plug-in evaluation
    roles: Any = None


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Clustered mode on GPUs: rank r uses GPU r (mod the GPUs present)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", rank % max(1, torch.cuda.device_count()))
    return device


def _build(cfg: Config, device: torch.device, store: ClientStateStore) -> _Built:
    if cfg.offsite.enabled:  # different models by role: the full model here, an emulator for the clients
        from fedtune.offsite.roles import build_simulation

        return build_simulation(cfg, device, store)
    base = load_model(cfg.model)
    tok = load_client_data(cfg, base[1])
    names = list(tok)
    am = build_adapter_model(cfg, base, device)
    algorithm = build_algorithm(cfg.fl)
    rt = ClientRuntime(model=am.model, pad_id=am.tokenizer.pad_token_id, cfg=cfg, device=am.device,
                       algorithm=algorithm, store=store)
    clients: dict[str, FedClient] = {n: FedClient(n, rt, **tok[n]) for n in names}
    if cfg.fl.scenario == "global":
        clients[GLOBAL] = FedClient(GLOBAL, rt, train=_pooled(tok))
        train_clients = [GLOBAL]
    else:
        train_clients = names
    algorithm_setup(cfg, algorithm, train_clients, {c: clients[c].num_train for c in train_clients}, am.init)
    return _Built(am, rt, clients, names, train_clients, algorithm)


def start_followers(cfg: Config, target, args: tuple, host: str = "127.0.0.1") -> tuple[str, list]:
    """Clustered mode, leader side: spawn ranks 1..world_size-1 on this machine, each running
    ``target(rank, world, addr, *args)`` (e.g. :func:`follower_main`). Returns the rendezvous address
    for :func:`join_cluster` and the processes. Splits this machine's CPU threads between the ranks."""
    from fedtune.distributed import free_port, spawn_followers, threads_per_rank

    addr = f"tcp://{host}:{free_port()}"
    procs = spawn_followers(cfg.train.world_size, target, (addr, *args))
    torch.set_num_threads(threads_per_rank(cfg.train.world_size))
    return addr, procs


def stop_cluster(cluster, followers: list, threads: int) -> None:
    """Leader side: release the followers (they exit) and restore the thread count."""
    if cluster is not None:
        cluster.stop()
    for p in followers:
        p.join(timeout=30)
        if p.is_alive():
            p.terminate()
    torch.set_num_threads(threads)


def join_cluster(rt: ClientRuntime, rank: int, cfg: Config, addr: str):
    """Join the client's process group as ``rank`` and wrap the shared model in DDP; sets
    ``rt.cluster``, after which ``FedClient.fit`` trains on all ranks (the leader dispatches)."""
    from fedtune.distributed import Cluster, DataParallel, backend_for, init_group

    init_group(rank, cfg.train.world_size, addr, backend_for(rt.device, cfg.train.dist_backend))
    rt.cluster = Cluster(rank, cfg.train.world_size, DataParallel(rt.model, rt.device))
    return rt.cluster


def follower_main(rank: int, world: int, addr: str, cfg_dict: dict, build=None, build_args: tuple = ()) -> None:
    """Entry point of a clustered-mode follower process (rank >= 1; see fedtune.distributed).

    ``build(cfg, device, store, *build_args) -> (runtime, clients)`` makes the same clients as the
    leader (a module-level function, so ``spawn`` can pass it); default: the simulation's."""
    from fedtune.distributed import follow, threads_per_rank

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads_per_rank(world))
    cfg = config_from_dict(cfg_dict)
    seed_everything(cfg.seed)
    device, store = rank_device(resolve_device(cfg.train.device), rank), ClientStateStore(None)
    if build is None:
        b = _build(cfg, device, store)
        rt, clients = b.rt, b.clients
    else:
        rt, clients = build(cfg, device, store, *build_args)
    follow(join_cluster(rt, rank, cfg, addr), clients, rt.store)


def _task_evaluator(cfg: Config, b: _Built, echo):
    """Benchmark tasks in the loop (``eval.tasks``, :mod:`fedtune.eval`) on the shared model; built
    (and the task names and options checked) before the run directory is made."""
    if b.roles is not None:  # offsite tuning: the plug-in model scored in the loop
        return b.roles.start(cfg, echo)
    if not cfg.eval.tasks:
        return None
    from fedtune.data import get_template
    from fedtune.eval.inloop import InLoopEvaluator

    return InLoopEvaluator(cfg, b.am.model, b.am.tokenizer, b.am.device, get_template(cfg.data.template), echo=echo)


def _setup_server(cfg: Config, b: _Built, run_dir: Path, resume, echo, verbose: bool, task_eval
                  ) -> tuple[Server, MetricsLogger, int]:
    """The server over the in-process clients, resumed from the last checkpoint when asked:
    (server, its metrics logger, first round to run)."""
    clients, names, train_clients, store = b.clients, b.names, b.train_clients, b.rt.store
    echo(f"fedtune: {cfg.model.name} + {cfg.peft.method}, {len(names)} clients "
         f"({cfg.fl.scenario}, {b.algorithm.name}), {cfg.fl.rounds} rounds"
         f"{f' on {cfg.train.world_size} processes per client' if cfg.train.world_size > 1 else ''} → {run_dir}")
    num_train = {cid: clients[cid].num_train for cid in train_clients}

    start = 1
    resume_round = None
    if resume:
        resume_round, start, _ = resume_state(run_dir, store, b.algorithm, echo)
    logger = MetricsLogger(run_dir, tensorboard=cfg.output.tensorboard, resume_round=resume_round)
    server = Server(cfg=cfg, algorithm=b.algorithm, transport=InProcessTransport(clients),
                    train_clients=train_clients, eval_clients=names, num_train=num_train,
                    store=store, logger=logger, run_dir=run_dir,
                    save_adapters=b.roles.saver(run_dir) if b.roles is not None else adapter_saver(cfg, b.am, run_dir),
                    hooks=console_hooks(cfg, echo, verbose), task_eval=task_eval)
    return server, logger, start


def finish_run(cfg: Config, logger: MetricsLogger, run_dir: Path, num_train_clients: int, t_start: float,
               echo, per_client: bool = False) -> RunResult:
    """Loss plot, summary table and the closing line of a run (``per_client``: the algorithm keeps
    one adapter per client, saved under ``adapters/``)."""
    rows = logger.rows
    plot = plot_losses(rows, run_dir / "losses.png")
    adapter_dir = run_dir / ("adapters" if per_client else "adapter")
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
    echo(f"done: {cfg.fl.rounds} rounds × {num_train_clients} clients ({cfg.fl.scenario}), {change}"
         f"{human_bytes(sent)} exchanged, {elapsed / 60:.1f} min")
    return result


def console_hooks(cfg: Config, echo, verbose: bool) -> RoundHooks:
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
            shown = "rejected" if r.message is None else f"{loss:.3f}" if loss is not None else "-"  # no label tokens
            b.set_postfix(client=r.cid, loss=shown)
            b.update(1)

    def end(rnd: int, row: dict[str, Any], client_rows: list[dict[str, Any]]) -> None:
        b = bar.pop("b", None)
        if b is not None:
            b.close()
        echo(round_table(rnd, row, client_rows))

    return RoundHooks(on_round_start=start, on_reply=reply, on_round_end=end)
