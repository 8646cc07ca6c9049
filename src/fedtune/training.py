"""Local training: one explicit loop (LitGPT ``fit`` / nanoGPT ``train.py`` style), plus loss eval.

Everything a client does with its data lives here: a seeded, resumable stream of length-grouped
batches; mixed precision with fp32 adapter weights; gradient accumulation with an exact
token-level mean; gradient clipping; a NaN/Inf guard that skips and counts; an LR schedule that
continues across rounds. Algorithm-specific terms (FedProx's proximal term, ...) come in as a
callable ``extra_loss(model) -> tensor`` from the algorithm's own file.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from fedtune import padding_free
from fedtune.config import TrainConfig
from fedtune.dropout import lora_input_casts_off, set_lora_dropout
from fedtune.errors import FedtuneError
from fedtune.hardware import resolve_precision
from fedtune.head_loss import chunked_head_applies, head_loss
from fedtune.lora_forward import folded_scales
from fedtune.utils import close_enough, derive_seed, eval_mode

if TYPE_CHECKING:
    from fedtune.distributed import DataParallel

log = logging.getLogger(__name__)

IGNORE = -100


class BatchStream:
    """Endless stream of batches (lists of example indices) over one dataset.

    Each epoch is a fresh seeded permutation; with ``group_by_length`` it is cut into mega-batches
    of 50 batches, each sorted by length (HF's ``LengthGroupedSampler`` idea), so a batch holds
    examples of similar length and little compute goes to padding; the batch order is then
    shuffled. ``state()``/``epoch,pos`` make the stream resumable across rounds and restarts.
    """

    MEGA = 50

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True,
                 epoch: int = 0, pos: int = 0):
        if len(lengths) == 0:
            raise ValueError("cannot stream batches from an empty dataset")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group = group_by_length
        self.epoch, self.pos = epoch, pos
        self._batches = self._epoch_batches(epoch)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng(derive_seed(self.seed, "epoch", epoch))
        perm = rng.permutation(len(self.lengths))
        bs = self.batch_size
        if not self.group or bs == 1:
            return [perm[i : i + bs].tolist() for i in range(0, len(perm), bs)]
        batches = []
        mega = bs * self.MEGA
        for i in range(0, len(perm), mega):
            chunk = perm[i : i + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[j : j + bs].tolist() for j in range(0, len(chunk), bs)]
        order = rng.permutation(len(batches))
        return [batches[k] for k in order]

    def __next__(self) -> list[int]:
        if self.pos >= len(self._batches):
            self.epoch, self.pos = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.pos]
        self.pos += 1
        return batch

    def __iter__(self):
        return self

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def collate(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int,
            device: torch.device | str = "cpu", pad_to: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example, rounded up to a multiple of ``pad_to``. Masks come
    from lengths, never from comparing ids with ``pad_id``."""
    n = -(-max(len(x) for x in input_ids) // pad_to) * pad_to
    ids = torch.full((len(input_ids), n), pad_id, dtype=torch.long)
    lab = torch.full((len(input_ids), n), IGNORE, dtype=torch.long)
    att = torch.zeros((len(input_ids), n), dtype=torch.long)
    for i, (x, y) in enumerate(zip(input_ids, labels)):
        ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
        att[i, : len(x)] = 1
    return {"input_ids": ids.to(device), "attention_mask": att.to(device), "labels": lab.to(device)}


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` at ``step`` of ``total_steps``: the federation's progress (local step
    s of round r is ``(r-1)*steps + s``), so it is never restarted per round and every client,
    sampled or not in earlier rounds, follows the same curve."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


#: fp16 loss scaling. torch's GradScaler starts at 2^16 and halves on every overflow, so a model
#: whose scaled gradients overflow below that skips one step per halving before it trains at all
#: (issue 13: 7 of 8 steps of a first round, adapter unchanged). 2^10 starts low enough for that
#: not to happen on the models tried, and high enough that small gradients survive fp16 (scaled by
#: 1024 a 1e-6 gradient is 1e-3, inside fp16's normal range, whose smallest value is 6e-5); the
#: scaler still doubles it after ``growth_interval`` clean steps (torch's default, 2000) and halves
#: it on an overflow.
DEFAULT_FP16_INIT_SCALE = 2.0**10
DEFAULT_FP16_GROWTH_INTERVAL = 2000


def make_grad_scaler(train_cfg: TrainConfig, device: torch.device | str, saved_state: dict | None = None
                     ) -> torch.amp.GradScaler:
    """The fp16 loss scaler of one client: a saved state (the scale it learned in earlier rounds,
    kept in its client state and checkpoints) wins; else ``train.fp16_init_scale`` and
    ``train.fp16_growth_interval`` (defaults above)."""
    from fedtune.errors import FedtuneError

    init = getattr(train_cfg, "fp16_init_scale", None)
    init = DEFAULT_FP16_INIT_SCALE if init is None else init
    growth = getattr(train_cfg, "fp16_growth_interval", None)
    growth = DEFAULT_FP16_GROWTH_INTERVAL if growth is None else growth
    if isinstance(init, bool) or not isinstance(init, (int, float)) or not (math.isfinite(init) and 1 <= init <= 2.0**24):
        raise FedtuneError(f"train.fp16_init_scale must be a number from 1 to 2^24 (16777216), got {init!r}")
    if isinstance(growth, bool) or not isinstance(growth, int) or not 1 <= growth <= 10**9:
        raise FedtuneError(f"train.fp16_growth_interval must be a whole number of steps from 1, got {growth!r}")
    dev = torch.device(device).type
    scaler = torch.amp.GradScaler(dev, init_scale=float(init), growth_interval=int(growth))
    if saved_state:
        scaler.load_state_dict(saved_state)
    return scaler


def autocast_context(precision: str, device: torch.device, model: torch.nn.Module | None = None):
    """bf16/fp16 autocast for the forward pass; the adapter weights themselves stay fp32.
    ``auto`` is resolved for ``device`` (:func:`fedtune.hardware.resolve_precision`). Given the
    ``model``, its LoRA layers also skip peft's cast of their input to fp32 inside the region
    (:func:`fedtune.dropout.lora_input_casts_off`: the same numbers without the fp32 copies)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if model is None:
        return torch.autocast(device_type=device.type, dtype=dtype)
    stack = ExitStack()
    stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
    stack.enter_context(lora_input_casts_off(model))
    return stack


@dataclass
class TrainStats:
    steps: int = 0
    examples: int = 0
    loss_sum: float = 0.0  # sum of token losses over labelled tokens
    label_tokens: int = 0
    tokens: int = 0  # real (non-padding) input tokens
    skipped_nonfinite: int = 0
    seconds: float = 0.0
    lr: float = 0.0  # the last step's learning rate
    lr_sum: float = 0.0  # over the steps applied (skipped ones excluded): what the weights moved by

    @property
    def applied(self) -> int:
        """Optimizer steps that changed the weights (not skipped as non-finite)."""
        return self.steps - self.skipped_nonfinite

    @property
    def loss(self) -> float:
        return self.loss_sum / self.label_tokens if self.label_tokens else float("nan")


def _n_label_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())  # causal LM: position t predicts t+1


def label_logits_supported(model: torch.nn.Module) -> bool:
    """Whether :func:`lm_loss` may run the LM head on labelled positions only for ``model``.

    Needs a forward whose ``logits_to_keep`` takes a 2-D boolean mask: transformers' models do
    from 5.21.0 on (``slice_logits_to_keep``); earlier ones take only an int or 1-D positions and
    fail on a mask (transformers >= 4.56 is allowed). The parameter's name alone says nothing
    about that, and remote-code models have their own forward, so :func:`keeps_logits`
    tries it once per model; without it the loss uses the full logits (same loss, more compute).
    Prompt-learning adapters (prefix/P-/prompt tuning) are excluded because peft prepends virtual
    tokens, which shifts every position."""
    cfgs = getattr(model, "peft_config", None) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in cfgs.values()):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ok = getattr(base, "_fedtune_masked_logits", None)
    if ok is None:
        ok = keeps_logits(model, torch.tensor([[False, True, True], [True, False, False]]))
        base._fedtune_masked_logits = ok  # a property of the model's code: probe once
        if not ok:
            log.info("%s does not take a boolean logits_to_keep mask (transformers < 5.21?): the loss "
                     "uses the full logits", type(base).__name__)
    return ok


@torch.no_grad()
def keeps_logits(model: torch.nn.Module, keep: torch.Tensor) -> bool:
    """Whether ``model(..., logits_to_keep=keep)`` on two 3-token rows returns exactly the kept
    positions' logits. ``keep`` is a boolean ``(2, 3)`` mask (logits flattened to ``(num_kept,
    vocab)``) or a ``(2, k)`` tensor of positions per row (logits ``(2, k, vocab)``; positions count
    any virtual tokens a prompt-learning adapter prepends). Older transformers take the parameter but
    index every row with the whole tensor, so the capability is tried, not read off its name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        if "logits_to_keep" not in inspect.signature(base.forward).parameters:
            return False
    except (TypeError, ValueError):  # a forward without a readable signature
        return False
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]], device=next(model.parameters()).device)
    keep = keep.to(ids.device)
    try:
        with eval_mode(model):  # no dropout: both calls must compute the same thing
            full = model(input_ids=ids).logits
            part = model(input_ids=ids, logits_to_keep=keep).logits
    except (IndexError, RuntimeError, TypeError, ValueError):  # how older indexing fails on it
        return False
    want = full[keep] if keep.dtype == torch.bool else torch.take_along_dim(full, keep[..., None], dim=1)
    # the same rows through the LM head, in another batch shape: equal up to rounding of its dtype
    return close_enough(part, want, max(torch.finfo(full.dtype).eps, 1e-5))


def lm_loss(forward: Callable, batch: dict[str, torch.Tensor], label_logits_only: bool,
            layout: padding_free.Layout | None = None) -> torch.Tensor:
    """Mean next-token loss over the labelled tokens of ``batch`` (HF's causal-LM loss).

    With ``label_logits_only`` the vocabulary projection runs only where position t predicts a
    labelled token t+1 (a boolean ``logits_to_keep`` mask): labels mask the prompt, so on
    instruction data most positions need no logits, and for a small model the LM head and its
    softmax over ~49k tokens are a large share of a step's compute and memory. The loss is the
    same mean over the same tokens. Neither transformers nor peft does this for training, so it
    is written here. Where the model's head is a plain frozen linear layer the kept positions go
    through :mod:`fedtune.head_loss` (row chunks, gradient taken in the forward), so not even the
    kept positions' logits exist at once. With a ``layout`` (:mod:`fedtune.padding_free`, label
    logits only, run inside ``padding_free.active(layout)``) the model runs on the batch's real
    tokens as one row; the kept positions and targets are the padded batch's, in the same order.
    """
    if not label_logits_only:
        return forward(**batch).loss
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][keep[:, :-1]]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if layout is not None:
        inputs, keep = padding_free.packed_inputs(batch, layout), layout.unpad(keep[..., None]).view(1, -1)
    model = forward.module if isinstance(forward, torch.nn.parallel.DistributedDataParallel) else forward
    if chunked_head_applies(model):
        return head_loss(forward, model, inputs, keep, targets)  # chunked: no full logits tensor
    out = forward(**inputs, logits_to_keep=keep)
    return F.cross_entropy(out.logits.float(), targets)


def set_gradient_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Switch transformers' gradient checkpointing of ``model``'s base on or off (train.gradient_checkpointing).

    Non-reentrant checkpointing: it needs no ``requires_grad`` on the inputs (the frozen embedding's
    output has none) and replays the RNG state, so dropout masks, and therefore the gradients, are
    the ones a run without it draws."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    active = any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())
    if on == active:
        return
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise FedtuneError(f"train.gradient_checkpointing: {type(base).__name__} cannot checkpoint its blocks "
                           "in transformers; set train.gradient_checkpointing=false")
    kwargs = {"use_reentrant": False}
    if on and hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x names
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def train_local(
    model: torch.nn.Module,
    data,  # TokenizedDataset: .input_ids, .labels
    stream: Iterator[list[int]],
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    *,
    steps: int,
    start_step: int,
    total_steps: int,
    pad_id: int,
    device: torch.device,
    extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    on_grads: Callable[[list[torch.nn.Parameter]], None] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[TrainStats], None] | None = None,
    parallel: DataParallel | None = None,
) -> TrainStats:
    """Run ``steps`` optimizer steps of local training and return what happened.

    ``stream`` yields each micro-batch's example indices (a :class:`BatchStream`, or any iterator).
    ``extra_loss(model)`` is added to the loss of every micro-batch, weighted like it (so once per
    step in all). ``on_grads(params)`` is called on each step whose gradients are finite, with the
    final gradients in ``p.grad`` (accumulated, all-reduced, unscaled) before clipping; it may
    change them in place (SCAFFOLD's correction).

    ``parallel`` (clustered mode, :mod:`fedtune.distributed`) spreads each step's examples over
    several processes: this process trains on its slice through the DDP-wrapped model, the loss is
    normalised by the token count of the *whole* step (summed over ranks), and DDP's mean of the
    gradients is undone (``* world``), so the update equals single-process training on the step.
    Every rank then runs every micro-batch's backward, even one without labels or with a
    non-finite loss, so no rank waits forever in the all-reduce; the NaN/Inf guard still skips
    the step on all ranks alike (the all-reduced gradients are non-finite everywhere).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    world = parallel.world if parallel is not None else 1
    forward = parallel.model if parallel is not None else model
    label_only = label_logits_supported(model)
    packs = cfg.padding_free and label_only and padding_free.supported(model)
    window = padding_free.window_of(model)
    stats = TrainStats()
    set_lora_dropout(model, cfg.fast_dropout)
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    model.train()
    t0 = time.perf_counter()
    for i in range(steps):
        lr = cfg.lr * lr_factor(start_step + i, cfg, total_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        micro = [next(stream) for _ in range(cfg.grad_accum)]
        masked = False
        if parallel is not None:
            micro, masked = parallel.shard(micro, cfg.batch_size)
        batches = [collate([data.input_ids[j] for j in b], [data.labels[j] for j in b], pad_id, device,
                           cfg.pad_to_multiple)
                   for b in micro]
        if masked:
            batches[0]["labels"].fill_(IGNORE)
        counts = [_n_label_tokens(b["labels"]) for b in batches]
        total = sum(counts)
        if parallel is not None:
            total = int(parallel.all_sum([total])[0])
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_tokens, step_examples = 0.0, 0, 0
        finite = total > 0
        unscaled = False  # whether the scaler recorded this step's inf checks (it may update)
        for j, (batch, n) in enumerate(zip(batches, counts)):
            if n == 0 and parallel is None:
                continue
            sync = parallel.no_sync(last=j == len(batches) - 1) if parallel is not None else nullcontext()
            layout = padding_free.plan(batch["attention_mask"], window) if packs and n else None
            # the layout and the folded LoRA scales also serve a checkpointed backward's recompute
            with sync, padding_free.active(layout), folded_scales(model):
                with autocast_context(cfg.precision, device, model):
                    if n == 0:  # clustered mode: keep in step with the other ranks, contribute nothing
                        mean = forward(**batch).logits.float().sum() * 0.0
                    else:
                        mean = lm_loss(forward, batch, label_only, layout).float()
                if n:
                    # Exact token-level mean over the whole accumulation group (all ranks).
                    loss = mean * (n / total * world)
                    if extra_loss is not None:
                        loss = loss + extra_loss(model) * (n / total * world)
                else:
                    loss = mean
                if not torch.isfinite(loss):
                    finite = False
                    if parallel is None:
                        break
                (scaler.scale(loss) if scaler is not None else loss).backward()
            if n:
                step_loss += float(mean.detach()) * n
                step_tokens += int(batch["attention_mask"].sum())
                step_examples += batch["input_ids"].shape[0]
        if parallel is not None:
            step_loss, step_tokens, step_examples = parallel.all_sum([step_loss, step_tokens, step_examples])
        stats.tokens += int(step_tokens)
        stats.examples += int(step_examples)
        if finite:
            if scaler is not None:
                scaler.unscale_(optimizer)
                unscaled = True
            finite = _grads_finite_then_clip(params, cfg.max_grad_norm, on_grads)
        if finite:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            stats.loss_sum += step_loss
            stats.label_tokens += total
            stats.lr_sum += lr
        else:
            # NaN/Inf guard: drop this step's gradients, leave weights untouched, count it.
            optimizer.zero_grad(set_to_none=True)
            stats.skipped_nonfinite += 1
            # fp16: overflowing *gradients* (found by unscale_) back the loss scale off, as in
            # torch.amp. A non-finite *loss* stops the step before the scaler sees it: the forward
            # overflowed, which the scale cannot help, and ``update()`` without recorded inf checks
            # is an error (GradScaler asserts), so the scale is left as it is.
            if unscaled:
                scaler.update()
        stats.steps += 1
        stats.lr = lr
        if on_step is not None:
            on_step(stats)
    optimizer.zero_grad(set_to_none=True)
    stats.seconds = time.perf_counter() - t0
    model.eval()
    return stats


def _grads_finite_then_clip(params: list[torch.nn.Parameter], max_norm: float | None,
                            on_grads: Callable[[list[torch.nn.Parameter]], None] | None) -> bool:
    """Whether the step's gradients are finite; if so, hand them to ``on_grads`` and clip them."""
    if on_grads is None and max_norm is not None:  # one pass: clip_grad_norm_ returns the norm
        return bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
    if not torch.isfinite(norm):
        return False
    if on_grads is not None:
        on_grads(params)
        if max_norm is not None:
            return bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    return True


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, data, *, batch_size: int, pad_id: int, device: torch.device,
                  precision: str = "fp32") -> tuple[float, int]:
    """Sum of token losses and number of labelled tokens of ``data`` (batched by length)."""
    model.eval()
    label_only = label_logits_supported(model)
    order = sorted(range(len(data.input_ids)), key=lambda j: len(data.input_ids[j]))
    loss_sum, n_tok = 0.0, 0
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        batch = collate([data.input_ids[j] for j in idx], [data.labels[j] for j in idx], pad_id, device)
        n = _n_label_tokens(batch["labels"])
        if n == 0:
            continue
        with autocast_context(precision, device, model):
            loss = lm_loss(model, batch, label_only)
        loss_sum += float(loss.float()) * n
        n_tok += n
    return loss_sum, n_tok
