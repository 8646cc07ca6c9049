"""The client half of a round: receive an adapter, train locally, send the update back.

One frozen base model (with its peft wrapper) is shared by every simulated client in a process
(FS-LLM's round-robin sharing): a client swaps its adapter tensors and optimizer state in, trains,
and swaps them out. What persists per client lives in a :class:`~fedtune.state.ClientStateStore`,
so the memory per extra client is its stored state, not another model. A networked client runs
exactly this class with a store of one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from fedtune.adapters import get_adapter_state, set_adapter_state, trainable_parameters
from fedtune.algorithms import Algorithm
from fedtune.codecs import Pipeline, build_pipeline
from fedtune.config import Config
from fedtune.messages import Message, encode
from fedtune.state import ClientStateStore, optimizer_from_state, optimizer_to_state
from fedtune.training import BatchStream, evaluate_loss, make_grad_scaler, make_optimizer, train_local
from fedtune.utils import derive_seed

if TYPE_CHECKING:
    from fedtune.distributed import Cluster


@dataclass
class ClientRuntime:
    """What all clients in one process share: the model and how to train it."""

    model: torch.nn.Module  # PeftModel over the frozen base
    pad_id: int
    cfg: Config
    device: torch.device
    algorithm: Algorithm
    store: ClientStateStore
    #: clustered mode: this process's place in the client's process group (see fedtune.distributed)
    cluster: Cluster | None = None

    # Codecs come from the config, so any transport that builds a runtime gets them unchanged.
    @cached_property
    def up_codec(self) -> Pipeline:
        return build_pipeline(self.cfg.comm, "up")

    @cached_property
    def sends_delta(self) -> bool:
        """Send the update as a difference from the received adapter whenever a lossy codec runs in
        either direction: small differences lose less to quantisation than whole weights, and the
        server adds them to its exact master copy, so downlink rounding never piles up."""
        return self.up_codec.lossy or build_pipeline(self.cfg.comm, "down").lossy


def steps_per_round(cfg: Config, num_train: int) -> int:
    t = cfg.train
    if t.local_epochs is None:
        return t.local_steps
    return max(1, math.ceil(t.local_epochs * num_train / (t.batch_size * t.grad_accum)))


class FedClient:
    """One client: its own tokenised splits plus the shared runtime."""

    def __init__(self, cid: str, rt: ClientRuntime, train=None, val=None, test=None):
        self.cid, self.rt = cid, rt
        self.splits = {"train": train, "val": val, "test": test}

    @property
    def num_train(self) -> int:
        return len(self.splits["train"]) if self.splits["train"] is not None else 0

    def adapter_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Names/shapes/dtypes of the adapter this client holds: what an instruction must carry."""
        return {n: (tuple(p.shape), torch.float32) for n, p in trainable_parameters(self.rt.model)}

    def fit(self, msg: Message) -> Message:
        """Train on the received adapter; return the new adapter tensors and metrics."""
        rt, cfg = self.rt, self.rt.cfg
        rnd = int(msg.config.get("round", 0))
        data = self.splits["train"]
        state = rt.store.get(self.cid)
        if rt.cluster is not None and rt.cluster.leader:
            # followers train on the same adapter and state (exact fp32 bytes; no local eval)
            job = Message(msg.tensors, config={k: v for k, v in msg.config.items() if k != "eval_local"})
            rt.cluster.dispatch(self.cid, encode(job), state.to_bytes())
        set_adapter_state(rt.model, msg.tensors)
        params = [p for _, p in trainable_parameters(rt.model)]
        optimizer = make_optimizer(params, cfg.train)
        opt_tensors = state.group("opt")
        if cfg.train.keep_optimizer_state and opt_tensors:
            optimizer_from_state(optimizer, opt_tensors, state.meta["opt"])
        stream = BatchStream(data.lengths, cfg.train.batch_size, derive_seed(cfg.seed, "data", self.cid),
                             cfg.train.group_by_length, **state.meta.get("stream", {}))
        steps = steps_per_round(cfg, len(data))
        # The LR schedule runs on the federation's progress, not on this client's own step count:
        # local step s of round r is step (r-1)*steps + s of rounds*steps, so every client follows
        # the same curve whether or not it was sampled in earlier rounds (with client sampling a
        # count of its own steps would never reach the end of a linear/cosine schedule).
        start = (max(rnd, 1) - 1) * steps
        extra = rt.algorithm.extra_loss(msg.tensors, state)
        scaler = None
        if cfg.train.precision == "fp16":
            # The loss scale is learned per client and kept in its state (so in checkpoints): a
            # fresh GradScaler every round would restart at 2^16 and skip steps finding it again.
            scaler = make_grad_scaler(cfg.train, rt.device, state.meta.get("scaler"))
        # Dropout and any other torch randomness: a seed of (run, round, client), so a resumed
        # run and an uninterrupted one draw the same numbers whatever the client order.
        torch.manual_seed(derive_seed(cfg.seed, "train", rnd, self.cid))
        stats = train_local(
            rt.model, data, stream, optimizer, cfg.train, steps=steps, start_step=start,
            total_steps=cfg.fl.rounds * steps, pad_id=rt.pad_id, device=rt.device,
            extra_loss=extra, scaler=scaler, parallel=rt.cluster.parallel if rt.cluster is not None else None,
        )
        local = get_adapter_state(rt.model)
        rt.algorithm.after_local_train(msg.tensors, local, state)
        update, codec_metrics = self._encode_update(local, msg.tensors, state)
        state.meta["stream"] = stream.state()
        if scaler is not None:
            state.meta["scaler"] = scaler.state_dict()
        if cfg.train.keep_optimizer_state:
            tensors, meta = optimizer_to_state(optimizer)
            state.set_group("opt", tensors)
            state.meta["opt"] = meta
        rt.store.put(self.cid, state)
        metrics = {
            "train_label_tokens": stats.label_tokens, "train_tokens": stats.tokens,
            "train_examples": stats.examples, "steps": stats.steps, "skipped_nonfinite": stats.skipped_nonfinite,
            "train_seconds": stats.seconds, "lr": stats.lr, "num_train": len(data),
            "step_seconds": stats.seconds / stats.steps if stats.steps else 0.0,
            "tokens_per_s": stats.tokens / stats.seconds if stats.seconds > 0 else 0.0,
        }
        if stats.label_tokens:  # else no loss: NaN is not a metric (messages reject it)
            metrics["train_loss"] = stats.loss
        metrics.update(codec_metrics)
        if msg.config.get("eval_local"):
            metrics.update(self._eval_splits(["val"], prefix="local_"))
        return Message(tensors=update, metrics=metrics, codec=rt.up_codec, delta=rt.sends_delta)

    def _encode_update(self, local: dict[str, torch.Tensor], received: dict[str, torch.Tensor],
                       state) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """What to send: the adapter itself, or its difference from ``received`` plus the error-
        feedback residual (what the lossy ``up`` codec dropped last time, kept in the client's state,
        hence in checkpoints). The residual becomes ``x - C(x)`` for the ``x`` sent now."""
        rt = self.rt
        if not rt.sends_delta:
            return local, {}
        x = {k: local[k] - received[k] for k in local}
        if not rt.up_codec.lossy:
            return x, {}
        ef = rt.cfg.comm.error_feedback
        if ef:
            residual = state.group("ef")
            if residual:
                x = {k: x[k] + residual[k] for k in x}
        sent = rt.up_codec.roundtrip(x)
        err = {k: x[k] - sent[k] for k in x}
        if ef:
            state.set_group("ef", err)
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in x.values()))
        lost = math.sqrt(sum(float(v.double().pow(2).sum()) for v in err.values()))
        return x, {"up_rel_error": lost / norm if norm > 0 else 0.0}

    def _eval_splits(self, splits: list[str], prefix: str = "") -> dict[str, float]:
        rt = self.rt
        out: dict[str, float] = {}
        for split in splits:
            data = self.splits.get(split)
            if data is None or len(data) == 0:
                continue
            loss_sum, n = evaluate_loss(rt.model, data, batch_size=rt.cfg.eval.batch_size, pad_id=rt.pad_id,
                                        device=rt.device, precision=rt.cfg.train.precision)
            out[f"{prefix}{split}_loss_sum"] = loss_sum
            out[f"{prefix}{split}_tokens"] = n
        return out

    def evaluate(self, msg: Message) -> Message:
        """Loss of the received adapter on this client's val/test splits (sums, for exact pooling)."""
        set_adapter_state(self.rt.model, msg.tensors)
        splits = msg.config.get("splits", ["val", "test"])
        return Message(metrics=self._eval_splits(splits))
