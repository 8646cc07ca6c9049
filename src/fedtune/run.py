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

from fedtune.adapters import attach_adapter, get_adapter_state, save_adapter
from fedtune.algorithms import Algorithm, Setup, build_algorithm
from fedtune.checkpoint import find_resumable_checkpoint, load_checkpoint, restore_rng_state
from fedtune.client import ClientRuntime, FedClient
from fedtune.config import Config, config_from_dict, load_saved_config, save_config
from fedtune.errors import FedtuneError
from fedtune.hardware import bound_kernel_caches, describe_precision, runtime_config
from fedtune.logs import attach_log_file
from fedtune.metrics import MetricsLogger
from fedtune.models import load_model
from fedtune.outcome import check_training_happened, disk_errors
from fedtune.report import human_bytes, plot_losses, round_table, summary_table
from fedtune.rundir_lock import RunDirLock
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

    The directory's lock (:mod:`fedtune.rundir_lock`) is held from the moment this invocation may
    change anything in it — from planning on for a directory that exists, from its creation for a
    new one — until :meth:`release`: a second writer is refused and touches nothing.
    """

    path: Path
    resume: bool
    replace: bool = False
    lock: RunDirLock | None = None
    _made: list[Path] = field(default_factory=list, init=False)  # directories this invocation made, top first
    _made_lock_file: bool = field(default=False, init=False)
    _made_config: bool = field(default=False, init=False)  # config.yaml is new (an existing directory)
    _aside: Path | None = field(default=None, init=False)  # the run being replaced, until the new one is set up
    _aside_lock: RunDirLock | None = field(default=None, init=False)

    def _owned(self) -> bool:
        return self.lock is not None and self.lock.held

    def _made_path(self) -> bool:
        return bool(self._made) and self._made[-1] == Path(os.path.abspath(self.path))

    def create(self, cfg: Config) -> None:
        """Make the directory (fresh run), lock it, and save the resolved config in it."""
        if not self.resume:
            if self.replace:  # planning locked the run being replaced: no live run is replaced
                self._aside = self.path.with_name(f".{self.path.name}.replaced-{os.getpid()}")
                shutil.rmtree(self._aside, ignore_errors=True)
                os.replace(self.path, self._aside)
                self._aside_lock, self.lock = self.lock, None
            if not self._owned():
                self._made = _make_dirs(self.path)
                self.lock = RunDirLock(self.path)
                self._made_lock_file = not self.lock.path.exists()
                self.lock.acquire()
                if not self._made_path() and (self.path / "checkpoints").exists():
                    # another run made this directory after we planned, and has finished by now
                    raise FedtuneError(f"run directory {self.path} already holds a run (made while this one "
                                       f"was being set up); use --resume {self.path} or another output.dir")
            # an earlier attempt that died before its first checkpoint may have left client state
            # here; it is not resumable, and a fresh run must not pick it up
            for old in (self.path / "state" / "clients").glob("*.safetensors"):
                old.unlink()
            self._made_config = not (self.path / "config.yaml").exists()
        save_config(cfg, self.path / "config.yaml")

    def commit(self) -> None:
        """The run is set up: drop the replaced run, nothing is taken back any more."""
        if self._aside is not None:
            shutil.rmtree(self._aside, ignore_errors=True)
        if self._aside_lock is not None:
            self._aside_lock.release()
        self._aside = self._aside_lock = None
        self._made, self._made_lock_file, self._made_config = [], False, False

    def rollback(self) -> None:
        """Setup failed: remove what this invocation created, put a replaced run back, unlock.

        Only what this invocation made, and only while it holds the lock: a directory that a
        concurrent run took over first is left to that run."""
        if self._owned() and not self.resume:
            if self._made_path():
                shutil.rmtree(self.path, ignore_errors=True)
            else:  # a directory that was there: take back the files this invocation added
                if self._made_config:
                    (self.path / "config.yaml").unlink(missing_ok=True)
                if self._made_lock_file:
                    self.lock.path.unlink(missing_ok=True)
            if self._aside is not None and not os.path.lexists(self.path):
                os.replace(self._aside, self.path)
                self._aside = None
        self.release()
        for d in reversed(self._made[:-1] if self._made_path() else self._made):
            try:
                d.rmdir()  # only when empty: a parent another run writes into stays
            except OSError:
                break
        self._made, self._made_lock_file, self._made_config = [], False, False

    def release(self) -> None:
        """Unlock the directory (idempotent; the end of a run, on any exit)."""
        for lk in (self.lock, self._aside_lock):
            if lk is not None:
                lk.release()
        self._aside_lock = None

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


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories this call made, topmost first (``path`` last when
    it made it). ``os.mkdir`` is atomic, so of two processes racing for a directory only one counts
    it as its own."""
    missing = []
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    made = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
            made.append(d)
        except FileExistsError:
            pass
    return made


