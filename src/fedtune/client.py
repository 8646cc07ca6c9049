"""The client half of a round: receive an instruction, run the algorithm's local procedure, reply.

One frozen base model (with its peft wrapper) is shared by every simulated client in a process
(FS-LLM's round-robin sharing): a client swaps its adapter tensors and optimizer state in, trains,
and swaps them out. What persists per client lives in a :class:`~fedtune.state.ClientStateStore`,
so the memory per extra client is its stored state, not another model. A networked client runs
exactly this class with a store of one.

The procedure itself belongs to the algorithm (:meth:`~fedtune.algorithms.base.Algorithm.client_fit`);
it is built from the parts a :class:`ClientContext` gives it. :class:`FedClient` does what every
procedure needs around it: load and store the client's state, start clustered-mode followers on
the same inputs, evaluate the local adapter when asked, and turn the result into a reply message
(:class:`~fedtune.payload.Wire`: differences, codecs, error feedback).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from fedtune.adapters import get_adapter_state, set_adapter_state, trainable_parameters
from fedtune.algorithms import Algorithm
from fedtune.algorithms.base import Spec, TensorDict
from fedtune.codecs.base import TensorSpec
from fedtune.config import Config
from fedtune.messages import Message, encode
from fedtune.payload import Wire, flat_spec
from fedtune.state import ClientState, ClientStateStore, optimizer_from_state, optimizer_to_state
from fedtune.training import (BatchStream, TrainStats, autocast_context, collate, evaluate_loss, label_logits_supported,
                              lm_loss, lr_factor, make_grad_scaler, make_optimizer,
                              train_local)
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
    def wire(self) -> Wire:
        return Wire(self.cfg.comm, self.algorithm.groups)


def steps_per_round(cfg: Config, num_train: int) -> int:
    t = cfg.train
    if t.local_epochs is None:
        return t.local_steps
    return max(1, math.ceil(t.local_epochs * num_train / (t.batch_size * t.grad_accum)))


class ClientContext:
    """The parts a local procedure is built from, for one client in one exchange.

    * the adapter in the shared model: :meth:`set_adapter`, :meth:`adapter`, :meth:`params`;
    * :meth:`train`: the local training loop (``fedtune.training.train_local``: mixed precision,
      exact token-level accumulation, NaN guard, the run's LR schedule, clustered mode) with a loss
      term and a gradient hook, on this client's persistent data stream and optimizer state;
    * :meth:`evaluate`: loss sums on this client's splits;
    * :meth:`next_batch` / :meth:`loss` for procedures without a backward pass (zeroth order);
    * :attr:`state`: this client's persistent :class:`~fedtune.state.ClientState` (saved after the
      exchange, so in every checkpoint); :attr:`options`: the algorithm's options.
    """

    def __init__(self, client: FedClient, config: dict[str, Any], state: ClientState):
        self.client, self.rt, self.cfg = client, client.rt, client.rt.cfg
        self.cid = client.cid
        self.config = config
        self.round = int(config.get("round", 0))
        self.state = state
        self.options = client.rt.algorithm.options
        self._stream: BatchStream | None = None

    # ---- the data ------------------------------------------------------------------------
    @property
    def num_train(self) -> int:
        return self.client.num_train

    @property
    def stream(self) -> BatchStream:
        """This client's endless, seeded, resumable stream of training batches (its position is
        kept in the client state, so every pass of every round continues where the last stopped)."""
        if self._stream is None:
            t = self.cfg.train
            self._stream = BatchStream(self.client.splits["train"].lengths, t.batch_size,
                                       derive_seed(self.cfg.seed, "data", self.cid), t.group_by_length,
                                       **self.state.meta.get("stream", {}))
        return self._stream

    def steps(self) -> int:
        """Optimizer steps per round (``train.local_steps``, or ``local_epochs`` of this client's data)."""
        return steps_per_round(self.cfg, self.num_train)

    # ---- the adapter ----------------------------------------------------------------------
    def params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The adapter's trainable parameters (names as in the messages), in a fixed order."""
        return trainable_parameters(self.rt.model)

    def adapter_spec(self) -> dict[str, TensorSpec]:
        return {n: TensorSpec(tuple(p.shape), torch.float32) for n, p in self.params()}

    def set_adapter(self, tensors: TensorDict, *, partial: bool = False) -> None:
        """Copy ``tensors`` into the model's adapter (all of it, or with ``partial`` just those named)."""
        if partial:
            params = dict(self.params())
            with torch.no_grad():
                for k, t in tensors.items():
                    params[k].copy_(t)
            return
        set_adapter_state(self.rt.model, tensors)

    def adapter(self) -> TensorDict:
        """A copy of the adapter's tensors (CPU, fp32)."""
        return get_adapter_state(self.rt.model)

    # ---- training -------------------------------------------------------------------------
    def train(self, *, steps: int | None = None, extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
              on_grads: Callable[[list[torch.nn.Parameter]], None] | None = None, optimizer: str = "opt",
              batches: Iterator[list[int]] | None = None, lr: float | None = None) -> TrainStats:
        """``steps`` optimizer steps (default :meth:`steps`) of local training on the adapter now in
        the model. ``extra_loss(model)`` is added to each step's loss (FedProx's proximal term);
        ``on_grads(params)`` sees each applied step's final gradients — after gradient accumulation,
        the clustered all-reduce and fp16 unscaling, before clipping — and may change them in place
        (SCAFFOLD's correction). ``optimizer`` names the optimizer (and fp16 loss scale) kept in
        the client's state between rounds: a second adapter trained in the same round (Ditto's
        personal one) uses its own. ``batches``: micro-batches to use instead of the data stream
        (pFedMe's inner loop on one batch). ``lr``: this pass's peak learning rate instead of
        ``train.lr`` (the schedule still applies; a per-client setting from the instruction, FedEx)."""
        cfg, rt = self.cfg, self.rt
        tcfg = cfg.train if lr is None else cfg.train.model_copy(update={"lr": float(lr)})
        params = [p for _, p in self.params()]
        opt = make_optimizer(params, tcfg)
        saved = self.state.group(optimizer)
        if cfg.train.keep_optimizer_state and saved:
            optimizer_from_state(opt, saved, self.state.meta[optimizer])
        steps = self.steps() if steps is None else steps
        per_round = self.steps()
        # The LR schedule runs on the federation's progress, not on this client's own step count:
        # local step s of round r is step (r-1)*steps + s of rounds*steps, so every client follows
        # the same curve whether or not it was sampled in earlier rounds (with client sampling a
        # count of its own steps would never reach the end of a linear/cosine schedule).
        start = (max(self.round, 1) - 1) * per_round
        scaler = self._scaler(optimizer)
        # Dropout and any other torch randomness: a seed of (run, round, client[, optimizer]), so a
        # resumed run and an uninterrupted one draw the same numbers whatever the client order.
        parts = (cfg.seed, "train", self.round, self.cid) + (() if optimizer == "opt" else (optimizer,))
        torch.manual_seed(derive_seed(*parts))
        stats = train_local(
            rt.model, self.client.splits["train"], batches if batches is not None else self.stream, opt, tcfg,
            steps=steps, start_step=start, total_steps=cfg.fl.rounds * per_round, pad_id=rt.pad_id, device=rt.device,
            extra_loss=extra_loss, on_grads=on_grads, scaler=scaler,
            parallel=rt.cluster.parallel if rt.cluster is not None else None,
        )
        if scaler is not None:
            self.state.meta["scaler" if optimizer == "opt" else f"scaler:{optimizer}"] = scaler.state_dict()
        if cfg.train.keep_optimizer_state:
            tensors, meta = optimizer_to_state(opt)
            self.state.set_group(optimizer, tensors)
            self.state.meta[optimizer] = meta
        return stats

    def _scaler(self, optimizer: str) -> torch.amp.GradScaler | None:
        if self.cfg.train.precision != "fp16":
            return None
        # The loss scale is learned per client and kept in its state (so in checkpoints): a fresh
        # GradScaler every round would restart at 2^16 and skip steps finding it again.
        saved = self.state.meta.get("scaler" if optimizer == "opt" else f"scaler:{optimizer}")
        return make_grad_scaler(self.cfg.train, self.rt.device, saved)

    def lr_at(self, step_in_round: int) -> float:
        """The learning rate of this round's local step ``step_in_round`` (the run's schedule)."""
        per_round = self.steps()
        return self.cfg.train.lr * lr_factor((max(self.round, 1) - 1) * per_round + step_in_round, self.cfg.train,
                                             self.cfg.fl.rounds * per_round)

    # ---- no backward pass -----------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next training micro-batch from the stream, collated on the device."""
        data = self.client.splits["train"]
        idx = next(self.stream)
        return collate([data.input_ids[j] for j in idx], [data.labels[j] for j in idx], self.rt.pad_id, self.rt.device)

    @torch.no_grad()
    def loss(self, batch: dict[str, torch.Tensor]) -> float:
        """Mean token loss of the model as it is now on ``batch`` (no gradients, no dropout)."""
        model = self.rt.model
        was = model.training
        model.eval()
        try:
            with autocast_context(self.cfg.train.precision, self.rt.device):
                return float(lm_loss(model, batch, label_logits_supported(model)).float())
        finally:
            model.train(was)

    # ---- evaluation and metrics ------------------------------------------------------------------
    def evaluate(self, splits: list[str], prefix: str = "") -> dict[str, float]:
        """``<prefix><split>_loss_sum`` and ``<prefix><split>_tokens`` of the adapter now in the model."""
        rt = self.rt
        out: dict[str, float] = {}
        for split in splits:
            data = self.client.splits.get(split)
            if data is None or len(data) == 0:
                continue
            loss_sum, n = evaluate_loss(rt.model, data, batch_size=self.cfg.eval.batch_size, pad_id=rt.pad_id,
                                        device=rt.device, precision=self.cfg.train.precision)
            out[f"{prefix}{split}_loss_sum"] = loss_sum
            out[f"{prefix}{split}_tokens"] = n
        return out

    def fit_metrics(self, stats: TrainStats) -> dict[str, float]:
        """The standard metrics of a training pass (what the round table and metrics.jsonl show)."""
        metrics = {
            "train_label_tokens": stats.label_tokens, "train_tokens": stats.tokens,
            "train_examples": stats.examples, "steps": stats.steps, "skipped_nonfinite": stats.skipped_nonfinite,
            "train_seconds": stats.seconds, "lr": stats.lr, "num_train": self.num_train,
            "step_seconds": stats.seconds / stats.steps if stats.steps else 0.0,
            "tokens_per_s": stats.tokens / stats.seconds if stats.seconds > 0 else 0.0,
        }
        if stats.label_tokens:  # else no loss: NaN is not a metric (messages reject it)
            metrics["train_loss"] = stats.loss
        return metrics


class FedClient:
    """One client: its own tokenised splits plus the shared runtime."""

    def __init__(self, cid: str, rt: ClientRuntime, train=None, val=None, test=None):
        self.cid, self.rt = cid, rt
        self.splits = {"train": train, "val": val, "test": test}

    @property
    def num_train(self) -> int:
        return len(self.splits["train"]) if self.splits["train"] is not None else 0

    def context(self, config: dict[str, Any] | None = None, state: ClientState | None = None) -> ClientContext:
        return ClientContext(self, dict(config or {}), state if state is not None else self.rt.store.get(self.cid))

    def instruction_spec(self, kind: str) -> dict[str, TensorSpec]:
        """What an instruction of ``kind`` to this client may hold (the algorithm's client half says)."""
        spec: Spec = self.rt.algorithm.instruction_spec(self.context(), kind)
        return flat_spec(spec)

    def fit(self, msg: Message) -> Message:
        """Run the algorithm's local procedure on a parsed fit instruction; the reply message."""
        rt = self.rt
        state = rt.store.get(self.cid)
        if rt.cluster is not None and rt.cluster.leader:
            # followers run the same procedure on the same instruction and state (exact bytes; no
            # evaluation of the local adapter: that is this process's job)
            job = Message(msg.tensors, config={k: v for k, v in msg.config.items() if k != "eval_local"})
            rt.cluster.dispatch(self.cid, encode(job), state.to_bytes())
        ins = rt.wire.read_instruction(msg)
        c = ClientContext(self, ins.config, state)
        result = rt.algorithm.client_fit(c, ins)
        if ins.config.get("eval_local"):  # the adapter the procedure left in the model
            result.metrics.update(c.evaluate(["val"], prefix="local_"))
        if c._stream is not None:
            state.meta["stream"] = c._stream.state()
        reply = rt.wire.result(result, ins, state)
        rt.store.put(self.cid, state)
        return reply

    def evaluate(self, msg: Message) -> Message:
        """Loss of the instructed adapter on this client's val/test splits (sums, for exact pooling)."""
        ins = self.rt.wire.read_instruction(msg)
        return Message(metrics=self.rt.algorithm.client_evaluate(self.context(ins.config), ins))

    def exchange(self, kind: str, msg: Message) -> Message:
        """An algorithm's own message kind (key agreement, unmasking, ...)."""
        rt = self.rt
        state = rt.store.get(self.cid)
        ins = rt.wire.read_instruction(msg)
        result = rt.algorithm.client_exchange(kind, ClientContext(self, ins.config, state), ins)
        reply = rt.wire.result(result, ins, state)
        rt.store.put(self.cid, state)
        return reply
