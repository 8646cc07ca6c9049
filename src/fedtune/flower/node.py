"""The client side of a deployment: what one organisation's SuperNode runs (no Flower import here).

A SuperNode's ``--node-config`` says who it is and where its things are::

    client-id="hospital-a"              fedtune client id(s) this node answers for (comma-separated)
    data="/srv/fedtune/a.jsonl"         optional: this organisation's own data file; without it the
                                        node takes its partition(s) of the run's ``data`` config
    state-dir="/srv/fedtune/state"      where its client state (optimizer, schedule, ...) persists
    worker="/run/fedtune/a.sock"        optional: a warm worker (``fedtune deploy supernode`` starts
                                        one) that keeps the model loaded between messages

and what a submitted run may do on this machine (:class:`NodePolicy`; the run config cannot
change it, since only the SuperNode's own command line sets its node config)::

    allow-remote-code="true"            let model.trust_remote_code run a model's own Python code
    model-dirs="/srv/models:/opt/llm"   directories model.name may point into (os.pathsep-separated)
    data-dir="/srv/fedtune/data"        where built-in sources and data files named by the run are
                                        looked up (else $FEDTUNE_DATA_DIR)
    cache-dir="/var/cache/fedtune"      this node's caches (else $FEDTUNE_CACHE or ~/.cache/fedtune)
    max-world-size="2"                  processes a client's training may use (default 1)

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message. Loading torch, the model
and the data in each of them costs seconds per message, so ``fedtune deploy supernode`` also starts
a long-lived worker (:func:`serve_worker`) on a local Unix socket, and the ClientApp hands it the
message bytes. Without ``worker`` the ClientApp builds the same :class:`NodeHandler` in its own
process. Either way the bytes go through :func:`fedtune.transport.handle_on_client` into the same
:class:`~fedtune.client.FedClient` the simulation uses.

Client state across server restarts: the state after each fit is kept per round
(:class:`RoundStateStore`), and a fit for round ``r`` starts from the newest state of a round
before ``r``. A server that resumes from its round-``c`` checkpoint re-sends round ``c+1``; the
client then starts again from its state after round ``c`` (or its last participation before it),
exactly as an uninterrupted run would, even if it had already trained round ``c+1`` before the
server died. It keeps enough versions to reach back past the server's checkpoint interval.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.config import Config
from fedtune.errors import FedtuneError
from fedtune.flower.wire import MAX_MESSAGE_BYTES, PolicyError, recv_frame, send_frame
from fedtune.state import ClientState, ClientStateStore, _decode_state, _encode_state
from fedtune.utils import atomic_write_bytes, safe_name

log = logging.getLogger(__name__)


def _flag(v: Any) -> bool:
    return v is True or str(v).strip().lower() in ("1", "true", "yes")


@dataclass
class NodePolicy:
    """What this organisation lets a submitted run do on its machine.

    The client builds its model and reads its data as the run config says, and the run config
    comes from whoever submitted the run. Without this policy the server would choose which code
    runs here (``model.trust_remote_code`` with any hub id or local directory), which files are
    read (``data.source``, ``data.data_dir``), where caches are written (``*.cache_dir``) and how
    many processes start (``train.world_size``). The policy comes from the node's own node config;
    :meth:`apply` refuses what it does not allow (:class:`PolicyError`) and puts the node's own
    paths in place of the server's.
    """

    allow_remote_code: bool = False
    model_dirs: tuple[str, ...] = ()
    data_dir: str | None = None
    cache_dir: str | None = None
    max_world_size: int = 1

    @classmethod
    def from_node_config(cls, nc: dict[str, Any]) -> NodePolicy:
        raw_ws = nc.get("max-world-size", 1)
        try:
            ws = int(raw_ws)
            if isinstance(raw_ws, bool) or ws < 1:
                raise ValueError
        except ValueError:
            raise FedtuneError(f"node-config max-world-size={raw_ws!r} is not a positive integer") from None
        dirs = tuple(d for d in str(nc.get("model-dirs") or "").split(os.pathsep) if d.strip())
        return cls(allow_remote_code=_flag(nc.get("allow-remote-code", False)), model_dirs=dirs,
                   data_dir=nc.get("data-dir") or None, cache_dir=nc.get("cache-dir") or None, max_world_size=ws)

    @staticmethod
    def _under(path: Path, roots: list[Path]) -> bool:
        real = path.expanduser().resolve()  # symlinks followed: a link may not lead outside
        return any(real.is_relative_to(r.expanduser().resolve()) for r in roots)

    def _check_model(self, name: str) -> None:
        from fedtune.models.loading import EMBEDDED_MODELS, TINY_MODELS

        if name in EMBEDDED_MODELS or name in TINY_MODELS:
            return
        # the loader's order (fedtune.models.loading._resolve_dir): a .gguf file or an existing
        # path is loaded from disk; else an org/name hub id is downloaded
        if not (name.endswith(".gguf") or Path(name).expanduser().exists()):
            return  # a hub id (only weights and config: remote code is refused above), or unknown
        if not self._under(Path(name), [Path(d) for d in self.model_dirs]):
            dirs = ", ".join(self.model_dirs) or "none"
            raise PolicyError(f"model.name '{name}' is a path outside this SuperNode's model directories ({dirs}); "
                              "start the node with --model-dir DIR to allow models under DIR")

    def data_roots(self) -> list[Path]:
        """Where a data file named by the run may be: the node's data directory, $FEDTUNE_DATA_DIR."""
        from fedtune.data.sources import DATA_DIR_ENV

        roots = [self.data_dir, os.environ.get(DATA_DIR_ENV)]
        return [Path(r).expanduser() for r in roots if r]

    def _data_file(self, source: str) -> Path:
        roots = self.data_roots()
        p = Path(source).expanduser()
        for cand in [p] if p.is_absolute() else [r / p for r in roots]:
            if cand.is_file() and self._under(cand, roots):
                return cand.resolve()
        where = ", ".join(str(r) for r in roots) or "none"
        raise PolicyError(f"data.source '{source}' is not a file under this SuperNode's data directories ({where}); "
                          "start the node with --data FILE (its own records) or --data-dir DIR holding the file")

    def apply(self, cfg: Config, spec: NodeSpec) -> Config:
        """``cfg`` as this node runs it: the node's own paths in place of the server's, or
        :class:`PolicyError` saying what is not allowed and which node option would allow it."""
        from fedtune.data import resolve_data_config
        from fedtune.data.sources import SOURCES

        if cfg.model.trust_remote_code and not self.allow_remote_code:
            raise PolicyError("the run sets model.trust_remote_code, which runs Python code shipped with the model "
                              "on this machine; this SuperNode does not allow it (start it with --allow-remote-code "
                              "to trust the models this server names)")
        self._check_model(cfg.model.name)
        if cfg.train.world_size > self.max_world_size:
            raise PolicyError(f"the run asks for train.world_size={cfg.train.world_size} processes per client; this "
                              f"SuperNode allows {self.max_world_size} (start it with --max-world-size N)")
        cache = Path(self.cache_dir).expanduser() if self.cache_dir else None
        data = cfg.data.model_copy(update={"data_dir": self.data_dir,
                                           "cache_dir": str(cache / "tokenized") if cache else None})
        if spec.data is None:  # the node takes its part of the run's data: the source must be allowed
            source = resolve_data_config(data).source
            if source not in SOURCES:
                data = data.model_copy(update={"source": str(self._data_file(source))})
        model = cfg.model.model_copy(update={"cache_dir": str(cache / "models") if cache else None})
        return cfg.model_copy(update={"data": data, "model": model})