def plan_run_dir(cfg: Config, resume: Path | None) -> RunDir:
    """Check where the run goes without writing anything but the lock file (a resume: that it is the
    same run, with an intact checkpoint). A directory that exists is locked here; the returned
    :class:`RunDir` must be released (``rollback``/``release``) whatever happens next."""
    from fedtune.preflight import check_output_location

    if resume is not None:
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise FedtuneError(f"--resume {run_dir}: no such directory")
        lock = RunDirLock(run_dir).acquire()  # before reading anything a live run may be writing
        try:
            return _plan_resume(cfg, run_dir, lock)
        except BaseException:
            lock.release()
            raise
    if not cfg.output.dir:
        run_dir = Path("runs") / f"{cfg.output.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_output_location(run_dir)
        return RunDir(run_dir, resume=False)
    run_dir = Path(cfg.output.dir)
    if not run_dir.is_dir():  # (a regular file there is refused by the check)
        check_output_location(run_dir)
        return RunDir(run_dir, resume=False)
    lock = RunDirLock(run_dir)
    made_lock_file = not lock.path.exists()
    lock.acquire()  # before anything else here: a live run in it is not even probed
    try:
        check_output_location(run_dir)
        holds_run = (run_dir / "checkpoints").exists()
        if cfg.output.overwrite and (holds_run or (run_dir / "config.yaml").is_file()):
            if not (run_dir / "config.yaml").is_file():
                raise FedtuneError(f"output.overwrite: {run_dir} has checkpoints but no config.yaml; it is not "
                                   "a fedtune run directory, so it is left alone; choose another output.dir")
            return RunDir(run_dir, resume=False, replace=True, lock=lock)
        if holds_run:
            raise FedtuneError(
                f"run directory {run_dir} already holds a run; use --resume {run_dir} to continue it, "
                "output.overwrite=true to replace it, or choose another output.dir"
            )
        rd = RunDir(run_dir, resume=False, lock=lock)
        rd._made_lock_file = made_lock_file
        return rd
    except BaseException:
        lock.release()
        if made_lock_file:
            lock.path.unlink(missing_ok=True)
        raise


def _plan_resume(cfg: Config, run_dir: Path, lock: RunDirLock) -> RunDir:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise FedtuneError(f"--resume {run_dir}: no config.yaml there; is it a fedtune run directory?")
    old = load_saved_config(saved)
    if old.fingerprint() != cfg.fingerprint():
        changes = [c for c in _diff(old.to_dict(), cfg.to_dict())
                   if not c.startswith(("output.", "fl.rounds", "deploy."))]
        raise FedtuneError(
            f"--resume {run_dir}: that run was made by a different config; differences:\n  "
            + "\n  ".join(changes[:10]) + "\nresume with the same config, or start a new run."
        )
    ckpt, notes = find_resumable_checkpoint(run_dir)
    if ckpt is None and not notes:
        raise FedtuneError(f"--resume {run_dir}: no checkpoint there yet; start the run again instead")
    if ckpt is None:
        raise FedtuneError(f"--resume {run_dir}: no intact checkpoint to resume from:\n  " + "\n  ".join(notes)
                           + "\nstart the run again (output.overwrite=true replaces this directory)")
    return RunDir(run_dir, resume=True, lock=lock)


