"""Training the emulator against the full model on the server's public data (knowledge distillation).

The loss is the offsite-tuning code's: with h_T the full model's hidden state after its last middle
block and h_S the emulator's after its last kept middle block (same input: the two share the bottom
blocks),

    loss = kd_weight · Σ m·(h_T − h_S)² / Σ m·h_T²  +  lm_weight · LM(emulator),

m the attention mask (padding does not count). Both hidden states are read by forward hooks on
the two blocks (no architecture's ``output_hidden_states`` convention is involved), and the teacher
stops right after its middle: its top blocks and LM head are never run.

* :func:`distill` — before federation (offsite-tuning): the emulator's kept middle blocks are
  trained, its adapter blocks are the full model's own and stay frozen.
* :class:`Realigner` — every round (FedBiOT): a low-rank change W₀ + B·A of the emulator's middle
  weights is trained with the current global adapter plugged into both models and frozen. Only the
  factors travel (group ``realign``), and every holder of the emulator applies them the same way
  (:func:`apply_lowrank`), so the server's emulator and the clients' stay identical.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedtune.errors import FedtuneError
from fedtune.models.layout import Layout
from fedtune.offsite.emulator import block_index, blocks_of, plain_name, plain_params
from fedtune.offsite.plan import Plan
from fedtune.training import BatchStream, collate, label_logits_supported, lm_loss
from fedtune.utils import derive_seed

if TYPE_CHECKING:
    from fedtune.config import Config
    from fedtune.offsite.config import _KD

log = logging.getLogger(__name__)
TensorDict = dict[str, torch.Tensor]


def kd_loss(h_t: torch.Tensor, h_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ m·(h_T − h_S)² / Σ m·h_T²: the offsite-tuning MSE normalised by the teacher's mean square
    (the masked means share their denominator, which cancels)."""
    m = mask.to(h_t.dtype)[..., None]
    return ((h_t.float() - h_s.float()) ** 2 * m).sum() / (h_t.float() ** 2 * m).sum().clamp_min(1e-12)


class _Stop(Exception):
    pass


