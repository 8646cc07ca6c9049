"""The server half: one federated round you can read top to bottom (Flower ``Strategy.start``).

sample → broadcast → collect → aggregate → evaluate → log → checkpoint.

Scenarios (FS-LLM §6.1): ``fed`` and ``global`` keep one global adapter (``global`` simply has a
single client holding all data); ``local`` keeps one adapter per client and never aggregates.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.algorithms import Algorithm, ClientUpdate
from fedtune.checkpoint import save_checkpoint
from fedtune.codecs import Pipeline, build_pipeline
from fedtune.config import Config
from fedtune.messages import Message
from fedtune.metrics import MetricsLogger, gpu_peak_mb, peak_rss_mb
from fedtune.state import ClientStateStore
from fedtune.transport import Reply, Transport
from fedtune.utils import derive_seed

log = logging.getLogger(__name__)

GLOBAL = "global"
TensorDict = dict[str, torch.Tensor]


@dataclass
class RoundHooks:
    """Named points where cross-cutting concerns attach (progress bars, printing, plots)."""

    on_round_start: Callable[[int, list[str]], None] | None = None
    on_reply: Callable[[str, Reply], None] | None = None
    on_round_end: Callable[[int, dict[str, Any], list[dict[str, Any]]], None] | None = None


@dataclass
class Server:
    cfg: Config
    algorithm: Algorithm
    transport: Transport
    train_clients: list[str]  # who trains
    eval_clients: list[str]  # on whose data adapters are evaluated
    num_train: dict[str, int]
    models: dict[str, TensorDict]  # GLOBAL -> adapter, or cid -> adapter (local scenario)
    store: ClientStateStore
    logger: MetricsLogger
    run_dir: Path
    save_adapters: Callable[[int, dict[str, TensorDict], bool], None]
    hooks: RoundHooks = field(default_factory=RoundHooks)
    #: benchmark tasks in the loop (``eval.tasks``; :mod:`fedtune.eval.inloop`): called with the
    #: round and the current adapter(s), returns round metrics and per-client metrics.
    task_eval: Callable[[int, dict[str, TensorDict]], tuple[dict[str, Any], dict[str, dict[str, Any]]]] | None = None

    @property
    def local(self) -> bool:
        return self.cfg.fl.scenario == "local"

    def model_for(self, cid: str) -> TensorDict:
        return self.models[cid] if self.local else self.models[GLOBAL]

    # ---- codecs ------------------------------------------------------------------------
    # ``self.models`` is the server's exact fp32 master copy. What clients hold is what the ``down``
    # codec makes of it, ``as_sent(master)``: a deterministic function of the master, computed by the
    # same code that decodes the bytes. Clients send differences from what they hold; the server
    # adds them to the master (so downlink rounding is never compounded round after round), while
    # evaluation (it goes through the same codec) and the saved adapters show what clients hold.
    # Checkpoints keep the master, so a resumed run continues exactly.
    @cached_property
    def down_codec(self) -> Pipeline:
        return build_pipeline(self.cfg.comm, "down")

    def as_sent(self, tensors: TensorDict) -> TensorDict:
        """The adapter a client decodes when the server sends ``tensors``."""
        return self.down_codec.roundtrip(tensors)

    def to_weights(self, r: Reply) -> TensorDict:
        """A fit reply's tensors as full adapter weights (a difference is added to the master)."""
        assert r.message is not None
        if not r.message.delta:
            return r.message.tensors
        ref = self.model_for(r.cid)
        return {k: ref[k] + v for k, v in r.message.tensors.items()}

    def expect(self, cids: list[str]) -> dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
        """Per client, the tensor names/shapes/dtypes its reply must have (what it was sent), so
        clients may hold differently shaped adapters (e.g. heterogeneous LoRA ranks)."""
        return {cid: {k: (tuple(v.shape), v.dtype) for k, v in self.model_for(cid).items()} for cid in cids}

    # ---- the round ---------------------------------------------------------------------
    def sample(self, rnd: int) -> list[str]:
        c, n = self.cfg.fl.clients_per_round, len(self.train_clients)
        if c is None or self.local:
            return list(self.train_clients)
        k = max(1, math.ceil(c * n)) if isinstance(c, float) else min(int(c), n)
        rng = np.random.default_rng(derive_seed(self.cfg.seed, "sample", rnd))
        picked = set(rng.choice(n, size=k, replace=False).tolist())
        return [cid for i, cid in enumerate(self.train_clients) if i in picked]

    def run_round(self, rnd: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        sampled = self.sample(rnd)
        if self.hooks.on_round_start:
            self.hooks.on_round_start(rnd, sampled)
        eval_due = self.eval_due(rnd)
        fit_config = {"round": rnd, "eval_local": eval_due and self.cfg.eval.local_models}
        down = self.down_codec
        if self.local:
            ins = {cid: Message(self.models[cid], config=fit_config, codec=down) for cid in sampled}
        else:
            broadcast = Message(self.models[GLOBAL], config=fit_config, codec=down)  # encoded once
            ins = {cid: broadcast for cid in sampled}
        stream = self.algorithm.streaming and not self.local
        acc = self.algorithm.begin(self.models[GLOBAL]) if stream else None

        def on_fit_reply(r: Reply) -> None:
            if self.hooks.on_reply:
                self.hooks.on_reply("fit", r)
            if r.message is None:
                return
            r.message.tensors, r.message.delta = self.to_weights(r), False
            u = ClientUpdate(r.cid, r.message.tensors, self.num_train[r.cid], r.message.metrics)
            if self.local:
                self.models[r.cid] = u.tensors
            elif stream:
                self.algorithm.fold(acc, u)
            else:
                return
            r.message.tensors = {}  # folded in: do not keep every client's update in memory

        replies = self.transport.send("fit", ins, expect=self.expect(sampled), on_reply=on_fit_reply)
        ok = [r for r in replies if r.message is not None]
        updates = [ClientUpdate(r.cid, r.message.tensors, self.num_train[r.cid], r.message.metrics) for r in ok]
        if stream:
            self.models[GLOBAL] = self.algorithm.finish(self.models[GLOBAL], acc)
        elif not self.local:
            self.models[GLOBAL] = self.algorithm.aggregate(self.models[GLOBAL], updates)
        client_rows = {r.cid: {"round": rnd, "kind": "client", "client": r.cid, "bytes_down": r.bytes_down,
                               "bytes_up": r.bytes_up, "seconds": r.seconds, "rejected": r.error} for r in replies}
        for u in updates:
            m = u.metrics
            client_rows[u.cid].update({k: m[k] for k in ("train_loss", "lr", "steps", "train_tokens",
                                                          "tokens_per_s", "skipped_nonfinite",
                                                          "step_seconds", "up_rel_error") if k in m})
            if m.get("local_val_tokens") and "local_val_loss_sum" in m:  # a partial reply is no KeyError
                client_rows[u.cid]["local_val_loss"] = m["local_val_loss_sum"] / m["local_val_tokens"]
        row: dict[str, Any] = {
            "round": rnd, "kind": "round", "clients": len(sampled), "rejected": len(replies) - len(ok),
            "train_loss": _pool(updates, "train_loss", "train_label_tokens"),
            "bytes_down": sum(r.bytes_down for r in replies), "bytes_up": sum(r.bytes_up for r in replies),
            "train_tokens": sum(u.metrics.get("train_tokens", 0) for u in updates),
            "skipped_nonfinite": sum(u.metrics.get("skipped_nonfinite", 0) for u in updates),
        }
        train_s = sum(u.metrics.get("train_seconds", 0.0) for u in updates)
        row["tokens_per_s"] = row["train_tokens"] / train_s if train_s > 0 else 0.0
        if eval_due:
            row.update(self.evaluate(rnd, client_rows))
        self.evaluate_tasks(rnd, row, client_rows)
        row["seconds"] = time.perf_counter() - t0
        row["peak_rss_mb"] = peak_rss_mb()
        gpu = gpu_peak_mb()
        if gpu is not None:
            row["gpu_peak_mb"] = gpu
        rows = list(client_rows.values())
        for r in rows:
            self.logger.log(r)
        self.logger.log(row)
        self.logger.flush()
        last = rnd == self.cfg.fl.rounds
        every = self.cfg.checkpoint.every
        if last or (every and rnd % every == 0):
            self.checkpoint(rnd, final=last)
        if self.hooks.on_round_end:
            self.hooks.on_round_end(rnd, row, rows)
        return row

    def eval_due(self, rnd: int) -> bool:
        k = self.cfg.eval.every
        return rnd == self.cfg.fl.rounds or (k > 0 and rnd % k == 0) or (rnd == 0 and k > 0)

    def evaluate(self, rnd: int, client_rows: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """Loss/perplexity of the current adapter(s) on every eval client's val/test data."""
        splits = self.cfg.eval.splits
        down = self.down_codec
        if self.local:
            ins = {cid: Message(self.model_for(cid), config={"splits": splits}, codec=down)
                   for cid in self.eval_clients}
        else:
            broadcast = Message(self.models[GLOBAL], config={"splits": splits}, codec=down)
            ins = {cid: broadcast for cid in self.eval_clients}
        replies = self.transport.send("evaluate", ins,
                                      on_reply=lambda r: self.hooks.on_reply and self.hooks.on_reply("evaluate", r))
        out: dict[str, Any] = {"eval_bytes_down": sum(r.bytes_down for r in replies),
                               "eval_bytes_up": sum(r.bytes_up for r in replies)}
        per_client: dict[str, dict[str, float]] = {}
        for split in splits:
            s = sum(r.message.metrics.get(f"{split}_loss_sum", 0.0) for r in replies if r.message)
            n = sum(r.message.metrics.get(f"{split}_tokens", 0) for r in replies if r.message)
            if n:
                out[f"{split}_loss"] = s / n
                out[f"{split}_ppl"] = _ppl(s / n)
            for r in replies:
                m = r.message.metrics if r.message else {}
                if m.get(f"{split}_tokens") and f"{split}_loss_sum" in m:  # parsing guarantees the pair
                    loss = m[f"{split}_loss_sum"] / m[f"{split}_tokens"]
                    per_client.setdefault(r.cid, {}).update({f"{split}_loss": loss, f"{split}_ppl": _ppl(loss)})
        if client_rows is not None:
            for cid, vals in per_client.items():
                client_rows.setdefault(cid, {"round": rnd, "kind": "client", "client": cid}).update(vals)
            if self.local:  # FS-LLM's "local": report each client and their unweighted mean
                for split in splits:
                    vals = [v[f"{split}_loss"] for v in per_client.values() if f"{split}_loss" in v]
                    if vals:
                        out[f"{split}_loss_mean_of_clients"] = float(np.mean(vals))
        return out

    def evaluate_tasks(self, rnd: int, row: dict[str, Any], client_rows: dict[str, dict[str, Any]]) -> None:
        """Benchmark tasks on the current adapter(s), when configured and due (it decides)."""
        if self.task_eval is None:
            return
        round_metrics, per_client = self.task_eval(rnd, self.models)
        row.update(round_metrics)
        for cid, vals in per_client.items():
            client_rows.setdefault(cid, {"round": rnd, "kind": "client", "client": cid}).update(vals)

    def checkpoint(self, rnd: int, final: bool = False) -> None:
        # the clients are part of the run: a resumed deployment must wait for these, not for
        # whichever SuperNodes happen to be connected when it restarts
        # the adapters go into the checkpoint before ``latest`` names it (see save_checkpoint)
        sent = {k: self.as_sent(v) for k, v in self.models.items()}
        save_checkpoint(self.run_dir, rnd, self.models, self.store,
                        {"fingerprint": self.cfg.fingerprint(), "clients": list(self.train_clients)},
                        keep=self.cfg.checkpoint.keep, then=lambda: self.save_adapters(rnd, sent, final))

    def run(self, start_round: int = 1) -> list[dict[str, Any]]:
        rows = []
        if start_round == 1 and self.cfg.eval.every > 0:
            # round 0: the untrained adapter, so every curve has its starting point
            row = {"round": 0, "kind": "round", **self.evaluate(0, client_rows := {})}
            self.evaluate_tasks(0, row, client_rows)
            for r in client_rows.values():
                self.logger.log(r)
            self.logger.log(row)
            if self.hooks.on_round_end:
                self.hooks.on_round_end(0, row, list(client_rows.values()))
            rows.append(row)
        for rnd in range(start_round, self.cfg.fl.rounds + 1):
            rows.append(self.run_round(rnd))
        self.logger.close()
        return rows


def _ppl(loss: float) -> float:
    """Perplexity of a mean token loss (capped at e^50: an untrained model must not overflow)."""
    return math.exp(min(loss, 50))


def _pool(updates: list[ClientUpdate], key: str, weight_key: str) -> float | None:
    num = sum(u.metrics.get(key, 0.0) * u.metrics.get(weight_key, 0) for u in updates
              if u.metrics.get(weight_key) and math.isfinite(u.metrics.get(key, float("nan"))))
    den = sum(u.metrics.get(weight_key, 0) for u in updates
              if u.metrics.get(weight_key) and math.isfinite(u.metrics.get(key, float("nan"))))
    return num / den if den else None
