"""Tokenisation with an on-disk cache.

The cache key hashes everything the token ids depend on: the records' text, the tokenizer
(vocabulary, normaliser/pre-tokeniser rules, special tokens, chat template), the template and
``max_length``/``truncation``. Entries are safetensors files (flat int32 ids and labels plus
int64 offsets), written atomically; nothing is ever pickled. A corrupt entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune.data.records import Record
from fedtune.data.sources import cache_root
from fedtune.data.templates import assemble, get_template, protected_prefix, special_prefix, tokenize_parts

if TYPE_CHECKING:
    from fedtune.config import DataConfig

log = logging.getLogger(__name__)

#: bump when the token layout changes, so old cache entries are never reused (2: left truncation
#: keeps the BOS prefix; chat responses end with the chat format's end-of-turn token).
CACHE_VERSION = 2
#: tokenising at least this many records shows a progress bar (when asked for): 200k records take
#: about a minute on 2 CPU cores, which must not look like a hang
PROGRESS_MIN_RECORDS = 5000
_PROGRESS_CHUNK = 2048


@dataclass
class TokenizedDataset:
    """Token ids and labels of the kept examples (dropped ones are skipped)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    #: for each example, the index of its record in the input list.
    record_index: list[int]
    num_dropped: int = 0
    num_truncated: int = 0
    cache_path: Path | None = None
    from_cache: bool = False

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    @classmethod
    def concat(cls, parts: Sequence[TokenizedDataset]) -> TokenizedDataset:
        """One dataset holding every part in order (e.g. the pooled 'global' client).

        ``record_index`` refers to the concatenation of the parts' input record lists.
        """
        out = cls([], [], [])
        base = 0
        for p in parts:
            out.input_ids += p.input_ids
            out.labels += p.labels
            out.record_index += [base + i for i in p.record_index]
            base += len(p) + p.num_dropped
            out.num_dropped += p.num_dropped
            out.num_truncated += p.num_truncated
        return out