@dataclass
class NodeSpec:
    """What a SuperNode's ``--node-config`` says about it."""

    cids: list[str]
    data: str | None = None
    state_dir: str | None = None
    worker: str | None = None
    policy: NodePolicy = field(default_factory=NodePolicy)

    @classmethod
    def from_node_config(cls, nc: dict[str, Any]) -> NodeSpec:
        raw = str(nc.get("client-id", "")).strip()
        cids = [c.strip() for c in raw.split(",") if c.strip()]
        if not cids:
            raise FedtuneError('this SuperNode has no client id: start it with --node-config \'client-id="NAME"\'')
        data = nc.get("data") or None
        if data is not None and len(cids) != 1:
            raise FedtuneError("node-config 'data' (an organisation's own file) needs exactly one client-id")
        return cls(cids=cids, data=data, state_dir=nc.get("state-dir") or None, worker=nc.get("worker") or None,
                   policy=NodePolicy.from_node_config(nc))


class RoundStateStore(ClientStateStore):
    """Client states kept per round: ``<root>/<client>/round_00007.safetensors``.

    :meth:`at_round` sets the round being trained; :meth:`get` then returns the newest state of an
    earlier round and :meth:`put` stores the state after this round. ``keep`` versions are kept.
    """

    def __init__(self, root: Path | None, keep: int):
        super().__init__(None)  # the parent's memory store is unused: files live under our root
        self.dir = Path(root) if root is not None else None
        self.keep = max(2, keep)
        self.round = 0
        self._versions: dict[str, dict[int, bytes]] = {}

    def at_round(self, rnd: int) -> None:
        self.round = int(rnd)

    def _rounds(self, cid: str) -> dict[int, Path | bytes]:
        if self.dir is None:
            return dict(self._versions.get(cid, {}))
        d = self.dir / safe_name(cid)
        out: dict[int, Path | bytes] = {}
        for p in d.glob("round_*.safetensors") if d.is_dir() else []:
            m = re.fullmatch(r"round_(\d+)\.safetensors", p.name)
            if m:
                out[int(m.group(1))] = p
        return out

    def get(self, cid: str) -> ClientState:
        earlier = [r for r in self._rounds(cid) if r < self.round]
        if not earlier:
            return ClientState()
        src = self._rounds(cid)[max(earlier)]
        return _decode_state(src.read_bytes() if isinstance(src, Path) else src)

    def put(self, cid: str, state: ClientState) -> None:
        state.meta["state_round"] = self.round
        data = _encode_state(state)
        if self.dir is None:
            self._versions.setdefault(cid, {})[self.round] = data
        else:
            atomic_write_bytes(self.dir / safe_name(cid) / f"round_{self.round:05d}.safetensors", data)
        # drop versions of later rounds (a resumed server re-runs them) and the oldest beyond `keep`
        versions = self._rounds(cid)
        stale = [r for r in versions if r > self.round]
        older = sorted(r for r in versions if r <= self.round)
        stale += older[: max(0, len(older) - self.keep)]
        for r in stale:
            v = versions[r]
            if isinstance(v, Path):
                v.unlink(missing_ok=True)
            else:
                del self._versions[cid][r]