def _tokenize_clients(fed, tokenizer, cfg: Config, names: list[str]) -> dict[str, dict[str, Any]]:
    from fedtune.data import tokenize_records

    out: dict[str, dict[str, Any]] = {}
    dropped = truncated = 0
    for client in fed.clients:
        out[client.name] = {}
        for split in ("train", "val", "test"):
            ds = tokenize_records(getattr(client, split), tokenizer, cfg.data, progress=cfg.output.progress,
                                  desc=f"tokenising {client.name[:40]} {split}")
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
    """Load the newest intact checkpoint into ``algorithm`` and ``store``: (round it holds, first
    round to run, its metadata).

    A damaged newest checkpoint (truncated, garbage ``latest``, a corrupt client state) is passed
    over for the newest intact one that ``checkpoint.keep`` retained, with a warning saying why."""
    ckpt, notes = find_resumable_checkpoint(run_dir)
    if ckpt is None:
        raise FedtuneError(f"--resume {run_dir}: no intact checkpoint to resume from:\n  "
                           + "\n  ".join(notes or ["there is none"]))
    for note in notes:
        log.warning("checkpoint passed over: %s", note)
        echo(f"warning: {note}")
    if notes:
        echo(f"warning: resuming from the older intact checkpoint {ckpt.name}; the rounds after it are run again")
    try:
        resume_round, server_state, meta = load_checkpoint(ckpt, store)
        if meta.get("algorithm", algorithm.name) != algorithm.name:
            raise FedtuneError(f"--resume {run_dir}: its checkpoint holds {meta['algorithm']}'s state, this run "
                               f"is {algorithm.name}")
        algorithm.load_state_dict(server_state, meta.get("algorithm_meta", {}))
        restore_rng_state(ckpt)  # last: nothing draws between here and the next round
    except FedtuneError:
        raise
    except Exception as e:  # noqa: BLE001 - verified above; what is left is damage inside the data
        raise FedtuneError(f"--resume {run_dir}: checkpoint {ckpt.name} cannot be loaded ({type(e).__name__}: "
                           f"{str(e)[:200]}); remove it (rm -r {ckpt}) to resume from an older one") from None
    echo(f"resuming from {ckpt} (round {resume_round})")
    return resume_round, resume_round + 1, meta


#: run directories locked by :func:`start_run`, until :func:`end_run`
_STARTED: dict[Path, RunDir] = {}


def start_run(cfg: Config, resume: Path | str | None) -> Path:
    """Create (or check, when resuming) the run directory, lock it and save the resolved config
    there; the lock is held until :func:`end_run` (or the process ends)."""
    rd = plan_run_dir(cfg, Path(resume) if resume else None)
    try:
        rd.create(cfg)
    except BaseException:
        rd.rollback()
        raise
    rd.commit()
    _STARTED[Path(os.path.abspath(rd.path))] = rd
    seed_everything(cfg.seed)
    return rd.path


def end_run(run_dir: Path) -> None:
    """Release the lock :func:`start_run` took on ``run_dir`` (idempotent)."""
    rd = _STARTED.pop(Path(os.path.abspath(run_dir)), None)
    if rd is not None:
        rd.release()


def run(cfg: Config, resume: Path | str | None = None, *, verbose: bool = True, base=None,
        on_round_end=None) -> RunResult:
    """Run (or resume) the federated fine-tuning described by ``cfg``.

    ``base``: an already loaded ``(model, tokenizer)`` of ``cfg.model`` to use instead of loading
    it (``fedtune hpo`` runs many trials on one); the run attaches its adapter to it and takes the
    adapter off again on every exit path, so the model is handed back as it was lent.
    ``on_round_end(round, row)``: called after each round's row is logged and its checkpoint (if
    due) written; whatever it raises (``optuna.TrialPruned``) ends the run there, with the metrics
    logger closed.
    """
    t_start = time.perf_counter()
    bound_kernel_caches()  # before the first matmul (a no-op once the CLI did it)
    echo = (lambda s: print(s, flush=True)) if verbose else (lambda s: None)
    # Whatever can reject the input comes before anything is written: the device, the run
    # directory (checked, and locked when it exists), then the model, the data and the eval tasks
    # (in _build), then the config against them (preflight_run).
    device = rank_device(resolve_device(cfg.train.device, "train.device"), 0)
    rd = plan_run_dir(cfg, Path(resume) if resume else None)  # locks an existing directory
    written, cfg = cfg, runtime_config(cfg, device)  # precision/dtype `auto` resolved for this device
    cluster, followers, threads, b = None, [], torch.get_num_threads(), None
    try:
        seed_everything(cfg.seed)
        if cfg.train.world_size > 1:  # clustered mode: start the followers first, they load in parallel
            addr, followers = start_followers(cfg, follower_main, (cfg.to_dict(),))
        # the disk store creates its directory on first use, so nothing is written yet
        b = _build(cfg, device, ClientStateStore(rd.path / "state" / "clients" if cfg.train.client_state == "disk"
                                                 else None), base=base)
        preflight_run(cfg, b, rd.path)
        task_eval = _task_evaluator(cfg, b, echo)
        if followers:
            cluster = join_cluster(b.rt, 0, cfg, addr)
        with rd.setting_up(written):
            server, logger, start = _setup_server(cfg, b, rd.path, resume, echo, verbose, task_eval)
        if "auto" in (written.train.precision, written.model.dtype):
            echo(f"precision: {describe_precision(written.train.precision, device)}, base weights {cfg.model.dtype}")
        if on_round_end is not None:  # after the console's own hook (the round table is printed first)
            server.hooks.on_round_end = _chain(server.hooks.on_round_end, lambda rnd, row, _: on_round_end(rnd, row))
        attach_log_file(rd.path / "run.log")  # library warnings so far and from now on (fedtune.logs)
        with disk_errors(rd.path):
            server.run(start_round=start)
            return finish_run(cfg, logger, rd.path, len(b.train_clients), t_start, echo,
                              per_client=GLOBAL not in b.algorithm.adapters())
    except BaseException:
        rd.rollback()  # a no-op once the run is set up (committed): only the lock is released
        raise
    finally:
        stop_cluster(cluster, followers, threads)
        rd.release()
        if base is not None and b is not None:
            from fedtune.adapters import detach_adapter

            detach_adapter(b.am.model)


