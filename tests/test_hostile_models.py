"""Damaged model files and model caches: each gives one clear error naming the file (exit 2 from
the CLI, no traceback), and a damaged cache entry is detected and rebuilt.

A real (tiny) GGUF file is written with the ``gguf`` package, so the cache path is the one the
embedded SmolLM2 takes, only in a second instead of thirty."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.cli import main
from fedtune.config import ModelConfig
from fedtune.errors import FedtuneError
from fedtune.models import load_model
from fedtune.models.loading import CACHE_MANIFEST, cache_entry_problem


def _byte_level_alphabet() -> list[str]:
    """GPT-2's bytes-to-unicode table (256 printable stand-ins for the byte values)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def write_tiny_gguf(path: Path) -> Path:
    """A 1-layer Llama GGUF (hidden 32, vocab 320, byte-level BPE, a ChatML template), ~130 KB."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    V, H, NH, KV, FF = 320, 32, 4, 2, 64
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_block_count(1)
    w.add_feed_forward_length(FF)
    w.add_head_count(NH)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(H // NH)
    w.add_vocab_size(V)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    toks = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _byte_level_alphabet() + [a + b for a, b in merges]
    toks += [f"<extra{i}>" for i in range(V - len(toks))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rng = np.random.default_rng(0)

    def t(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    t("token_embd.weight", V, H)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(H, np.float32))
    t("blk.0.attn_q.weight", H, H)
    t("blk.0.attn_k.weight", H * KV // NH, H)
    t("blk.0.attn_v.weight", H * KV // NH, H)
    t("blk.0.attn_output.weight", H, H)
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(H, np.float32))
    t("blk.0.ffn_gate.weight", FF, H)
    t("blk.0.ffn_up.weight", FF, H)
    t("blk.0.ffn_down.weight", H, FF)
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    t("output.weight", V, H)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _cfg(gguf: Path, cache: Path) -> ModelConfig:
    return ModelConfig(name=str(gguf), cache_dir=str(cache))


def _entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return entry


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# the model cache


def test_cache_entry_records_every_file_and_verifies(tiny_gguf, tmp_path):
    model, tok = load_model(_cfg(tiny_gguf, tmp_path))
    entry = _entry(tmp_path)
    manifest = json.loads((entry / CACHE_MANIFEST).read_text())["files"]
    on_disk = {p.name: p.stat().st_size for p in entry.iterdir() if p.name != CACHE_MANIFEST}
    assert {n: r["size"] for n, r in manifest.items()} == on_disk and "model.safetensors" in on_disk
    assert cache_entry_problem(entry) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.name]  # no temp dir left behind


# how an interrupted or bad copy of ~/.cache/fedtune/models/... looks
def _truncate_weights(e: Path):
    f = e / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _zero_tail_of_weights(e: Path):  # a preallocated copy interrupted: right size, zeros at the end
    f = e / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-4096:] = bytes(4096)
    f.write_bytes(bytes(data))


def _empty_tokenizer(e: Path):
    (e / "tokenizer.json").write_bytes(b"")


def _missing_config(e: Path):
    (e / "config.json").unlink()


def _no_manifest(e: Path):  # an entry written by an older fedtune
    (e / CACHE_MANIFEST).unlink()


def _garbled_manifest(e: Path):
    (e / CACHE_MANIFEST).write_text("[1, 2")


DAMAGE = {"truncated weights": (_truncate_weights, "model.safetensors is"),
          "zeroed tail": (_zero_tail_of_weights, "model.safetensors does not hold what was written"),
          "empty tokenizer.json": (_empty_tokenizer, "tokenizer.json is 0 bytes"),
          "missing config.json": (_missing_config, "config.json is missing"),
          "no manifest": (_no_manifest, f"it has no {CACHE_MANIFEST}"),
          "garbled manifest": (_garbled_manifest, f"its {CACHE_MANIFEST} is unreadable")}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_cache_entry_is_detected_and_rebuilt(tiny_gguf, tmp_path, caplog, damage):
    spoil, says = DAMAGE[damage]
    first, _ = load_model(_cfg(tiny_gguf, tmp_path))
    good = _weights(first)
    entry = _entry(tmp_path)
    size = (entry / "model.safetensors").stat().st_size
    spoil(entry)
    assert cache_entry_problem(entry).startswith(says)
    with caplog.at_level(logging.WARNING, logger="fedtune.models.loading"):
        again, tok = load_model(_cfg(tiny_gguf, tmp_path))
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 1 and str(entry) in warned[0] and says in warned[0] and "rebuilding" in warned[0]
    assert cache_entry_problem(entry) is None and (entry / "model.safetensors").stat().st_size == size
    assert all(torch.equal(good[k], v) for k, v in _weights(again).items())
    assert tok("the")["input_ids"] and sorted(p.name for p in tmp_path.iterdir()) == [entry.name]


def test_damaged_cache_that_cannot_be_rebuilt_names_the_command(tiny_gguf, tmp_path, monkeypatch, capsys):
    load_model(_cfg(tiny_gguf, tmp_path))
    entry = _entry(tmp_path)
    _truncate_weights(entry)
    import fedtune.models.loading as loading

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loading.tempfile, "mkdtemp", full_disk)
    with pytest.raises(FedtuneError) as e:
        load_model(_cfg(tiny_gguf, tmp_path))
    msg = str(e.value)
    assert f"rm -rf '{entry}'" in msg and "No space left on device" in msg and "model.safetensors is" in msg


# ---------------------------------------------------------------------------------------------
# damaged model files given by the user


def _gguf_variants(tiny: Path, d: Path) -> dict[str, Path]:
    data = tiny.read_bytes()
    out = {"empty": b"", "truncated": data[: len(data) // 2], "header only": data[:64],
           "not a gguf": b"this is a text file\n" * 10, "bad magic": b"GGUX" + data[4:]}
    paths = {}
    for name, blob in out.items():
        p = d / f"{name.replace(' ', '-')}.gguf"
        p.write_bytes(blob)
        paths[name] = p
    return paths


@pytest.mark.parametrize("variant, says", [
    ("empty", "is empty (0 bytes)"), ("truncated", "could not read GGUF file"),
    ("header only", "could not read GGUF file"), ("not a gguf", "is not a GGUF file"),
    ("bad magic", "is not a GGUF file"),
])
def test_damaged_gguf_is_one_clear_error(tiny_gguf, tmp_path, variant, says):
    path = _gguf_variants(tiny_gguf, tmp_path)[variant]
    cache = tmp_path / "cache"
    with pytest.raises(FedtuneError) as e:
        load_model(_cfg(path, cache))
    assert says in str(e.value) and str(path) in str(e.value)
    assert not cache.exists() or list(cache.iterdir()) == []  # nothing half-made in the cache


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """tiny-llama saved as an ordinary Hugging Face model directory."""
    model, tok = load_model(ModelConfig(name="tiny-llama"))
    d = tmp_path_factory.mktemp("hf") / "tiny-llama-hf"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


HF_DAMAGE = {
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
                          "model.safetensors is damaged: it is 5,000 bytes but its header describes"),
    "empty weights": (lambda d: (d / "model.safetensors").write_bytes(b""),
                      "model.safetensors is damaged: it is 0 bytes, too short"),
    "weights with a garbage header": (lambda d: (d / "model.safetensors").write_bytes(
        (40).to_bytes(8, "little") + b"{not json at all, just forty bytes....}" + bytes(100)),
        "model.safetensors is damaged: its header is not valid JSON"),
    "weights with trailing bytes": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes() + b"\0" * 10), "trailing bytes"),
    "config.json is a list": (lambda d: (d / "config.json").write_text("[1, 2, 3]"),
                              "config.json holds a JSON list, not an object"),
    "config.json is cut off": (lambda d: (d / "config.json").write_text('{"model_type": "llama", "hidden'),
                               "config.json is not valid JSON (line 1 column"),
    "config.json is empty": (lambda d: (d / "config.json").write_text(""), "config.json is not valid JSON (it is empty)"),
    "config.json is not UTF-8": (lambda d: (d / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}'),
                                 "config.json is not UTF-8 text"),
    "tokenizer.json truncated": (lambda d: (d / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes()[:1000]),
                                 "tokenizer.json is not valid JSON"),
}


@pytest.mark.parametrize("damage", sorted(HF_DAMAGE))
def test_damaged_hf_directory_is_one_clear_error(hf_dir, tmp_path, damage):
    spoil, says = HF_DAMAGE[damage]
    d = _copy(hf_dir, tmp_path / "model")
    spoil(d)
    with pytest.raises(FedtuneError) as e:
        load_model(ModelConfig(name=str(d)))
    assert says in str(e.value) and str(d) in str(e.value), str(e.value)


def test_the_cli_says_error_and_exits_2(hf_dir, tiny_gguf, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    d = _copy(hf_dir, tmp_path / "model")
    (d / "config.json").write_text("[]")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for target, says in ((d, "config.json holds a JSON list"), (empty, "is empty (0 bytes)")):
        rc = main(["eval", str(target), "--tasks", "gsm8k", "--limit", "1", "--out", str(tmp_path / "out"), "-q"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and says in err and str(target) in err, err
        assert "Traceback" not in err and not (tmp_path / "out").exists()
