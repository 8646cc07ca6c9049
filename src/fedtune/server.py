"""The server half: one federated round you can read top to bottom (Flower ``Strategy.start``).

sample → configure → exchange (each reply folded as it arrives) → aggregate → evaluate → log →
checkpoint.

The round knows no algorithm and no scenario: what each client is sent, how replies combine and
which adapters exist all come from the :class:`~fedtune.algorithms.base.Algorithm`'s server half;
how tensors travel (codecs, differences, strict parsing) from :class:`~fedtune.payload.Wire`; how
messages reach clients from the :class:`~fedtune.transport.Transport`.
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

from fedtune.algorithms import Algorithm, Instruction, RoundContext, Update
from fedtune.algorithms.base import GLOBAL, TensorDict
from fedtune.checkpoint import save_checkpoint
from fedtune.config import Config
from fedtune.errors import MessageError
from fedtune.messages import Message
from fedtune.metrics import MetricsLogger, gpu_peak_mb, peak_rss_mb
from fedtune.payload import Wire
from fedtune.state import ClientStateStore
from fedtune.transport import Reply, Transport
from fedtune.utils import derive_seed

log = logging.getLogger(__name__)

__all__ = ["GLOBAL", "RoundHooks", "Server"]

#: client metrics pooled into the round row by a rule of their own (everything else: the mean
#: over the clients that reported it)
_SUMMED = ("train_tokens", "skipped_nonfinite", "train_examples", "train_label_tokens")


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
    store: ClientStateStore
    logger: MetricsLogger
    run_dir: Path
    save_adapters: Callable[[int, dict[str, TensorDict], bool], None]
    hooks: RoundHooks = field(default_factory=RoundHooks)
    #: benchmark tasks in the loop (``eval.tasks``; :mod:`fedtune.eval.inloop`): called with the
    #: round and the current adapter(s), returns round metrics and per-client metrics.
    task_eval: Callable[[int, dict[str, TensorDict]], tuple[dict[str, Any], dict[str, dict[str, Any]]]] | None = None
    _side_bytes: list[int] = field(default_factory=lambda: [0, 0], init=False, repr=False)

    # The algorithm holds the server's exact fp32 master copies. What clients hold is what the
    # ``down`` codec makes of them (``Wire.as_sent``): a deterministic function computed by the same
    # code that decodes the bytes. Evaluation and the saved adapters show what clients hold;
    # checkpoints keep the masters, so a resumed run continues exactly.
    @cached_property
    def wire(self) -> Wire:
        return Wire(self.cfg.comm, self.algorithm.groups)

    def sent_adapters(self) -> dict[str, TensorDict]:
        return {k: self.wire.as_sent({"adapter": v})["adapter"] for k, v in self.algorithm.adapters().items()}

    # ---- the round ---------------------------------------------------------------------
    def sample(self, rnd: int) -> list[str]:
        n = len(self.train_clients)
        k = clients_per_round(self.cfg.fl.clients_per_round, n)
        if k >= n:
            return list(self.train_clients)
        rng = np.random.default_rng(derive_seed(self.cfg.seed, "sample", rnd))
        picked = set(rng.choice(n, size=k, replace=False).tolist())
        return [cid for i, cid in enumerate(self.train_clients) if i in picked]

    def context(self, rnd: int, sampled: list[str]) -> RoundContext:
        eval_local = self.eval_due(rnd) and self.cfg.eval.local_models
        return RoundContext(round=rnd, rounds=self.cfg.fl.rounds, sampled=sampled, clients=list(self.train_clients),
                            num_train=self.num_train, config={"round": rnd, "eval_local": eval_local},
                            eval_clients=list(self.eval_clients), exchange=self.side_exchange)

    def side_exchange(self, kind: str, instructions: dict[str, Instruction]) -> list[Update]:
        """One of the algorithm's own round trips (``RoundContext.exchange``): the accepted updates."""
        if kind in ("fit", "evaluate") or kind not in self.algorithm.exchanges:
            raise ValueError(f"{self.algorithm.name} declares no '{kind}' exchange (Algorithm.exchanges)")
        got: list[Update] = []
        replies = self.exchange(kind, instructions, lambda u: got.append(Update(u.cid, u.groups, u.num_examples,
                                                                                 u.metrics)))
        self._side_bytes[0] += sum(r.bytes_down for r in replies)
        self._side_bytes[1] += sum(r.bytes_up for r in replies)
        for r in replies:
            if r.message is None:
                log.warning("%s: no usable %s reply from %s (%s)", self.algorithm.name, kind, r.cid, r.error)
        return got

    def run_round(self, rnd: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._side_bytes = [0, 0]  # what the algorithm's own exchanges of this round move
        ctx = self.context(rnd, self.sample(rnd))
        if self.hooks.on_round_start:
            self.hooks.on_round_start(rnd, ctx.sampled)
        instructions = self.algorithm.configure_fit(ctx)
        acc = self.algorithm.begin(ctx)
        replies = self.exchange("fit", instructions, lambda u: self.algorithm.fold(ctx, acc, u))
        server_metrics = self.algorithm.finish(ctx, acc)
        row, client_rows = self.fit_rows(rnd, ctx, replies, server_metrics)
        if self.eval_due(rnd):
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

    def exchange(self, kind: str, instructions: dict[str, Instruction],
                 fold: Callable[[Update], None] | None = None) -> list[Reply]:
        """Send each client its instruction (a broadcast is encoded once) and collect the replies,
        parsed strictly against what each instruction said to expect. Each accepted reply is
        turned into an :class:`Update` and handed to ``fold`` as it arrives (in the sampled order),
        then its tensors are dropped: the server never holds every client's update at once unless
        the algorithm keeps them."""
        messages: dict[int, Message] = {}
        for ins in instructions.values():
            if id(ins) not in messages:
                messages[id(ins)] = self.wire.instruction(ins)
        out = {cid: messages[id(ins)] for cid, ins in instructions.items()}
        expect = {cid: self.wire.reply_spec(kind, ins) for cid, ins in instructions.items()}

        def on_reply(r: Reply) -> None:
            if r.message is not None and fold is not None:
                try:
                    update = self.wire.update(r.cid, r.message, instructions[r.cid], self.num_train.get(r.cid, 0))
                except MessageError as e:
                    log.warning("rejected %s reply from client %s: %s", kind, r.cid, e)
                    r.message, r.error = None, str(e)
                else:
                    fold(update)
                    # folded in: the reply lets go of its tensors, so unless the accumulator keeps the
                    # update (a robust rule does), the server never holds every client's update at once
                    r.message.tensors = {}
            if self.hooks.on_reply:
                self.hooks.on_reply(kind, r)

        return self.transport.send(kind, out, expect=expect, on_reply=on_reply)

    def fit_rows(self, rnd: int, ctx: RoundContext, replies: list[Reply], server_metrics: dict[str, float]
                 ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """The round row and one row per client. Every metric a client reports is logged (loss sums
        become losses); the round row pools them: losses by their token counts, counters summed,
        anything else the mean over the clients that reported it. The server half's own metrics
        (``finish``) go in the round row as they are."""
        client_rows = {r.cid: {"round": rnd, "kind": "client", "client": r.cid, "bytes_down": r.bytes_down,
                               "bytes_up": r.bytes_up, "seconds": r.seconds, "rejected": r.error} for r in replies}
        ok = [r for r in replies if r.message is not None]
        for r in ok:
            client_rows[r.cid].update(_readable(r.message.metrics))
        metrics = [r.message.metrics for r in ok]
        row: dict[str, Any] = {
            "round": rnd, "kind": "round", "clients": len(ctx.sampled), "rejected": len(replies) - len(ok),
            "bytes_down": sum(r.bytes_down for r in replies) + self._side_bytes[0],
            "bytes_up": sum(r.bytes_up for r in replies) + self._side_bytes[1],
        }
        row.update(_pooled(metrics))
        train_s = sum(m.get("train_seconds", 0.0) for m in metrics)
        row["tokens_per_s"] = row.get("train_tokens", 0) / train_s if train_s > 0 else 0.0
        row.update(server_metrics)
        return row, client_rows

    def eval_due(self, rnd: int) -> bool:
        k = self.cfg.eval.every
        return rnd == self.cfg.fl.rounds or (k > 0 and rnd % k == 0) or (rnd == 0 and k > 0)

    def evaluate(self, rnd: int, client_rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Loss/perplexity of the current adapter(s) on every eval client's val/test data."""
        splits = self.cfg.eval.splits
        ctx = self.context(rnd, [])
        ctx.config = {"round": rnd, "splits": list(splits)}
        side = list(self._side_bytes)  # what the algorithm's own exchanges move for the evaluation counts too
        replies = self.exchange("evaluate", self.algorithm.configure_evaluate(ctx))
        out: dict[str, Any] = {"eval_bytes_down": sum(r.bytes_down for r in replies) + self._side_bytes[0] - side[0],
                               "eval_bytes_up": sum(r.bytes_up for r in replies) + self._side_bytes[1] - side[1]}
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
            # FS-LLM reports personalised ("local") results as the unweighted mean of the clients
            vals = [v[f"{split}_loss"] for v in per_client.values() if f"{split}_loss" in v]
            if vals:
                out[f"{split}_loss_mean_of_clients"] = float(np.mean(vals))
        for cid, vals in per_client.items():
            client_rows.setdefault(cid, {"round": rnd, "kind": "client", "client": cid}).update(vals)
        return out

    def evaluate_tasks(self, rnd: int, row: dict[str, Any], client_rows: dict[str, dict[str, Any]]) -> None:
        """Benchmark tasks on the current adapter(s), when configured and due (it decides)."""
        if self.task_eval is None:
            return
        round_metrics, per_client = self.task_eval(rnd, self.sent_adapters())
        row.update(round_metrics)
        for cid, vals in per_client.items():
            client_rows.setdefault(cid, {"round": rnd, "kind": "client", "client": cid}).update(vals)

    def checkpoint(self, rnd: int, final: bool = False) -> None:
        # the clients are part of the run: a resumed deployment must wait for these, not for
        # whichever SuperNodes happen to be connected when it restarts
        # the adapters go into the checkpoint before ``latest`` names it (see save_checkpoint)
        sent = self.sent_adapters()
        tensors, meta = self.algorithm.state_dict()
        save_checkpoint(self.run_dir, rnd, tensors, self.store,
                        {"fingerprint": self.cfg.fingerprint(), "clients": list(self.train_clients),
                         "algorithm": self.algorithm.name, "algorithm_meta": meta},
                        keep=self.cfg.checkpoint.keep, then=lambda: self.save_adapters(rnd, sent, final))

    def run(self, start_round: int = 1) -> list[dict[str, Any]]:
        rows = []
        try:  # the logger (and its TensorBoard writer) is closed however the run ends: done, crashed, stopped by a hook
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
        finally:
            self.logger.close()
        return rows


def clients_per_round(c: int | float | None, n: int) -> int:
    """How many of ``n`` clients ``fl.clients_per_round`` samples each round."""
    if c is None:
        return n
    return max(1, math.ceil(c * n)) if isinstance(c, float) else min(int(c), n)


def _ppl(loss: float) -> float:
    """Perplexity of a mean token loss (capped at e^50: an untrained model must not overflow)."""
    return math.exp(min(loss, 50))


def _readable(metrics: dict[str, float]) -> dict[str, float]:
    """A client's metrics for its row: ``<x>_loss_sum`` with ``<x>_tokens`` becomes ``<x>_loss``."""
    out = {k: v for k, v in metrics.items() if not k.endswith("_loss_sum")}
    for k in metrics:
        if k.endswith("_loss_sum"):
            p = k[: -len("_loss_sum")]
            if metrics.get(f"{p}_tokens"):  # a partial reply is no KeyError (parsing pairs them)
                out[f"{p}_loss"] = metrics[k] / metrics[f"{p}_tokens"]
    return out


def _pooled(metrics: list[dict[str, float]]) -> dict[str, float]:
    """Round values of the clients' metrics: the training loss pooled over labelled tokens, loss
    sums over their token counts, counters summed, the rest averaged over those reporting them."""
    out: dict[str, float] = {}
    keys = sorted({k for m in metrics for k in m})
    pairs = [("train_loss", "train_label_tokens")] + [
        (k[: -len("_sum")], k[: -len("_loss_sum")] + "_tokens") for k in keys if k.endswith("_loss_sum")]
    for loss_key, count_key in pairs:
        total = sum(m[count_key] for m in metrics if m.get(count_key) and _has(m, loss_key, count_key))
        if total:
            num = sum(_value(m, loss_key, count_key) * m[count_key] for m in metrics
                      if m.get(count_key) and _has(m, loss_key, count_key))
            out[loss_key] = num / total
    for k in keys:
        if k.endswith("_loss_sum") or k == "train_loss":
            continue
        vals = [m[k] for m in metrics if k in m and math.isfinite(m[k])]
        if vals and k not in out:
            out[k] = sum(vals) if (k in _SUMMED or k.endswith("_tokens")) else sum(vals) / len(vals)
    return out


def _has(m: dict[str, float], loss_key: str, count_key: str) -> bool:
    raw = m.get(f"{loss_key}_sum", m.get(loss_key))
    return raw is not None and math.isfinite(raw)


def _value(m: dict[str, float], loss_key: str, count_key: str) -> float:
    """A client's mean loss: ``train_loss`` itself, or ``<x>_loss_sum / <x>_tokens``."""
    if f"{loss_key}_sum" in m:
        return m[f"{loss_key}_sum"] / m[count_key]
    return m[loss_key]