@contextlib.contextmanager
def capture(block: torch.nn.Module, *, stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """The output hidden state of ``block`` in the next forward (``stop``: end the forward there)."""
    got: dict[str, torch.Tensor] = {}

    def hook(_m, _args, out):
        got["h"] = out[0] if isinstance(out, tuple) else out
        if stop:
            raise _Stop

    handle = block.register_forward_hook(hook)
    try:
        yield got
    finally:
        handle.remove()


@torch.no_grad()
def teacher_hidden(full: torch.nn.Module, plan: Plan, layout: Layout, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The full model's hidden state after its last middle block (the forward stops there)."""
    block = blocks_of(full, layout)[plan.num_layers - plan.top - 1]
    with capture(block, stop=True) as got:
        try:
            full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        except _Stop:
            pass
    return got["h"].detach()


def kd_step_loss(forward: Callable, student: torch.nn.Module, h_t: torch.Tensor, plan: Plan, layout: Layout,
                 batch: dict[str, torch.Tensor], kd: _KD, label_only: bool) -> tuple[torch.Tensor, float, float]:
    """The KD + LM loss of one batch for the emulator ``student`` run through ``forward``. Without an
    LM term (``lm_weight: 0``) the student's forward stops after its middle, as the teacher's does."""
    block = blocks_of(student, layout)[plan.bottom + len(plan.kept) - 1]
    if kd.lm_weight == 0:
        with capture(block, stop=True) as got:
            try:
                forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            except _Stop:
                pass
        lm = torch.zeros(())
    else:
        with capture(block) as got:
            lm = lm_loss(forward, batch, label_only).float()
    kdl = kd_loss(h_t, got["h"], batch["attention_mask"])
    loss = kd.kd_weight * kdl + kd.lm_weight * lm
    return loss, float(kdl.detach()), float(lm.detach())


def public_data(cfg: Config, kd: _KD, tokenizer, what: str):
    """The server's public data for ``what`` (``distill``/``realign``): a seeded sample of
    ``max_records`` records of ``kd.source``, tokenised with the run's template and lengths. A
    missing file is the data layer's clear error (where it was looked for, the URL, the variable)."""
    from fedtune.data import load_source, tokenize_records

    data_cfg = cfg.data.model_copy(update={"fields": {}})
    try:
        records = load_source(kd.source, data_cfg)
    except FedtuneError as e:
        raise FedtuneError(f"offsite.{what}.source: {e}") from None
    if kd.max_records is not None and len(records) > kd.max_records:
        rng = np.random.default_rng(derive_seed(cfg.seed, "offsite", what, "records"))
        records = [records[i] for i in sorted(rng.choice(len(records), kd.max_records, replace=False).tolist())]
    ds = tokenize_records(records, tokenizer, cfg.data)
    if len(ds) == 0:
        raise FedtuneError(f"offsite.{what}.source '{kd.source}' has no example left after tokenisation")
    return ds


def _batches(data, stream: BatchStream, pad_id: int, device) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        idx = next(stream)
        yield collate([data.input_ids[j] for j in idx], [data.labels[j] for j in idx], pad_id, device)


def distill(student: torch.nn.Module, full: torch.nn.Module, plan: Plan, layout: Layout, data, cfg: Config,
            pad_id: int, device, echo=log.info) -> dict[str, float]:
    """Train the emulator's kept middle blocks (in place) to reproduce the full model's middle.
    Seeded and deterministic; draws nothing from the global RNG."""
    d = cfg.offsite.distill
    blocks = blocks_of(student, layout)
    params = [p for j in plan.middle_blocks() for p in blocks[j].parameters()]
    dtypes = [p.dtype for p in params]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=d.lr, weight_decay=0.0)
    stream = BatchStream(data.lengths, d.batch_size, derive_seed(cfg.seed, "offsite", "distill", "data"), True)
    batches = _batches(data, stream, pad_id, device)
    label_only = label_logits_supported(student)
    kd_sum = lm_sum = 0.0
    student.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "offsite", "distill", "dropout"))
        for step in range(d.steps):
            batch = next(batches)
            h_t = teacher_hidden(full, plan, layout, batch)
            loss, kdl, lml = kd_step_loss(student, student, h_t, plan, layout, batch, d, label_only)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 1.0)):
                continue  # a non-finite step changes nothing
            opt.step()
            kd_sum, lm_sum = kd_sum + kdl, lm_sum + lml
            if step == 0 or (step + 1) % max(1, d.steps // 5) == 0:
                echo(f"  distill step {step + 1}/{d.steps}: kd {kdl:.4f}, lm {lml:.4f}")
    student.eval()
    for p, dt in zip(params, dtypes):
        p.requires_grad_(False)
        p.data = p.data.to(dt)
    return {"distill_kd": kd_sum / max(d.steps, 1), "distill_lm": lm_sum / max(d.steps, 1)}


# ---- per-round re-alignment (FedBiOT) --------------------------------------------------------
def lowrank_targets(model: torch.nn.Module, plan: Plan, layout: Layout, suffixes: tuple[str, ...]) -> list[str]:
    """Bare names of the 2-D weights of the emulator's middle blocks whose module is a LoRA target."""
    middle = set(plan.middle_blocks())
    out = []
    for n, p in plain_params(model).items():
        if p.dim() != 2 or not n.endswith(".weight"):
            continue
        if block_index(n, layout) in middle and n.split(".")[-2] in suffixes:
            out.append(n)
    return sorted(out)


def lowrank_spec(model: torch.nn.Module, names: list[str], r: int) -> dict[str, tuple[int, ...]]:
    """The realign group's tensors: ``<weight>.A`` (r × cols) and ``<weight>.B`` (rows × r)."""
    params = plain_params(model)
    out: dict[str, tuple[int, ...]] = {}
    for n in names:
        rows, cols = params[n].shape
        out[f"{n}.A"], out[f"{n}.B"] = (r, cols), (rows, r)
    return out


def lowrank_value(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W₀ + B·A in W₀'s dtype: the same expression on the server and every client."""
    return (w0.float() + b.float() @ a.float()).to(w0.dtype)


@torch.no_grad()
def apply_lowrank(model: torch.nn.Module, base: TensorDict, factors: TensorDict) -> None:
    """Set each re-aligned weight of ``model`` to W₀ + B·A (W₀ from ``base``, never accumulated)."""
    params = plain_params(model)
    for n, w0 in base.items():
        params[n].copy_(lowrank_value(w0, factors[f"{n}.A"], factors[f"{n}.B"]))


class Realigner:
    """FedBiOT's re-alignment of the server's emulator, ``offsite.realign.steps`` per round.

    State (checkpointed through the algorithm's ``state_dict``): the factors, AdamW's moments, the
    position in the public data. Randomness comes from seeds of (run, round), so a resumed run
    re-aligns exactly as an uninterrupted one."""

    def __init__(self, emulator: torch.nn.Module, full: torch.nn.Module, plan: Plan, layout: Layout, cfg: Config,
                 data, pad_id: int, device, suffixes: tuple[str, ...]):
        self.emulator, self.full, self.plan, self.layout, self.cfg = emulator, full, plan, layout, cfg
        self.data, self.pad_id, self.device = data, pad_id, device
        r = cfg.offsite.realign
        self.names = lowrank_targets(emulator, plan, layout, suffixes)
        if not self.names:
            raise FedtuneError(f"offsite.realign: the emulator's middle blocks have no weights of modules {suffixes}")
        params = plain_params(emulator)
        self.base = {n: params[n].detach().clone() for n in self.names}  # W₀: the emulator file's weights
        real = {plain_name(n): n for n, _ in emulator.named_parameters()}  # bare name -> the model's own
        self.real = {n: real[n] for n in self.names}
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "offsite", "realign", "init"))
        self.factors: dict[str, torch.nn.Parameter] = {}
        for n in self.names:
            rows, cols = self.base[n].shape
            self.factors[f"{n}.A"] = torch.nn.Parameter(torch.randn(r.r, cols, generator=gen) / math.sqrt(cols))
            self.factors[f"{n}.B"] = torch.nn.Parameter(torch.zeros(rows, r.r))
        self.opt = torch.optim.AdamW(list(self.factors.values()), lr=r.lr, weight_decay=0.0)
        self.stream = BatchStream(data.lengths, r.batch_size, derive_seed(cfg.seed, "offsite", "realign", "data"), True)

    def spec(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.factors.items()}

    def tensors(self) -> TensorDict:
        return {k: v.detach().clone() for k, v in self.factors.items()}

    def apply(self, model: torch.nn.Module | None = None) -> None:
        apply_lowrank(model if model is not None else self.emulator, self.base, self.tensors())

    def run(self, rnd: int, plug: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:
        """The round's re-alignment steps; ``plug()`` puts the current global adapter into both models
        (the emulator, and the full model as teacher) for the duration."""
        from torch.func import functional_call

        r = self.cfg.offsite.realign
        kd_sum = lm_sum = 0.0
        with plug(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.cfg.seed, "offsite", "realign", rnd))
            model = self.emulator
            label_only = label_logits_supported(model)
            model.train()
            batches = _batches(self.data, self.stream, self.pad_id, self.device)
            for _ in range(r.steps):
                batch = next(batches)
                h_t = teacher_hidden(self.full, self.plan, self.layout, batch)
                overrides = {self.real[n]: self.base[n].float() + self.factors[f"{n}.B"] @ self.factors[f"{n}.A"]
                             for n in self.names}

                def forward(**kw):
                    return functional_call(model, overrides, args=(), kwargs=kw)

                loss, kdl, lml = kd_step_loss(forward, model, h_t, self.plan, self.layout, batch, r, label_only)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                params = list(self.factors.values())
                if torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 1.0)):
                    self.opt.step()
                kd_sum, lm_sum = kd_sum + kdl, lm_sum + lml
            model.eval()
        self.apply()
        return {"realign_kd": kd_sum / max(r.steps, 1), "realign_lm": lm_sum / max(r.steps, 1)}

    def state(self) -> tuple[TensorDict, dict[str, Any]]:
        from fedtune.state import optimizer_to_state

        opt_t, opt_m = optimizer_to_state(self.opt)
        return {**{f"f/{k}": v for k, v in self.tensors().items()}, **{f"o/{k}": v for k, v in opt_t.items()}}, \
            {"opt": opt_m, "stream": self.stream.state()}

    def load(self, tensors: TensorDict, meta: dict[str, Any]) -> None:
        from fedtune.state import optimizer_from_state

        with torch.no_grad():
            for k, p in self.factors.items():
                p.copy_(tensors[f"f/{k}"])
        opt_t = {k[2:]: v for k, v in tensors.items() if k.startswith("o/")}
        if meta.get("opt") and opt_t:
            optimizer_from_state(self.opt, opt_t, meta["opt"])
        s = meta.get("stream") or {}
        self.stream = BatchStream(self.data.lengths, self.cfg.offsite.realign.batch_size,
                                  derive_seed(self.cfg.seed, "offsite", "realign", "data"), True, **s)
        self.apply()

