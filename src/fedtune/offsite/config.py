"""The ``offsite`` config section (docs/offsite.md, docs/configuration.md).

Kept torch-free and free of fedtune imports so :mod:`fedtune.config` can include it: these classes
behave like the other sections (typed, unknown keys rejected with the closest valid one).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _KD(_Section):
    """Training of (part of) the emulator against the full model on the server's own public data:
    loss = kd_weight·mean((h_T − h_S)²)/mean(h_T²) + lm_weight·LM, with h_T the full model's hidden
    state after its last middle block and h_S the emulator's after its last kept block (the
    offsite-tuning code's KD loss)."""

    #: optimizer steps (``distill``: in all, before the first round; ``realign``: every round); 0: off.
    steps: int = Field(default=0, ge=0)
    lr: float = Field(default=1e-4, gt=0, allow_inf_nan=False)
    batch_size: int = Field(default=4, ge=1)
    #: the server's public data: a built-in source (``alpaca``, ``dolly``, ...) or a JSON/JSONL/CSV
    #: file, looked up like ``data.source`` (``data.data_dir``, ``$FEDTUNE_DATA_DIR``, the cache).
    source: str | None = None
    #: records used: a seeded sample of the source (``null``: all).
    max_records: int | None = Field(default=1000, ge=1)
    #: the offsite-tuning scripts' weights (OPT-1.3B: kd 30, lm 1).
    kd_weight: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    lm_weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _needs_data(self):
        if self.steps and not self.source:
            raise ValueError("steps > 0 needs a source: the server's public data (e.g. source: alpaca)")
        if self.steps and self.kd_weight + self.lm_weight <= 0:
            raise ValueError("kd_weight + lm_weight must be positive when steps > 0")
        return self


class DistillConfig(_KD):
    """Distillation of the emulator's kept middle blocks before federation (offsite-tuning's
    student = the emulator, teacher = the full model's middle). The distilled emulator is cached by a
    hash of everything it depends on, so a second run does not redo it."""


class RealignConfig(_KD):
    """Re-alignment of the emulator every round, before the broadcast, with the adapter frozen
    (FedBiOT). What changes is a low-rank update of the emulator's middle weights, which then
    travels to the clients in every instruction (group ``realign``)."""

    #: rank of the emulator's low-rank change
    r: int = Field(default=4, ge=1, le=256)


class OffsiteConfig(_Section):
    """Offsite tuning: clients get a layer-dropped emulator of the middle blocks once and train
    the bottom/top blocks (the adapter) on it; the server holds the full model."""

    enabled: bool = False
    #: fraction of the middle blocks dropped: k = round(M·(1 − drop)) of the M middle blocks are kept,
    #: uniformly spread (the first and last always among them).
    drop: float = Field(default=0.2, ge=0, lt=1, allow_inf_nan=False)
    #: adapter blocks at the bottom and top of the model (FS-LLM and offsite-tuning use 2 + 2).
    bottom: int = Field(default=2, ge=0)
    top: int = Field(default=2, ge=0)
    #: ``full``: the adapter blocks' own weights are trained and sent (FS-LLM's FedOT); ``lora``: LoRA
    #: (``peft.r``, ``peft.alpha``, ``peft.dropout``, ``peft.target_modules``) on the adapter blocks
    #: only, their weights frozen (FedBiOT's cheap variant: far smaller messages).
    train: Literal["full", "lora"] = "full"
    #: also train (and send every round) the token embeddings and LM head; FS-LLM does by default,
    #: which makes its adapters large.
    train_embeddings: bool = False
    #: the emulator goes to each client once, in messages of at most this many MiB.
    chunk_mb: int = Field(default=64, ge=1, le=1024)
    #: in the loop (simulation): also score the adapter plugged into the full model (``plugin_*``
    #: metrics) and the gap to the emulator (``offsite_gap_*``), on the server.
    eval_plugin: bool = True
    #: where the server caches emulator files (default: ``$FEDTUNE_CACHE/emulators``).
    cache_dir: str | None = None
    distill: DistillConfig = Field(default_factory=DistillConfig)
    realign: RealignConfig = Field(default_factory=RealignConfig)

    @model_validator(mode="after")
    def _adapter(self):
        if self.enabled and self.bottom + self.top == 0 and not self.train_embeddings:
            raise ValueError("offsite.bottom + offsite.top = 0 leaves no adapter to train: give the adapter "
                             "blocks (FS-LLM uses bottom: 2, top: 2)")
        return self