def preflight_run(cfg: Config, b: _Built, run_dir: Path) -> None:
    """What can only be checked once the model and data are loaded, before the run directory is
    made: the config against the model and the federation, and the space a checkpoint needs."""
    from fedtune.preflight import check_federation, check_free_space, checkpoint_bytes

    check_federation(cfg, len(b.train_clients))
    check_free_space(run_dir, checkpoint_bytes(b.am.init, len(b.names), GLOBAL not in b.algorithm.adapters()))


def _chain(*hooks):
    """One round-end hook calling each of ``hooks`` (``None`` skipped) in order."""
    live = [h for h in hooks if h is not None]

    def call(*args):
        for h in live:
            h(*args)

    return call


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


def _build(cfg: Config, device: torch.device, store: ClientStateStore, base=None) -> _Built:
    from fedtune.preflight import check_against_model

    if cfg.offsite.enabled:  # different models by role: the full model here, an emulator for the clients
        from fedtune.offsite.roles import build_simulation

        if base is not None:
            raise FedtuneError("offsite runs load their own models (the full model and its emulator); "
                               "they cannot borrow a loaded base model (fedtune hpo over offsite runs is not "
                               "supported yet)")
        return build_simulation(cfg, device, store)
    base = base if base is not None else load_model(cfg.model)
    check_against_model(cfg, base[0])  # before the data: peft.r, data.max_length vs the model
    tok = load_client_data(cfg, base[1])
    names = list(tok)
    am = build_adapter_model(cfg, base, device)
    algorithm = build_algorithm(cfg.fl)
    rt = ClientRuntime(model=am.model, pad_id=am.tokenizer.pad_token_id, cfg=cfg, device=am.device,
                       algorithm=algorithm, store=store)
    clients, train_clients = make_clients(cfg, rt, tok, am.init)
    return _Built(am, rt, clients, names, train_clients, algorithm)


def make_clients(cfg: Config, rt: ClientRuntime, tok: dict, init) -> tuple[dict[str, FedClient], list[str]]:
    """The in-process clients (plus the pooled one of the ``global`` scenario) and the ones that
    train; the algorithm is set up with their sizes and the initial adapter ``init``."""
    names = list(tok)
    clients: dict[str, FedClient] = {n: FedClient(n, rt, **tok[n]) for n in names}
    if cfg.fl.scenario == "global":
        clients[GLOBAL] = FedClient(GLOBAL, rt, train=_pooled(tok))
        train_clients = [GLOBAL]
    else:
        train_clients = names
    algorithm_setup(cfg, rt.algorithm, train_clients, {c: clients[c].num_train for c in train_clients}, init)
    return clients, train_clients


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
    cfg = runtime_config(cfg, device)
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
    check_training_happened(rows, adapter_dir, echo)
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