_FP_MEMO: weakref.WeakKeyDictionary[Any, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def fingerprint_tokenizer(tokenizer: Any) -> str:
    """A hash of what determines a tokenizer's output: rules, vocabulary, special tokens, chat template.

    Fast tokenizers are hashed through their full serialised ``tokenizer.json``; slow ones
    through their vocabulary and vocabulary file.
    """
    state = (
        len(tokenizer) if hasattr(tokenizer, "__len__") else None,
        getattr(tokenizer, "chat_template", None),
    )
    try:
        memo = _FP_MEMO.get(tokenizer)
    except TypeError:
        memo = None
    if memo is not None and memo[0] == state:
        return memo[1]
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        vocab_file = getattr(tokenizer, "vocab_file", None)
        if vocab_file and os.path.isfile(vocab_file):
            h.update(Path(vocab_file).read_bytes())
    extra = {
        "special": {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()},
        "added": sorted((int(k), str(v)) for k, v in getattr(tokenizer, "added_tokens_decoder", {}).items()),
        "eos": getattr(tokenizer, "eos_token_id", None),
        "bos": getattr(tokenizer, "bos_token_id", None),
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
        "chat_template": state[1],
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    fp = h.hexdigest()
    try:
        _FP_MEMO[tokenizer] = (state, fp)
    except TypeError:
        pass
    return fp


def records_digest(records: Sequence[Record]) -> str:
    """sha256 over the records' fields, length-prefixed so no two record lists collide."""
    h = hashlib.sha256()
    for r in records:
        for value in (r.instruction, r.input, r.output, r.category):
            if value is None:
                h.update(b"\xff")
            else:
                b = value.encode("utf-8")
                h.update(len(b).to_bytes(8, "little"))
                h.update(b)
    h.update(len(records).to_bytes(8, "little"))
    return h.hexdigest()


def cache_key(
    records: Sequence[Record], fingerprint: str, template: Any, max_length: int, truncation: str
) -> str:
    head = {
        "version": CACHE_VERSION,
        "tokenizer": fingerprint,
        "template": get_template(template).to_dict(),
        "max_length": max_length,
        "truncation": truncation,
        "records": records_digest(records),
    }
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()


def tokenized_cache_dir(data_cfg: DataConfig | None) -> Path:
    if data_cfg is not None and data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    return cache_root() / "tokenized"


def _save(path: Path, ds: TokenizedDataset, key: str) -> None:
    from safetensors.numpy import save

    from fedtune.utils import atomic_write_bytes

    lengths = np.fromiter((len(x) for x in ds.input_ids), dtype=np.int64, count=len(ds.input_ids))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = lambda rows: np.fromiter(  # noqa: E731
        (t for row in rows for t in row), dtype=np.int32, count=int(offsets[-1])
    )
    tensors = {
        "input_ids": flat(ds.input_ids),
        "labels": flat(ds.labels),
        "offsets": offsets,
        "record_index": np.asarray(ds.record_index, dtype=np.int64),
    }
    meta = {
        "format": "fedtune-tokenized",
        "version": str(CACHE_VERSION),
        "key": key,
        "num_dropped": str(ds.num_dropped),
        "num_truncated": str(ds.num_truncated),
    }
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _load(path: Path, key: str) -> TokenizedDataset:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key or meta.get("version") != str(CACHE_VERSION):
            raise ValueError("cache entry does not match its key")
        ids, labels = f.get_tensor("input_ids").tolist(), f.get_tensor("labels").tolist()
        offsets = f.get_tensor("offsets").tolist()
        record_index = f.get_tensor("record_index").tolist()
    if len(offsets) != len(record_index) + 1 or offsets[-1] != len(ids) or len(labels) != len(ids):
        raise ValueError("inconsistent cache entry")
    spans = list(zip(offsets[:-1], offsets[1:]))
    return TokenizedDataset(
        input_ids=[ids[a:b] for a, b in spans],
        labels=[labels[a:b] for a, b in spans],
        record_index=record_index,
        num_dropped=int(meta.get("num_dropped", 0)),
        num_truncated=int(meta.get("num_truncated", 0)),
        cache_path=path,
        from_cache=True,
    )


def _tokenize_parts(records: Sequence[Record], tokenizer: Any, template: Any, progress: bool, desc: str):
    """:func:`tokenize_parts`, in chunks under a progress bar when there are many records."""
    if not progress or len(records) < PROGRESS_MIN_RECORDS:
        return tokenize_parts(records, tokenizer, template)
    import sys

    from tqdm.auto import tqdm

    prompts: list[list[int]] = []
    responses: list[list[int]] = []
    with tqdm(total=len(records), desc=desc, unit="rec", leave=False, file=sys.stderr) as bar:
        for start in range(0, len(records), _PROGRESS_CHUNK):
            chunk = records[start : start + _PROGRESS_CHUNK]
            p, r = tokenize_parts(chunk, tokenizer, template)
            prompts += p
            responses += r
            bar.update(len(chunk))
    return prompts, responses


def tokenize_records(
    records: Sequence[Record],
    tokenizer: Any,
    data_cfg: DataConfig,
    tokenizer_fingerprint: str | None = None,
    *,
    use_cache: bool = True,
    progress: bool = False,
    desc: str = "tokenising",
) -> TokenizedDataset:
    """Token ids and masked labels of ``records`` under ``data_cfg``'s template and length rules.

    The result is cached on disk (``data_cfg.cache_dir`` or ``$FEDTUNE_CACHE/tokenized``); a
    second call with the same records, tokenizer, template, ``max_length`` and ``truncation``
    loads it without tokenising. Pass ``tokenizer_fingerprint`` to skip hashing the tokenizer.
    ``progress``: show a progress bar (``desc``) on stderr when there are many records to tokenise.
    """
    template = get_template(data_cfg.template)
    fp = tokenizer_fingerprint or fingerprint_tokenizer(tokenizer)
    key = cache_key(records, fp, template, data_cfg.max_length, data_cfg.truncation)
    path = tokenized_cache_dir(data_cfg) / f"{key[:40]}.safetensors"
    if use_cache and path.is_file():
        try:
            return _load(path, key)
        except Exception as e:  # corrupt or foreign file: recompute and overwrite
            log.warning("ignoring unreadable tokenisation cache %s (%s)", path, e)

    prompts, responses = _tokenize_parts(records, tokenizer, template, progress, desc)
    prefix, bos = special_prefix(tokenizer), getattr(tokenizer, "bos_token_id", None)
    ids_out: list[list[int]] = []
    labels_out: list[list[int]] = []
    index: list[int] = []
    dropped = truncated = 0
    for i, (p, r) in enumerate(zip(prompts, responses)):
        out = assemble(p, r, data_cfg.max_length, data_cfg.truncation, protected_prefix(p, prefix, bos))
        if out is None:
            dropped += 1
            continue
        ids, labels, status = out
        truncated += status == "truncated"
        ids_out.append(ids)
        labels_out.append(labels)
        index.append(i)
    if dropped or truncated:
        log.info(
            "tokenised %d records: %d longer than max_length=%d were %s",
            len(records),
            dropped + truncated,
            data_cfg.max_length,
            "dropped" if dropped else "truncated",
        )
    ds = TokenizedDataset(ids_out, labels_out, index, dropped, truncated)
    if use_cache:
        try:
            _save(path, ds, key)
            ds.cache_path = path
        except OSError as e:  # a read-only cache must not stop training
            log.warning("could not write tokenisation cache %s: %s", path, e)
    return ds
