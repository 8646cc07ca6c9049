"""Named federated datasets: the paper's benchmarks as DataConfig defaults.

A preset fills the DataConfig fields the user left unset; keys the user set explicitly (in YAML or
as CLI overrides) always win, so ``preset: fed-dolly`` with ``num_clients: 4`` gives Dolly's eight
categories grouped into four balanced clients.

The first four match FS-LLM (arXiv 2309.00363, Table 6): Fed-Dolly 8 clients by category,
Fed-GSM8K-3 3 iid clients, Fed-CodeAlpaca 9 clients by language (X86-64 Assembly dropped, as
FS-LLM does for its meta split), Fed-CodeSearchNet 6 clients by language.
"""

from __future__ import annotations

from typing import Any

from fedtune.config import DataConfig
from fedtune.errors import FedtuneError, unknown_name

PRESETS: dict[str, dict[str, Any]] = {
    "fed-dolly": {"source": "dolly", "splitter": "meta", "num_clients": 8, "label_field": "category"},
    "fed-gsm8k-3": {"source": "gsm8k", "splitter": "iid", "num_clients": 3},
    "fed-codealpaca": {
        "source": "code-alpaca",
        "splitter": "meta",
        "num_clients": 9,
        "label_field": "category",
        "exclude_labels": ["X86-64 Assembly"],
    },
    "fed-codesearchnet": {
        "source": "code-search-net",
        "splitter": "meta",
        "num_clients": 6,
        "label_field": "category",
    },
    # WARNING: MBXP IS AN EVALUATION SET. fed-mbxp exists only as an offline stand-in for
    # fed-codealpaca (whose rosetta_alpaca.json cannot be obtained offline): 9 clients, one per
    # language with reference solutions. Never evaluate on MBXP, MBPP or MultiPL-E's MBPP part
    # after training on it: that is test-set contamination. HumanEval is a different problem set.
    "fed-mbxp": {"source": "mbxp", "splitter": "meta", "num_clients": 9, "label_field": "category"},
    # Centralised instruction sets the paper splits with any splitter; iid by default.
    "alpaca": {"source": "alpaca", "splitter": "iid", "num_clients": 3},
    "alpaca-cleaned": {"source": "alpaca-cleaned", "splitter": "iid", "num_clients": 3},
}

#: caveats shown next to a preset (``fedtune data describe``, logs).
PRESET_CAVEATS: dict[str, str] = {
    "fed-mbxp": "MBXP is an evaluation benchmark: never evaluate on MBXP/MBPP after training on fed-mbxp.",
}


def resolve_data_config(data_cfg: DataConfig) -> DataConfig:
    """Apply ``data_cfg.preset`` (explicitly set fields win) and fill the remaining defaults.

    Returns a new DataConfig with ``source``, ``splitter`` and (except for ``meta``, where it
    defaults to one client per label value) ``num_clients`` set.
    """
    explicit = set(data_cfg.model_fields_set)
    update: dict[str, Any] = {}
    if data_cfg.preset is not None:
        preset = PRESETS.get(data_cfg.preset)
        if preset is None:
            raise unknown_name("data preset", data_cfg.preset, PRESETS)
        for key, value in preset.items():
            if key not in explicit or getattr(data_cfg, key) is None:
                update[key] = list(value) if isinstance(value, list) else value
    cfg = data_cfg.model_copy(update=update)
    if cfg.source is None:
        raise FedtuneError(
            "no data source: set data.preset (e.g. fed-dolly, fed-gsm8k-3) or data.source "
            "(a built-in source such as dolly, or a .json/.jsonl/.csv file)"
        )
    if cfg.splitter is None:
        cfg = cfg.model_copy(update={"splitter": "iid"})
    if cfg.num_clients is None and cfg.splitter != "meta":
        raise FedtuneError(f"data.num_clients is required with the '{cfg.splitter}' splitter")
    return cfg
