"""fedtune's data layer: records, built-in sources, splitters, presets, templates, tokenisation.

Typical use::

    fed = build_federated_data(cfg.data, seed=cfg.seed)        # clients with train/val/test
    ds = tokenize_records(fed.clients[0].train, tokenizer, cfg.data)  # cached token ids + labels

Nothing here imports torch at module level (``fedtune data describe`` starts fast).
"""

from fedtune.data.describe import describe_federated_data, format_description
from fedtune.data.federated import (
    ClientData,
    FederatedData,
    build_federated_data,
    eval_counts,
    label_histogram,
)
from fedtune.data.presets import PRESET_CAVEATS, PRESETS, resolve_data_config
from fedtune.data.records import Record, load_records_file
from fedtune.data.sources import (
    SOURCES,
    Source,
    SourceFile,
    git_blob_id,
    gsm8k_answer,
    load_source,
    register_source,
)
from fedtune.data.splitters import SPLITTERS, client_names, register_splitter
from fedtune.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    Template,
    encode_example,
    get_template,
    template_from_dict,
)
from fedtune.data.tokenize import TokenizedDataset, fingerprint_tokenizer, tokenize_records

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "PRESET_CAVEATS",
    "SOURCES",
    "SPLITTERS",
    "TEMPLATES",
    "ClientData",
    "FederatedData",
    "Record",
    "Source",
    "SourceFile",
    "Template",
    "TokenizedDataset",
    "build_federated_data",
    "client_names",
    "describe_federated_data",
    "encode_example",
    "eval_counts",
    "fingerprint_tokenizer",
    "format_description",
    "get_template",
    "git_blob_id",
    "gsm8k_answer",
    "label_histogram",
    "load_records_file",
    "load_source",
    "register_source",
    "register_splitter",
    "resolve_data_config",
    "template_from_dict",
    "tokenize_records",
]
