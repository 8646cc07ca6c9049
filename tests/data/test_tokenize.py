import os

import pytest

from fedtune.config import DataConfig
from fedtune.data import Record, TokenizedDataset, fingerprint_tokenizer, tokenize_records

RECS = [
    Record("abc", "", "xyz"),
    Record("a long instruction " * 5, "ctx", "o" * 200),
    Record("q", "in", ""),
]


def _cfg(tmp_path, **kw):
    return DataConfig(cache_dir=str(tmp_path / "tok"), **kw)


class Exploding:
    """A tokenizer that must not be called (the cache has to answer)."""

    eos_token_id = 2

    def __call__(self, *a, **k):
        raise AssertionError("tokenizer called although the cache should have hit")


def test_cache_hits_on_second_call(tmp_path, char_tokenizer):
    # alpaca prompt + response lengths with the char tokenizer: 143 + 4, 303 + 201, 208 + 1
    cfg = _cfg(tmp_path, max_length=256)
    first = tokenize_records(RECS, char_tokenizer, cfg, tokenizer_fingerprint="char-v1")
    assert not first.from_cache and first.cache_path is not None and first.cache_path.is_file()
    mtime = os.stat(first.cache_path).st_mtime_ns
    second = tokenize_records(RECS, Exploding(), cfg, tokenizer_fingerprint="char-v1")
    assert second.from_cache
    assert (second.input_ids, second.labels, second.record_index) == (
        first.input_ids,
        first.labels,
        first.record_index,
    )
    assert (second.num_truncated, second.num_dropped) == (first.num_truncated, first.num_dropped) == (1, 0)
    assert os.stat(first.cache_path).st_mtime_ns == mtime
    assert first.cache_path.suffix == ".safetensors"


def test_cache_key_covers_settings_and_records(tmp_path, char_tokenizer):
    cfg = _cfg(tmp_path, max_length=64)
    tokenize_records(RECS, char_tokenizer, cfg, tokenizer_fingerprint="t")
    calls = char_tokenizer.calls
    tokenize_records(RECS, char_tokenizer, cfg, tokenizer_fingerprint="t")
    assert char_tokenizer.calls == calls  # hit
    for variant in (
        dict(records=RECS, cfg=_cfg(tmp_path, max_length=65), fp="t"),
        dict(records=RECS, cfg=_cfg(tmp_path, max_length=64, truncation="drop"), fp="t"),
        dict(records=RECS, cfg=_cfg(tmp_path, max_length=64, template="alpaca_no_input"), fp="t"),
        dict(records=RECS, cfg=cfg, fp="other-tokenizer"),
        dict(records=RECS[:2] + [Record("q", "in", "!")], cfg=cfg, fp="t"),
    ):
        before = char_tokenizer.calls
        ds = tokenize_records(
            variant["records"], char_tokenizer, variant["cfg"], tokenizer_fingerprint=variant["fp"]
        )
        assert not ds.from_cache and char_tokenizer.calls > before


def test_drop_counts_and_lengths(tmp_path, char_tokenizer):
    ds = tokenize_records(RECS, char_tokenizer, _cfg(tmp_path, max_length=256, truncation="drop"))
    assert ds.num_dropped == 1 and ds.num_truncated == 0
    assert ds.record_index == [0, 2]
    assert ds.lengths == [143 + 4, 208 + 1]


def test_corrupt_cache_is_recomputed(tmp_path, char_tokenizer):
    cfg = _cfg(tmp_path, max_length=64)
    first = tokenize_records(RECS, char_tokenizer, cfg, tokenizer_fingerprint="t")
    first.cache_path.write_bytes(b"garbage")
    again = tokenize_records(RECS, char_tokenizer, cfg, tokenizer_fingerprint="t")
    assert not again.from_cache and again.input_ids == first.input_ids
    assert tokenize_records(RECS, Exploding(), cfg, tokenizer_fingerprint="t").from_cache


def test_empty_and_concat(tmp_path, char_tokenizer):
    cfg = _cfg(tmp_path, max_length=256, truncation="drop")
    empty = tokenize_records([], char_tokenizer, cfg)
    assert len(empty) == 0
    assert (
        len(
            tokenize_records(
                [], Exploding(), cfg, tokenizer_fingerprint=fingerprint_tokenizer(char_tokenizer)
            )
        )
        == 0
    )
    a = tokenize_records(RECS, char_tokenizer, cfg)  # keeps records 0 and 2, drops 1
    b = tokenize_records(RECS[:1], char_tokenizer, cfg)
    both = TokenizedDataset.concat([a, b])
    assert both.input_ids == a.input_ids + b.input_ids
    assert both.record_index == [0, 2, 3] and both.num_dropped == 1


def test_real_tokenizer_fingerprint_and_cache(tmp_path, smol_tokenizer):
    fp = fingerprint_tokenizer(smol_tokenizer)
    assert fp == fingerprint_tokenizer(smol_tokenizer) and len(fp) == 64
    cfg = _cfg(tmp_path, max_length=128, template="chat")
    ds = tokenize_records(RECS, smol_tokenizer, cfg)
    from safetensors import safe_open

    with safe_open(str(ds.cache_path), framework="numpy") as f:
        assert set(f.keys()) == {"input_ids", "labels", "offsets", "record_index"}
        assert f.get_tensor("input_ids").dtype.name == "int32"
    assert tokenize_records(RECS, smol_tokenizer, cfg).from_cache
    old = smol_tokenizer.chat_template
    try:
        smol_tokenizer.chat_template = old + " "
        assert fingerprint_tokenizer(smol_tokenizer) != fp
    finally:
        smol_tokenizer.chat_template = old


@pytest.mark.parametrize("truncation", ["left", "drop"])
def test_labels_always_present(tmp_path, char_tokenizer, truncation):
    ds = tokenize_records(RECS, char_tokenizer, _cfg(tmp_path, max_length=160, truncation=truncation))
    assert len(ds) == (3 if truncation == "left" else 1)
    for ids, labels in zip(ds.input_ids, ds.labels):
        assert len(ids) == len(labels) <= 160
        assert any(x != -100 for x in labels[1:])
