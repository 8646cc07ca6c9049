"""The Flower ServerApp: fedtune's :class:`~fedtune.server.Server` with a :class:`FlowerTransport`.

Built by the same builders as the simulation (:mod:`fedtune.run`): the server loads the model only
for the adapter's shapes, its initialisation and saving in PEFT format; it holds no data. The run
config (``fedtune-config``, JSON) and an optional ``resume`` run directory come in the Flower run
config that ``fedtune deploy submit`` sets. The run directory (``output.dir``) is on the SuperLink's
machine; ``server.log`` there mirrors what the simulation prints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.config import Config, config_from_dict
from fedtune.errors import FedtuneError
from fedtune.run import RunResult

app = ServerApp()


def run_deployed(cfg: Config, grid, resume: str | Path | None = None, *, verbose: bool = True) -> RunResult:
    """Run (or resume) ``cfg`` with the clients behind ``grid``."""
    from fedtune.algorithms import GLOBAL, build_algorithm
    from fedtune.flower.deploy import check_deployable
    from fedtune.flower.transport import FlowerTransport
    from fedtune.metrics import MetricsLogger
    from fedtune.outcome import RunFailed, disk_errors
    from fedtune.preflight import check_federation
    from fedtune.run import (adapter_saver, algorithm_setup, build_adapter_model, console_hooks, end_run, finish_run,
                             resume_state, start_run)
    from fedtune.server import Server
    from fedtune.state import ClientStateStore

    check_deployable(cfg)  # also checked by `fedtune deploy submit`; a plain `flwr run` gets here
    if cfg.deploy.clients:  # a fixed federation: checked before the run directory (else after discovery)
        check_federation(cfg, len(cfg.deploy.clients))
    t_start = time.perf_counter()
    run_dir = start_run(cfg, resume)  # locked until end_run: a second ServerApp on it is refused
    try:
        log_file = (run_dir / "server.log").open("a", encoding="utf-8")
    except BaseException:
        end_run(run_dir)
        raise

    def echo(s: str) -> None:
        if verbose:
            print(s, flush=True)
        log_file.write(s + "\n")
        log_file.flush()

    try:
        roles = None
        if cfg.offsite.enabled:  # offsite tuning: the full model stays here, clients get the emulator
            from fedtune.offsite.roles import deployed_server

            deployed = deployed_server(cfg)
            am, roles = deployed.am, deployed.roles
            echo(roles.srv.describe())
        else:
            am = build_adapter_model(cfg)
        transport = FlowerTransport(grid, cfg.deploy)
        echo(f"fedtune deploy: {cfg.model.name} + {cfg.peft.method}, waiting for SuperNodes "
             f"(up to {cfg.deploy.join_timeout_s:g}s) → {run_dir}")
        store = ClientStateStore(None)  # client state lives on the clients' machines
        algorithm = deployed.algorithm if roles is not None else build_algorithm(cfg.fl)
        clients = None
        if resume:
            # a resumed run goes on with the clients it had (whoever is connected right after a
            # SuperLink restart may be fewer: SuperNodes reconnect on their own schedule)
            clients = _checkpoint_clients(run_dir)
        cids, _ = transport.discover(clients)
        check_federation(cfg, len(cids))
        echo(f"clients: {', '.join(f'{c} (node {transport.node_of.get(c)}, {transport.num_train.get(c)} examples)' for c in cids)}")
        algorithm_setup(cfg, algorithm, cids, transport.num_train, am.init)
        start, resume_round = 1, None
        if resume:
            resume_round, start, _ = resume_state(run_dir, store, algorithm, echo)
        logger = MetricsLogger(run_dir, tensorboard=cfg.output.tensorboard, resume_round=resume_round)
        server = Server(cfg=cfg, algorithm=algorithm,
                        transport=transport, train_clients=cids, eval_clients=cids,
                        num_train=transport.num_train,  # the live map: a client joining later is weighted too
                        store=store, logger=logger, run_dir=run_dir,
                        save_adapters=roles.saver(run_dir) if roles is not None else adapter_saver(cfg, am, run_dir),
                        hooks=console_hooks(cfg, echo, verbose))
        with disk_errors(run_dir):
            server.run(start_round=start)
            # RunFailed: nothing was trained
            return finish_run(cfg, logger, run_dir, len(cids), t_start, echo,
                              per_client=GLOBAL not in algorithm.adapters())
    except RunFailed as e:
        echo(f"error: {e}")
        raise
    except FedtuneError as e:
        echo(f"error: {e}\nthe last checkpoint is kept; continue with: fedtune deploy submit ... --resume {run_dir}")
        raise
    finally:
        log_file.close()
        end_run(run_dir)


def _checkpoint_clients(run_dir: Path) -> list[str] | None:
    """The client ids a run's last checkpoint was made with."""
    import json as _json

    from safetensors import safe_open

    from fedtune.checkpoint import find_resumable_checkpoint

    ckpt, _ = find_resumable_checkpoint(run_dir)  # the one the resume will use (damaged ones skipped)
    if ckpt is None:
        return None
    with safe_open(str(ckpt / "server.safetensors"), framework="pt") as f:
        return _json.loads(f.metadata()["meta"]).get("clients")


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedtune.hardware import bound_kernel_caches

    bound_kernel_caches()  # before this process's first matmul (fedtune.hardware)
    cfg = config_from_dict(json.loads(str(context.run_config["fedtune-config"])))
    resume = str(context.run_config.get("resume", "")) or None
    run_deployed(cfg, grid, resume)
