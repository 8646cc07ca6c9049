"""From a DataConfig and a seed to per-client train/val/test record lists.

Pipeline (all steps seeded, so the same config and seed give the same clients, byte for byte):
load source -> drop excluded labels -> split into clients -> carve each client's own val/test
from its own records -> cap sizes. Val/test are carved before the caps, so changing
``max_records_per_client`` never changes which records a client evaluates on.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtune.config import DataConfig
from fedtune.data.presets import resolve_data_config
from fedtune.data.records import Record
from fedtune.data.sources import load_source
from fedtune.data.splitters import SPLITTERS, client_names, labels_of
from fedtune.errors import did_you_mean, unknown_name

log = logging.getLogger(__name__)


@dataclass
class ClientData:
    """One client's private data."""

    name: str
    train: list[Record]
    val: list[Record] = field(default_factory=list)
    test: list[Record] = field(default_factory=list)

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def split(self, name: str) -> list[Record]:
        if name not in ("train", "val", "test"):
            raise unknown_name("data split", name, ["train", "val", "test"])
        return getattr(self, name)


@dataclass
class FederatedData:
    """All clients plus how they were made (for logs, ``describe`` and run metadata)."""

    clients: list[ClientData]
    label_field: str = "category"
    source: str = ""
    preset: str | None = None
    splitter: str = "iid"
    seed: int = 0
    #: records loaded from the source, before exclusion.
    num_loaded: int = 0
    #: records dropped because their label is in ``exclude_labels``.
    num_excluded: int = 0
    excluded_labels: list[str] = field(default_factory=list)
    #: records left out by ``max_records_per_client`` / ``max_eval_records_per_client``.
    num_capped_train: int = 0
    num_capped_eval: int = 0
    #: the resolved data config (preset applied).
    config: DataConfig | None = None

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.clients]

    def __len__(self) -> int:
        return len(self.clients)

    def client(self, name: str) -> ClientData:
        for c in self.clients:
            if c.name == name:
                return c
        raise unknown_name("client", name, self.names)

    def pooled(self) -> ClientData:
        """Every client's train/val/test concatenated: the centralised ('global') scenario."""
        return ClientData(
            name="global",
            train=[r for c in self.clients for r in c.train],
            val=[r for c in self.clients for r in c.val],
            test=[r for c in self.clients for r in c.test],
        )

    def info(self) -> dict[str, Any]:
        """JSON-serialisable summary (saved with a run)."""
        return {
            "source": self.source,
            "preset": self.preset,
            "splitter": self.splitter,
            "label_field": self.label_field,
            "seed": self.seed,
            "num_loaded": self.num_loaded,
            "num_excluded": self.num_excluded,
            "excluded_labels": list(self.excluded_labels),
            "num_capped_train": self.num_capped_train,
            "num_capped_eval": self.num_capped_eval,
            "clients": {c.name: c.sizes for c in self.clients},
        }


def _seed(*parts: int | str) -> int:
    # Same construction as fedtune.utils.derive_seed, kept local so the data layer does not
    # import torch (``fedtune data describe`` should start fast).
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def eval_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of a client's ``n`` records go to val and test.

    ``round(fraction * n)``, but at least one when the fraction is positive, and never leaving
    the client without a training record (small clients give up val/test first, test before val
    only when it is the larger).
    """
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    while n_val + n_test > n - 1 and n_val + n_test > 0:
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def build_federated_data(data_cfg: DataConfig, seed: int) -> FederatedData:
    """Load, split and carve the federated dataset described by ``data_cfg``.

    Deterministic in (``data_cfg``, ``seed``). Clients are named after their label values for the
    meta splitter (``open_qa``, ``brainstorming+summarization``) and ``client_<k>`` otherwise.
    """
    cfg = resolve_data_config(data_cfg)
    assert cfg.source is not None and cfg.splitter is not None
    records = load_source(cfg.source, cfg)
    num_loaded = len(records)

    num_excluded = 0
    if cfg.exclude_labels:
        labels_of(records[:0], cfg.label_field)  # validates the field name
        excluded = set(cfg.exclude_labels)
        present = {getattr(r, cfg.label_field) for r in records}
        for lab in sorted(excluded - present):
            log.warning(
                "data.exclude_labels: no record has %s '%s'%s",
                cfg.label_field,
                lab,
                did_you_mean(lab, [str(p) for p in present if p is not None]),
            )
        kept = [r for r in records if getattr(r, cfg.label_field) not in excluded]
        num_excluded = len(records) - len(kept)
        records = kept

    splitter = SPLITTERS.get(cfg.splitter)
    if splitter is None:
        raise unknown_name("splitter", cfg.splitter, SPLITTERS)
    num_clients = cfg.num_clients
    if num_clients is None:  # meta without a count: one client per label value
        num_clients = max(1, len(set(labels_of(records, cfg.label_field))))
    rng = np.random.default_rng(_seed(seed, "fedtune-data-split"))
    parts = splitter(
        records,
        num_clients,
        rng,
        label_field=cfg.label_field,
        alpha=cfg.alpha,
        min_client_size=cfg.min_client_size,
    )
    names = client_names(cfg.splitter, records, parts, cfg.label_field)

    clients: list[ClientData] = []
    capped_train = capped_eval = 0
    for k, (name, idx) in enumerate(zip(names, parts)):
        crng = np.random.default_rng(_seed(seed, "fedtune-data-carve", k, name))
        order = [idx[i] for i in crng.permutation(len(idx))]
        n_val, n_test = eval_counts(len(order), cfg.val_fraction, cfg.test_fraction)
        val = [records[i] for i in order[:n_val]]
        test = [records[i] for i in order[n_val : n_val + n_test]]
        train = [records[i] for i in order[n_val + n_test :]]
        if cfg.max_records_per_client is not None and len(train) > cfg.max_records_per_client:
            capped_train += len(train) - cfg.max_records_per_client
            train = train[: cfg.max_records_per_client]
        cap = cfg.max_eval_records_per_client
        if cap is not None:
            capped_eval += max(0, len(val) - cap) + max(0, len(test) - cap)
            val, test = val[:cap], test[:cap]
        clients.append(ClientData(name=name, train=train, val=val, test=test))

    return FederatedData(
        clients=clients,
        label_field=cfg.label_field,
        source=cfg.source,
        preset=cfg.preset,
        splitter=cfg.splitter,
        seed=seed,
        num_loaded=num_loaded,
        num_excluded=num_excluded,
        excluded_labels=list(cfg.exclude_labels),
        num_capped_train=capped_train,
        num_capped_eval=capped_eval,
        config=cfg,
    )


def label_histogram(records: list[Record], label_field: str) -> Counter[str]:
    """Count of each label value (``(none)`` for records without one)."""
    return Counter("(none)" if (v := getattr(r, label_field)) in (None, "") else str(v) for r in records)