def build_node_clients(cfg: Config, device, store: ClientStateStore, spec: NodeSpec):
    """This node's clients over one shared model: ``(runtime, {client id: FedClient})``. Built the
    same way by the node and, in clustered mode, by each of its follower processes."""
    from fedtune.algorithms import build_algorithm
    from fedtune.client import ClientRuntime, FedClient
    from fedtune.hardware import runtime_config
    from fedtune.models import load_model
    from fedtune.run import build_adapter_model, load_client_data

    cfg = runtime_config(cfg, device)  # precision/dtype `auto` resolved for this node's device
    if cfg.offsite.enabled:  # offsite tuning: an emulator skeleton, filled from what the server sends once
        from fedtune.offsite.roles import node_clients

        return node_clients(cfg, device, store, spec, lambda tok: NodeHandler._data(cfg, spec, tok, load_client_data))
    base = load_model(cfg.model)
    tok = NodeHandler._data(cfg, spec, base[1], load_client_data)
    am = build_adapter_model(cfg, base, device)
    rt = ClientRuntime(model=am.model, pad_id=am.tokenizer.pad_token_id, cfg=cfg, device=am.device,
                       algorithm=build_algorithm(cfg.fl), store=store)
    return rt, {cid: FedClient(cid, rt, **tok[cid]) for cid in spec.cids}


class NodeHandler:
    """This node's clients: ``FedClient``s over one shared model, answering message bytes.

    With ``train.world_size`` N > 1 (clustered mode) each client's local training runs on N
    processes, exactly as in the simulation (:func:`fedtune.run.run`): followers are spawned here,
    build the same clients (the node's own data file included) and mirror every fit the node
    starts. :meth:`close` releases them.
    """

    def __init__(self, cfg: Config, spec: NodeSpec):
        import torch

        from fedtune.run import follower_main, join_cluster, rank_device, start_followers, stop_cluster
        from fedtune.utils import resolve_device

        self.cfg, self.spec = cfg, spec
        # versions to keep: the server may resume from a checkpoint up to `checkpoint.every` rounds old
        keep = (cfg.checkpoint.every or cfg.fl.rounds) + 1
        root = Path(spec.state_dir) if spec.state_dir else None
        self.store = RoundStateStore(root, keep=keep)
        self._cluster, self._followers, self._threads = None, [], torch.get_num_threads()
        if cfg.train.world_size > 1:  # followers first: they load while we do
            addr, self._followers = start_followers(cfg, follower_main,
                                                    (cfg.to_dict(), build_node_clients, (spec,)))
        try:
            rt, self.clients = build_node_clients(cfg, rank_device(resolve_device(cfg.train.device), 0),
                                                  self.store, spec)
            if self._followers:
                self._cluster = join_cluster(rt, 0, cfg, addr)
        except BaseException:
            stop_cluster(self._cluster, self._followers, self._threads)
            raise

    def close(self) -> None:
        """Release clustered-mode followers (a no-op with one process)."""
        from fedtune.run import stop_cluster

        if self._followers:
            stop_cluster(self._cluster, self._followers, self._threads)
            self._cluster, self._followers = None, []

    @staticmethod
    def _data(cfg: Config, spec: NodeSpec, tokenizer, load_client_data) -> dict[str, dict[str, Any]]:
        if spec.data is not None:  # the organisation's own file: all of it is this client's
            from fedtune.data import resolve_data_config

            own = cfg.model_copy(deep=True)  # the run's data settings (template, lengths, fractions) apply
            own.data = resolve_data_config(cfg.data).model_copy(
                update={"preset": None, "source": spec.data, "splitter": "iid", "num_clients": 1,
                        "exclude_labels": []})
            (only,) = load_client_data(own, tokenizer).values()
            return {spec.cids[0]: only}
        tok = load_client_data(cfg, tokenizer)
        missing = [c for c in spec.cids if c not in tok]
        if missing:
            from fedtune.errors import did_you_mean

            raise FedtuneError(f"client-id '{missing[0]}' is not a client of this run's data split"
                               f"{did_you_mean(missing[0], tok)}; its clients: {', '.join(tok)}")
        return {c: tok[c] for c in spec.cids}

    def describe(self) -> dict[str, int]:
        """client id -> number of training examples (the server's FedAvg weights)."""
        return {cid: c.num_train for cid, c in self.clients.items()}

    def handle(self, kind: str, cid: str, rnd: int, data: bytes) -> bytes:
        from fedtune.transport import handle_on_client

        if cid not in self.clients:
            raise FedtuneError(f"this node holds clients {sorted(self.clients)}, not '{cid}'")
        self.store.at_round(rnd)
        return handle_on_client(self.clients[cid], kind, data)


