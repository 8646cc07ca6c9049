"""Different models by role: the server holds the full model, clients only the emulator + adapter.

* :func:`build_server` — the owner's side (the simulation's server half and the deployed
  ServerApp): loads the full model, cuts the plan, builds its own copy of the emulator (distilled
  once and cached, when configured), attaches the adapter (its initial values are round 1's
  message) and writes the emulator file under its content hash.
* :func:`build_client_model` — a client's side (the simulation's clients and every SuperNode):
  the emulator's skeleton from the run's config alone (the model's config is read, never its
  weights), the adapter on it; the weights arrive once from the server
  (:class:`~fedtune.offsite.transfer.ClientEmulator`).
* :func:`build_simulation` / :func:`deployed_server` / :func:`node_clients` — the three places a run is
  assembled (``fedtune.run``, ``fedtune.flower.server_app``, ``fedtune.flower.node``) call these.
* :class:`Roles` — what the run needs besides: how adapters are saved (an offsite adapter directory,
  see :func:`save_offsite_adapter`) and, in the simulation, the plug-in evaluation in the loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedtune.adapters import get_adapter_state, set_adapter_state
from fedtune.algorithms.base import GLOBAL, Algorithm
from fedtune.errors import FedtuneError
from fedtune.models.layout import Layout
from fedtune.offsite import emulator as E
from fedtune.offsite.files import save_offsite_adapter
from fedtune.offsite.plan import Plan
from fedtune.utils import derive_seed, safe_name

if TYPE_CHECKING:
    from fedtune.client import ClientRuntime
    from fedtune.config import Config
    from fedtune.offsite.distill import Realigner
    from fedtune.offsite.transfer import ClientEmulator
    from fedtune.state import ClientStateStore

log = logging.getLogger(__name__)

def check_offsite(cfg: Config) -> None:
    """What offsite tuning refuses, before anything is loaded (one clear error each)."""
    o = cfg.offsite
    if o.train == "lora" and cfg.peft.method != "lora":
        raise FedtuneError(f"offsite.train=lora puts LoRA on the adapter blocks, but peft.method={cfg.peft.method}; "
                           "set peft.method=lora (or offsite.train=full)")
    if o.train == "full" and cfg.model.dtype != "float32":
        raise FedtuneError(f"offsite.train=full trains whole blocks in fp32 inside the model; model.dtype="
                           f"{cfg.model.dtype} would mix dtypes in one forward: use model.dtype=float32 "
                           "(train.precision=bf16 still autocasts) or offsite.train=lora")
    if cfg.eval.tasks:
        raise FedtuneError(f"eval.tasks {cfg.eval.tasks} in the loop are not offered with offsite tuning yet; evaluate "
                           "both ways afterwards: fedtune eval RUN_DIR --tasks ... (emulator and plug-in targets)")
    if cfg.train.world_size > 1:
        raise FedtuneError("offsite tuning with train.world_size > 1 (clustered mode) is not supported yet")
    if o.realign.steps and cfg.fl.scenario == "local":
        raise FedtuneError("offsite.realign re-aligns the emulator to the global adapter; fl.scenario=local keeps "
                           "one adapter per client: set offsite.realign.steps=0 or fl.scenario=fed")


def _suffixes(cfg: Config, model_type: str) -> tuple[str, ...]:
    from fedtune.models import arch_info

    return tuple(cfg.peft.target_modules or arch_info(model_type).lora_targets)


# ---- the server --------------------------------------------------------------------------------
@dataclass
class OffsiteServer:
    cfg: Config
    full: torch.nn.Module
    tokenizer: Any
    plan: Plan
    layout: Layout
    emulator: torch.nn.Module  # the server's own emulator + adapter (evaluation, re-alignment)
    init: dict[str, torch.Tensor]
    path: Path  # the emulator file
    hash: str
    size: int
    device: torch.device
    distilled: bool = False
    realigner: Realigner | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def scaling(self) -> float | None:
        return E.lora_scaling(self.cfg) if self.cfg.offsite.train == "lora" else None

    def plugin(self, adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return E.plugin_values(self.full, adapter, self.plan, self.layout, self.scaling)

    def realign(self, rnd: int, adapter: dict[str, torch.Tensor]) -> dict[str, float]:
        @contextlib.contextmanager
        def plug():
            set_adapter_state(self.emulator, adapter)
            with E.plugged(self.full, self.plugin(adapter)):
                yield

        return self.realigner.run(rnd, plug)

    def describe(self) -> str:
        p, o = self.plan, self.cfg.offsite
        return (f"offsite: {p.num_layers} blocks -> adapter {p.bottom}+{p.top} ({o.train}), emulator keeps "
                f"{len(p.kept)} of {p.middle} middle blocks (drop {o.drop:g}{', distilled' if self.distilled else ''}"
                f"{', re-aligned every round' if o.realign.steps else ''}); emulator file {self.size / 2**20:.1f} MiB, "
                f"sha256 {self.hash[:12]}, sent once per client")


def _data_digest(ds) -> str:
    import hashlib

    h = hashlib.sha256()
    for ids, lab in zip(ds.input_ids, ds.labels):
        h.update(json.dumps([list(ids), list(lab)]).encode())
    return h.hexdigest()


def build_server(cfg: Config, device: torch.device, echo=log.info, tokenizer=None) -> OffsiteServer:
    """The owner's models (see the module docstring). Every bad input (architecture, plan, the
    public data) is refused from the config, tokenizer and data alone, before the weights load."""
    from fedtune.models import load_model, load_tokenizer
    from fedtune.offsite import distill as D

    check_offsite(cfg)
    o = cfg.offsite
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    E.plan_for(E.model_config(cfg.model, tok), cfg)
    distill_data = D.public_data(cfg, o.distill, tok, "distill") if o.distill.steps else None
    realign_data = D.public_data(cfg, o.realign, tok, "realign") if o.realign.steps else None
    full, tok = load_model(cfg.model)
    plan, layout = E.plan_for(full.config, cfg)
    E.blocks_of(full, layout)  # the table's path really is this model's block list
    full.to(device)
    em = E.build_skeleton(E.emulator_config(full.config, plan, layout), cfg.model.dtype, pad_id=tok.pad_token_id,
                          trust_remote_code=cfg.model.trust_remote_code, name=f"{cfg.model.name} (emulator)")
    E.load_weights(em, E.emulator_state(full, plan, layout))
    torch.manual_seed(derive_seed(cfg.seed, "adapter-init"))
    em = E.attach_offsite_adapter(em, cfg, plan, layout).to(device)
    init = get_adapter_state(em)
    info = {"model": cfg.model.name, "model_type": full.config.model_type, "train": o.train,
            "train_embeddings": o.train_embeddings}
    root = E.cache_root(cfg)
    distilled = False
    if o.distill.steps:
        key = E.content_hash(json.dumps({
            "weights": E.weights_digest(full), "plan": plan.to_dict(), "info": info, "seed": cfg.seed,
            "distill": o.distill.model_dump(mode="json"), "data": _data_digest(distill_data),
            "dtype": cfg.model.dtype, "peft": cfg.peft.model_dump(mode="json") if o.train == "lora" else None,
        }, sort_keys=True).encode())
        marker = root / f"distilled-{key}.json"
        cached = json.loads(marker.read_text()).get("hash") if marker.is_file() else None
        if cached and (root / f"{cached}.safetensors").is_file() and E.file_hash(root / f"{cached}.safetensors") == cached:
            E.load_weights(em, E.read_emulator(root / f"{cached}.safetensors", plan, E.frozen_spec(em)),
                           names=set(E.frozen_spec(em)))
            echo(f"offsite: distilled emulator from the cache ({cached[:12]}, key {key[:12]})")
        else:
            t0 = time.perf_counter()
            echo(f"offsite: distilling the emulator, {o.distill.steps} steps on {o.distill.source} "
                 f"({len(distill_data)} examples)")
            got = D.distill(em, full, plan, layout, distill_data, cfg, tok.pad_token_id, device, echo=echo)
            echo(f"offsite: distilled in {time.perf_counter() - t0:.1f}s (kd {got['distill_kd']:.4f}, "
                 f"lm {got['distill_lm']:.4f}); cached under key {key[:12]}")
            cached = None
        distilled = True
        info["distilled"] = True
    data = E.emulator_bytes(E.frozen_state(em), plan, info)
    path, h = E.store_emulator(data, root)
    if o.distill.steps and cached is None:
        from fedtune.utils import atomic_write_text

        atomic_write_text(marker, json.dumps({"hash": h}))
    srv = OffsiteServer(cfg=cfg, full=full, tokenizer=tok, plan=plan, layout=layout, emulator=em, init=init,
                        path=path, hash=h, size=len(data), device=device, distilled=distilled, info=info)
    del data
    if o.realign.steps:
        srv.realigner = D.Realigner(em, full, plan, layout, cfg, realign_data, tok.pad_token_id, device,
                                    _suffixes(cfg, full.config.model_type))
    return srv


# ---- a client ----------------------------------------------------------------------------------
def build_client_model(cfg: Config, tokenizer, device: torch.device, store_root: Path | None
                       ) -> tuple[torch.nn.Module, ClientEmulator]:
    """A client's emulator + adapter model (placeholder weights until the emulator arrives) and its
    view of the emulator store. Needs only the model's config, never the full model's weights."""
    from fedtune.offsite.distill import lowrank_spec, lowrank_targets
    from fedtune.offsite.transfer import ClientEmulator, EmulatorStore, chunk_bytes

    check_offsite(cfg)
    config = E.model_config(cfg.model, tokenizer)
    plan, layout = E.plan_for(config, cfg)
    skel = E.build_skeleton(E.emulator_config(config, plan, layout), cfg.model.dtype, pad_id=tokenizer.pad_token_id,
                            trust_remote_code=cfg.model.trust_remote_code, name=f"{cfg.model.name} (emulator)")
    E.blocks_of(skel, layout)
    torch.manual_seed(derive_seed(cfg.seed, "adapter-init"))
    model = E.attach_offsite_adapter(skel, cfg, plan, layout).to(device)
    lowrank = None
    if cfg.offsite.realign.steps:
        names = lowrank_targets(model, plan, layout, _suffixes(cfg, config.model_type))
        lowrank = lowrank_spec(model, names, cfg.offsite.realign.r)
    ce = ClientEmulator(EmulatorStore(store_root), plan, E.frozen_spec(model), chunk_bytes(cfg.offsite.chunk_mb), lowrank)
    return model, ce


def wrap(cfg: Config, inner: Algorithm, *, server: OffsiteServer | None = None,
         client: ClientEmulator | None = None) -> Algorithm:
    from fedtune.offsite.algorithm import Offsite
    from fedtune.offsite.transfer import chunk_bytes

    return Offsite(inner, server=server, client=client, realign=bool(cfg.offsite.realign.steps),
                   chunk_size=chunk_bytes(cfg.offsite.chunk_mb))


# ---- saving -----------------------------------------------------------------------------------
def adapter_meta(srv: OffsiteServer) -> dict[str, Any]:
    cfg, o = srv.cfg, srv.cfg.offsite
    lora = None
    if o.train == "lora":
        lora = {"r": cfg.peft.r, "alpha": cfg.peft.alpha, "dropout": cfg.peft.dropout,
                "target_modules": cfg.peft.target_modules}
    return {"format": 1, "plan": srv.plan.to_dict(), "train": o.train, "train_embeddings": o.train_embeddings,
            "lora": lora, "drop": o.drop, "base_model": cfg.model.name, "model_dtype": cfg.model.dtype,
            "emulator": {"hash": srv.hash, "file": str(srv.path.resolve()), "size": srv.size,
                         "distilled": srv.distilled},
            "realign": {"r": o.realign.r} if o.realign.steps else None, "seed": cfg.seed}


@dataclass
class Roles:
    """What a run needs from offsite tuning besides the models: the saver and, in the simulation,
    the plug-in evaluation in the loop."""

    srv: OffsiteServer
    clients: dict[str, Any] | None = None  # the simulation's FedClients (their held-out splits)
    eval_clients: list[str] = field(default_factory=list)

    def saver(self, run_dir: Path):
        from fedtune.data import get_template
        from fedtune.models import model_fingerprint, weight_probe

        srv, cfg = self.srv, self.srv.cfg
        template = get_template(cfg.data.template)
        adapter_json = {"base_model": cfg.model.name, "base_model_fingerprint": model_fingerprint(srv.full),
                        "base_model_probe": weight_probe(srv.full), "offsite": True}

        def save_adapters(rnd: int, current: dict[str, dict[str, torch.Tensor]], final: bool) -> None:
            roots = [run_dir / "checkpoints" / f"round_{rnd:05d}"] + ([run_dir] if final else [])
            meta = {**adapter_meta(srv), "round": rnd, "scenario": cfg.fl.scenario,
                    "config_fingerprint": cfg.fingerprint()}
            files = {"fedtune_template.json": json.dumps(template.to_dict(), indent=2),
                     "fedtune_adapter.json": json.dumps({**adapter_json, "round": rnd}, indent=2, sort_keys=True)}
            realign = srv.realigner.tensors() if srv.realigner is not None else None
            for root in roots:
                for key, sd in current.items():
                    dest = root / "adapter" if key == GLOBAL else root / "adapters" / safe_name(key)
                    save_offsite_adapter(dest, sd, meta, files, realign)

        return save_adapters

    def start(self, cfg: Config, echo):
        """Called once the run starts: says what was built; returns the in-loop evaluator or ``None``."""
        echo(self.srv.describe())
        if not (cfg.offsite.eval_plugin and self.clients is not None and cfg.eval.every >= 0):
            return None
        return PluginEvaluator(self.srv, self.clients, self.eval_clients, cfg)


class PluginEvaluator:
    """In the loop (simulation): the round's adapter(s) plugged into the full model
    (``plugin_<split>_loss``) and on the server's emulator (``emulator_<split>_loss``, the same model
    the clients hold: equal to the clients' ``<split>_loss``), on the eval clients' held-out splits;
    ``offsite_gap_<split>`` = emulator − plugin, the owner's protection (positive: the emulator alone
    is worse)."""

    def __init__(self, srv: OffsiteServer, clients: dict[str, Any], eval_clients: list[str], cfg: Config):
        self.srv, self.clients, self.eval_clients, self.cfg = srv, clients, eval_clients, cfg

    def due(self, rnd: int) -> bool:
        k = self.cfg.eval.every
        return rnd == self.cfg.fl.rounds or (k > 0 and rnd % k == 0) or (rnd == 0 and k > 0)

    def __call__(self, rnd: int, adapters: dict[str, dict[str, torch.Tensor]]):
        from fedtune.training import evaluate_loss

        if not self.due(rnd):
            return {}, {}
        t0 = time.perf_counter()
        srv, cfg = self.srv, self.cfg
        saved = get_adapter_state(srv.emulator)
        pooled: dict[str, list[float]] = {}
        per_client: dict[str, dict[str, float]] = {}
        try:
            for key, state in adapters.items():
                cids = self.eval_clients if key == GLOBAL else [key]
                set_adapter_state(srv.emulator, state)
                for which, ctx in (("emulator", contextlib.nullcontext(srv.emulator)),
                                   ("plugin", E.plugged(srv.full, srv.plugin(state)))):
                    with ctx as model:
                        for cid in cids:
                            for split in cfg.eval.splits:
                                data = self.clients[cid].splits.get(split)
                                if data is None or len(data) == 0:
                                    continue
                                s, n = evaluate_loss(model, data, batch_size=cfg.eval.batch_size,
                                                     pad_id=srv.tokenizer.pad_token_id, device=srv.device,
                                                     precision=cfg.train.precision)
                                acc = pooled.setdefault(f"{which}_{split}", [0.0, 0])
                                acc[0] += s
                                acc[1] += n
                                if n and key != GLOBAL:
                                    per_client.setdefault(cid, {})[f"{which}_{split}_loss"] = s / n
        finally:
            set_adapter_state(srv.emulator, saved)
        out: dict[str, Any] = {}
        for k, (s, n) in pooled.items():
            if n:
                out[f"{k}_loss"] = s / n
                out[f"{k}_ppl"] = math.exp(min(s / n, 50))
        for split in cfg.eval.splits:
            if f"emulator_{split}_loss" in out and f"plugin_{split}_loss" in out:
                out[f"offsite_gap_{split}"] = out[f"emulator_{split}_loss"] - out[f"plugin_{split}_loss"]
        out["plugin_eval_seconds"] = time.perf_counter() - t0
        return out, per_client


# ---- the three places a run is assembled ------------------------------------------------------
def build_simulation(cfg: Config, device: torch.device, store: ClientStateStore):
    """The simulation's ``_Built``: the server's full model and emulator, and the in-process clients
    on their own emulator model, filled only from the bytes the server sends them."""
    from fedtune.algorithms import build_algorithm
    from fedtune.client import ClientRuntime
    from fedtune.models import load_tokenizer
    from fedtune.run import AdapterModel, _Built, load_client_data, make_clients

    check_offsite(cfg)
    tokenizer = load_tokenizer(cfg.model)
    tok = load_client_data(cfg, tokenizer)  # the clients' data is checked before the models are built
    names = list(tok)
    srv = build_server(cfg, device, tokenizer=tokenizer)
    client_model, ce = build_client_model(cfg, tokenizer, device,
                                          store.root.parent / "emulator" if store.root is not None else None)
    algorithm = wrap(cfg, build_algorithm(cfg.fl), server=srv, client=ce)
    rt = ClientRuntime(model=client_model, pad_id=tokenizer.pad_token_id, cfg=cfg, device=device,
                       algorithm=algorithm, store=store)
    clients, train_clients = make_clients(cfg, rt, tok, srv.init)
    am = AdapterModel(model=srv.emulator, tokenizer=srv.tokenizer, init=srv.init, device=device)
    return _Built(am, rt, clients, names, train_clients, algorithm, roles=Roles(srv, clients, list(names)))


@dataclass
class Deployed:
    am: Any
    algorithm: Algorithm
    roles: Roles


def deployed_server(cfg: Config) -> Deployed:
    """The deployed ServerApp's side: the full model and the emulator file; no client data (so no
    plug-in evaluation in the loop: ``fedtune eval RUN_DIR`` scores both ways afterwards)."""
    from fedtune.algorithms import build_algorithm
    from fedtune.run import AdapterModel
    from fedtune.utils import resolve_device

    device = resolve_device(cfg.train.device)
    srv = build_server(cfg, device)
    am = AdapterModel(model=srv.emulator, tokenizer=srv.tokenizer, init=srv.init, device=device)
    return Deployed(am, wrap(cfg, build_algorithm(cfg.fl), server=srv), Roles(srv))


def node_clients(cfg: Config, device, store: ClientStateStore, spec, load_data) -> tuple[ClientRuntime, dict]:
    """A SuperNode's clients: the emulator skeleton (from the run's config) and this node's data. The
    emulator is kept in the node's state directory, so a restarted node does not fetch it again."""
    from fedtune.algorithms import build_algorithm
    from fedtune.client import ClientRuntime, FedClient
    from fedtune.models import load_tokenizer
    from fedtune.models.loading import cache_root

    check_offsite(cfg)
    tokenizer = load_tokenizer(cfg.model)
    tok = load_data(tokenizer)
    root = (Path(spec.state_dir) / "emulators" if spec.state_dir
            else cache_root() / "received-emulators" / safe_name(",".join(spec.cids)))
    model, ce = build_client_model(cfg, tokenizer, device, root)
    rt = ClientRuntime(model=model, pad_id=tokenizer.pad_token_id, cfg=cfg, device=device,
                       algorithm=wrap(cfg, build_algorithm(cfg.fl), client=ce), store=store)
    return rt, {cid: FedClient(cid, rt, **tok[cid]) for cid in spec.cids}
