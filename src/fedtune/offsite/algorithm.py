"""Offsite tuning around any aggregation rule: :class:`Offsite` wraps the run's algorithm.

FedOT is offsite tuning with ``fl.algorithm: fedavg`` (FS-LLM §6.3), LocalOT with ``fl.scenario:
local`` (each client alone); FedProx, FedAdam, ... compose the same way, because offsite tuning
changes *which model* each side holds and *what else travels*, not how adapters are combined.
The wrapper delegates every decision about the adapter to the inner algorithm and adds:

* **the emulator, once per client** — before a client's first fit or evaluation, an ``emulator``
  exchange (:mod:`fedtune.offsite.transfer`): an offer naming the content hash, then the file in
  chunks to those that do not hold it. Which clients hold it is kept in memory only: after a server
  restart each client is asked once more, and one that kept it (a SuperNode's state directory) is
  sent nothing. A client whose fit fails is asked again next round. Every fit and evaluation
  instruction names the hash, and the client checks that its model holds exactly that emulator.
* **re-alignment (FedBiOT)**, with ``offsite.realign.steps``: before the broadcast the server
  re-aligns its emulator, and the low-rank change travels in every instruction (group ``realign``).

Server metrics (round rows): ``emulator_bytes`` (file bytes delivered since the last round row),
``emulator_clients`` (clients that received it), and ``realign_kd``/``realign_lm``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from fedtune.algorithms.base import (GLOBAL, Algorithm, ClientResult, Group, Instruction, RoundContext, Setup, Spec,
                                     TensorDict, TensorSpec, Update, spec_of)
from fedtune.errors import FedtuneError
from fedtune.offsite.transfer import CHUNK, EMULATOR, ClientEmulator, chunks

if TYPE_CHECKING:
    from fedtune.client import ClientContext
    from fedtune.offsite.roles import OffsiteServer

log = logging.getLogger(__name__)

#: the group holding the emulator's low-rank re-alignment (FedBiOT) in fit/evaluate instructions
REALIGN = "realign"
#: key of the emulator's content hash in every fit/evaluate instruction's config
HASH_KEY = "emulator"
_STATE = "offsite_realign"


class Offsite(Algorithm):
    """The inner algorithm's server and client halves plus the emulator's transfer and re-alignment.

    ``server`` (:class:`~fedtune.offsite.roles.OffsiteServer`): where the server half runs (the
    emulator file, the re-aligner); ``client`` (:class:`~fedtune.offsite.transfer.ClientEmulator`):
    where clients run. The simulation has both in one process."""

    def __init__(self, inner: Algorithm, *, server: OffsiteServer | None = None, client: ClientEmulator | None = None,
                 realign: bool = False, chunk_size: int = 64 << 20):
        super().__init__(inner.options, weighting=inner.weighting)
        self.inner = inner
        self.name = inner.name
        self.Options = inner.Options
        self.server, self.client = server, client
        self.realign = realign
        self.chunk_size = chunk_size
        # an instance attribute on purpose: the groups of this run (the inner algorithm's plus ours)
        self.groups = {**inner.groups, EMULATOR: Group(lossy=False), REALIGN: Group()}
        self.exchanges = (*inner.exchanges, EMULATOR)
        self.holders: dict[str, str] = {}
        self._delivered = [0, 0]  # (file bytes, clients) since the last finish
        self._folded: set[str] = set()

    @property
    def adapter(self) -> TensorDict:  # the inner algorithm's global adapter
        return self.inner.adapter

    @adapter.setter
    def adapter(self, value: TensorDict) -> None:
        if hasattr(self, "inner"):
            self.inner.adapter = value

    # ---- set-up ---------------------------------------------------------------------------
    def check(self, setup: Setup) -> None:
        self.inner.check(setup)

    def init(self, setup: Setup) -> None:
        self.inner.init(setup)
        self.holders = {}
        if self.realign and GLOBAL not in self.inner.adapters():
            raise FedtuneError("offsite.realign re-aligns the emulator to the global adapter; this run keeps one "
                               f"adapter per client ({self.inner.name}): turn realign off or use fl.scenario=fed")

    # ---- server half ---------------------------------------------------------------------
    def _deliver(self, ctx: RoundContext, cids: list[str]) -> None:
        """Send the emulator to those of ``cids`` not known to hold it (an offer first)."""
        srv = self.server
        need = [c for c in cids if self.holders.get(c) != srv.hash]
        if not need or ctx.exchange is None:
            return
        base = {"hash": srv.hash, "size": srv.size}
        empty = torch.zeros(0, dtype=torch.uint8)
        offer = Instruction({EMULATOR: {CHUNK: empty}}, {**base, "offset": 0, "offer": True}, reply={})
        for u in ctx.exchange(EMULATOR, {c: offer for c in need}):
            if u.metrics.get("holds") == 1:
                self.holders[u.cid] = srv.hash
        need = [c for c in need if self.holders.get(c) != srv.hash]
        for offset, data in chunks(srv.path, self.chunk_size):
            if not need:
                break
            final = offset + len(data) >= srv.size
            t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            ins = Instruction({EMULATOR: {CHUNK: t}}, {**base, "offset": offset, "final": final}, reply={})
            got = {u.cid: u for u in ctx.exchange(EMULATOR, {c: ins for c in need})}
            need = [c for c in need if c in got and got[c].metrics.get("received") == offset + len(data)]
            if final:
                for c in need:
                    if got[c].metrics.get("holds") == 1:
                        self.holders[c] = srv.hash
                        self._delivered[0] += srv.size
                        self._delivered[1] += 1
        missing = [c for c in cids if self.holders.get(c) != srv.hash]
        if missing:
            log.warning("offsite: %d client(s) could not receive the emulator this round and sit it out: %s",
                        len(missing), ", ".join(missing[:8]))

    def _decorate(self, instructions: dict[str, Instruction]) -> dict[str, Instruction]:
        """Keep the instructions of clients holding the emulator; name it in each, add the re-alignment."""
        srv = self.server
        out = {c: i for c, i in instructions.items() if self.holders.get(c) == srv.hash}
        realign = srv.realigner.tensors() if self.realign else None
        done: set[int] = set()
        for ins in out.values():
            if id(ins) in done:  # a broadcast: one object for all
                continue
            done.add(id(ins))
            if ins.reply is None:  # "shaped like what was sent": what the inner algorithm sent
                ins.reply = spec_of(ins.groups)
            ins.config = {**ins.config, HASH_KEY: srv.hash}
            if realign is not None:
                ins.groups = {**ins.groups, REALIGN: realign}
        return out

    def configure_fit(self, ctx: RoundContext) -> dict[str, Instruction]:
        srv = self.server
        if self.realign:
            self._realign_metrics = srv.realign(ctx.round, self.inner.adapters()[GLOBAL])
        self._deliver(ctx, ctx.sampled)
        return self._decorate(self.inner.configure_fit(ctx))

    def begin(self, ctx: RoundContext) -> Any:
        self._folded = set()
        return self.inner.begin(ctx)

    def fold(self, ctx: RoundContext, acc: Any, update: Update) -> None:
        self._folded.add(update.cid)
        self.inner.fold(ctx, acc, update)

    def finish(self, ctx: RoundContext, acc: Any) -> dict[str, float]:
        metrics = dict(self.inner.finish(ctx, acc))
        for c in ctx.sampled:  # no usable reply: maybe it lost the emulator; ask again next time
            if c not in self._folded:
                self.holders.pop(c, None)
        metrics["emulator_bytes"], metrics["emulator_clients"] = self._delivered
        self._delivered = [0, 0]
        metrics.update(getattr(self, "_realign_metrics", None) or {})
        return metrics

    def configure_evaluate(self, ctx: RoundContext) -> dict[str, Instruction]:
        self._deliver(ctx, ctx.eval_clients)
        return self._decorate(self.inner.configure_evaluate(ctx))

    def adapters(self) -> dict[str, TensorDict]:
        return self.inner.adapters()

    def state_dict(self) -> tuple[dict[str, TensorDict], dict[str, Any]]:
        tensors, meta = self.inner.state_dict()
        if _STATE in tensors:
            raise ValueError(f"{self.inner.name} already uses server-state group '{_STATE}'")
        out_meta: dict[str, Any] = {"inner": meta}
        if self.realign:
            t, m = self.server.realigner.state()
            tensors = {**tensors, _STATE: t}
            out_meta["realign"] = m
        return tensors, out_meta

    def load_state_dict(self, tensors: dict[str, TensorDict], meta: dict[str, Any]) -> None:
        self.inner.load_state_dict({k: v for k, v in tensors.items() if k != _STATE}, meta.get("inner", {}))
        if self.realign:
            self.server.realigner.load(tensors.get(_STATE, {}), meta.get("realign", {}))
        self.holders = {}  # asked again after a restart (see the module docstring)

    # ---- client half ---------------------------------------------------------------------
    def instruction_spec(self, c: ClientContext, kind: str) -> Spec:
        if kind == EMULATOR:
            return {EMULATOR: {CHUNK: TensorSpec((self.chunk_size,), torch.uint8, variable=True)}}
        spec = self.inner.instruction_spec(c, kind)
        if self.realign and kind in ("fit", "evaluate"):
            spec = {**spec, REALIGN: {k: TensorSpec(s) for k, s in self.client.lowrank.items()}}
        return spec

    def _prepare(self, c: ClientContext, ins: Instruction) -> Instruction:
        self.client.ensure(c.rt.model, c.cid, ins.config.get(HASH_KEY), ins.groups.get(REALIGN))
        return Instruction({g: t for g, t in ins.groups.items() if g != REALIGN}, ins.config, ins.reply)

    def client_fit(self, c: ClientContext, ins: Instruction) -> ClientResult:
        return self.inner.client_fit(c, self._prepare(c, ins))

    def client_evaluate(self, c: ClientContext, ins: Instruction) -> dict[str, float]:
        return self.inner.client_evaluate(c, self._prepare(c, ins))

    def client_exchange(self, kind: str, c: ClientContext, ins: Instruction) -> ClientResult:
        if kind != EMULATOR:
            return self.inner.client_exchange(kind, c, ins)
        metrics = self.client.exchange(c.cid, ins.config, ins.groups[EMULATOR][CHUNK])
        return ClientResult({}, metrics)

    def local_loss(self, c: ClientContext, ins: Instruction):
        return self.inner.local_loss(c, ins)