# ---- the warm worker: a local Unix socket, length-prefixed JSON header + raw bytes -------------
# Hand-written because it is tiny and local: a frame is 4 bytes header length, 8 bytes payload
# length, a JSON header, the payload. Nothing is unpickled; the payload is a fedtune message that
# handle_on_client parses strictly.

class HandlerCache:
    """The :class:`NodeHandler` for the latest (run config, node config) seen; rebuilt when either
    changes, so one worker serves successive runs."""

    def __init__(self):
        self.key: str | None = None
        self.handler: NodeHandler | None = None

    def get(self, config_json: str, node_config: dict[str, Any]) -> NodeHandler:
        from fedtune.config import config_from_dict

        key = json.dumps([config_json, node_config], sort_keys=True)
        if key != self.key or self.handler is None:
            spec = NodeSpec.from_node_config(node_config)
            cfg = spec.policy.apply(config_from_dict(json.loads(config_json)), spec)  # before loading anything
            if self.handler is not None:
                self.handler.close()
            self.handler = None  # free the old model first
            self.handler = NodeHandler(cfg, spec)
            self.key = key
        return self.handler


def answer(cache: HandlerCache, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
    """One request: ``op`` is ``describe``, ``fit``, ``evaluate`` or one of the run's algorithm's own
    exchanges; ``config`` the run's config (JSON) and ``node_config`` the SuperNode's. Shared by the
    worker and the in-process path."""
    handler = cache.get(str(header["config"]), dict(header.get("node_config") or {}))
    op = header.get("op")
    if op == "describe":
        return {"clients": handler.describe()}, b""
    if isinstance(op, str) and op != "describe":  # handle_on_client refuses kinds the algorithm lacks
        return {"ok": True}, handler.handle(op, str(header["cid"]), int(header.get("round", 0)), payload)
    raise FedtuneError(f"unknown op {op!r}")


def serve_worker(path: str, *, ready_file: str | None = None) -> None:
    """Answer requests on the Unix socket ``path`` one at a time, until killed."""

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is this user's only: 0600
    try:
        srv.bind(str(p))
    finally:
        os.umask(old)
    srv.listen(8)
    if ready_file:
        atomic_write_bytes(Path(ready_file), b"ready\n")
    log.info("fedtune worker listening on %s", p)
    cache = HandlerCache()
    try:
        while True:
            conn, _ = srv.accept()
            with conn:
                try:
                    header, payload = recv_frame(conn, MAX_MESSAGE_BYTES)
                    reply, out = answer(cache, header, payload)
                    send_frame(conn, reply, out)
                except Exception as e:  # noqa: BLE001 - one bad request must not end the worker
                    log.warning("worker request failed: %s", e, exc_info=not isinstance(e, FedtuneError))
                    try:
                        send_frame(conn, {"error": str(e), "refused": isinstance(e, PolicyError)})
                    except OSError:
                        pass
    finally:
        if cache.handler is not None:
            cache.handler.close()
        srv.close()
        p.unlink(missing_ok=True)
