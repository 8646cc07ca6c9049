"""Building the emulator and the models around it.

* the **emulator model**: a real Hugging Face model of the same architecture, built from the full
  model's config with l + k + r blocks (:func:`emulator_config`, :func:`build_skeleton`), so its
  layer indices, KV cache and per-layer config agree with its depth; its weights are copies of the
  full model's bottom, kept middle and top blocks (:func:`emulator_state`), plus the embeddings,
  final norm and LM head;
* the **adapter** on it (:func:`attach_offsite_adapter`): the bottom and top blocks trainable
  (``offsite.train: full``) or LoRA on them (``lora``), the embeddings and LM head frozen unless
  ``offsite.train_embeddings``;
* the **emulator file**: every frozen weight of that model (what a client cannot get from the
  adapter messages) as safetensors with the plan in its metadata, identified by the SHA-256 of its
  bytes (:func:`emulator_bytes`);
* the **plug-in**: the adapter's values written back into the full model's own blocks
  (:func:`plugin_values`, :func:`plugged`): LoRA merged into the block's weight, full blocks copied.

A client builds the emulator model from the run's config alone (:func:`model_config` reads the
config, never the weights) and fills it from the file it receives.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedtune.adapters import trainable_parameters
from fedtune.errors import FedtuneError
from fedtune.models.layout import Layout, layout_of
from fedtune.offsite.plan import Plan, make_plan

if TYPE_CHECKING:
    from fedtune.config import Config, ModelConfig

TensorDict = dict[str, torch.Tensor]
#: the emulator file's metadata key
META_KEY = "fedtune_emulator"
FORMAT = 1
_PEFT_PREFIX = "base_model.model."
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- names ------------------------------------------------------------------------------------
def plain_name(name: str) -> str:
    """A parameter's name in the bare Hugging Face model, whether or not peft wraps it (peft adds
    ``base_model.model.`` and moves an adapted layer's weight to ``<layer>.base_layer``)."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return ".".join(p for p in name.split(".") if p != "base_layer")


def plain_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The model's own parameters (no LoRA factors) under their bare names (tied ones once)."""
    return {plain_name(n): p for n, p in model.named_parameters()
            if not any(part.startswith("lora_") for part in n.split("."))}


def block_index(name: str, layout: Layout) -> int | None:
    """The block a bare parameter or module name belongs to, or ``None`` (embeddings, norm, head)."""
    prefix = layout.blocks + "."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def renumber(name: str, layout: Layout, j: int) -> str:
    """``name`` (inside a block) moved to block ``j``."""
    rest = name[len(layout.blocks) + 1:].split(".", 1)
    return f"{layout.blocks}.{j}" + (f".{rest[1]}" if len(rest) > 1 else "")


def get_module(model: torch.nn.Module, dotted: str) -> torch.nn.Module:
    m = model
    for part in dotted.split("."):
        if not hasattr(m, part):
            raise FedtuneError(f"{type(model).__name__} has no module '{dotted}' (layer layout table "
                               "fedtune.models.layout.LAYOUTS)")
        m = getattr(m, part)
    return m


def blocks_of(model: torch.nn.Module, layout: Layout) -> torch.nn.ModuleList:
    """The block list of a bare or peft-wrapped model, checked to be a ModuleList."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = get_module(base, layout.blocks)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise FedtuneError(f"'{layout.blocks}' of {type(base).__name__} is a {type(blocks).__name__}, not the "
                           "list of transformer blocks the layer layout table (fedtune.models.layout) says")
    return blocks


# ---- configs and skeletons ------------------------------------------------------------------
def model_config(mcfg: ModelConfig, tokenizer=None):
    """The full model's Hugging Face config, read without loading its weights (what a client
    needs to build the emulator's skeleton)."""
    from fedtune.models.loading import TINY_MODELS, _resolve_dir

    if mcfg.name in TINY_MODELS:  # as fedtune.models.loading._build_tiny configures them
        import transformers

        cls_name, kwargs = TINY_MODELS[mcfg.name]
        vocab = len(tokenizer) if tokenizer is not None else 49152
        config = getattr(transformers, cls_name)(vocab_size=vocab, **kwargs)
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
        return config
    from transformers import AutoConfig

    where, kw = _resolve_dir(mcfg)
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=mcfg.trust_remote_code, **kw)
    except (OSError, ValueError) as e:
        raise FedtuneError(f"could not read the config of model '{mcfg.name}' from {where}: {e}") from None


def plan_for(config, cfg: Config) -> tuple[Plan, Layout]:
    """The offsite plan and block layout of a model config (clear errors for an unknown
    architecture or a drop/adapter size that leaves nothing)."""
    layout = layout_of(config.model_type)
    n = getattr(config, layout.num_layers, None)
    if not isinstance(n, int) or n < 1:
        raise FedtuneError(f"the config of model type '{config.model_type}' has no layer count "
                           f"'{layout.num_layers}' (layer layout table fedtune.models.layout.LAYOUTS)")
    o = cfg.offsite
    return make_plan(n, o.drop, o.bottom, o.top), layout


def emulator_config(config, plan: Plan, layout: Layout):
    """``config`` with the emulator's depth; per-block entries follow their blocks."""
    ecfg = copy.deepcopy(config)
    setattr(ecfg, layout.num_layers, plan.emulator_layers)
    for key in layout.per_layer:
        v = getattr(config, key, None)
        if isinstance(v, (list, tuple)) and len(v) == plan.num_layers:
            setattr(ecfg, key, [v[plan.source(j)] for j in range(plan.emulator_layers)])
    return ecfg


def build_skeleton(ecfg, dtype: str = "float32", *, pad_id: int | None = None, trust_remote_code: bool = False,
                   name: str | None = None) -> torch.nn.Module:
    """A frozen model of the emulator's shape with placeholder weights (filled from an emulator
    state or file before use). Built under a fixed seed without touching the caller's RNG."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(ecfg, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)
    if pad_id is not None:
        model.config.pad_token_id = pad_id
    model.config.fedtune_name = name
    model.requires_grad_(False)
    model.eval()
    return model


def emulator_state(full: torch.nn.Module, plan: Plan, layout: Layout) -> TensorDict:
    """The emulator's weights, taken from the full model: block j of the emulator is block
    ``plan.source(j)`` of the full model; everything outside the blocks is shared. Dropped blocks
    contribute nothing."""
    to_emulator = {plan.source(j): j for j in range(plan.emulator_layers)}
    out: TensorDict = {}
    for name, p in plain_params(full).items():
        i = block_index(name, layout)
        if i is None:
            out[name] = p.detach()
        elif i in to_emulator:
            out[renumber(name, layout, to_emulator[i])] = p.detach()
    return out


def load_weights(model: torch.nn.Module, state: TensorDict, *, names: set[str] | None = None) -> None:
    """Copy ``state`` (bare names) into ``model``'s parameters. ``names``: exactly these must be given
    (default: every parameter of the model)."""
    params = plain_params(model)
    want = set(params) if names is None else names
    if set(state) != want:
        missing, extra = sorted(want - set(state))[:3], sorted(set(state) - want)[:3]
        raise FedtuneError(f"emulator weights do not fit the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for n in want:
            p, t = params[n], state[n]
            if tuple(t.shape) != tuple(p.shape):
                raise FedtuneError(f"emulator weight '{n}' has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
            p.copy_(t)


# ---- the adapter ----------------------------------------------------------------------------
def attach_offsite_adapter(model: torch.nn.Module, cfg: Config, plan: Plan, layout: Layout) -> torch.nn.Module:
    """Make the adapter of ``model`` (an emulator) trainable: the adapter blocks' weights
    (``offsite.train: full``) or LoRA on them (``lora``, through peft with ``layers_to_transform``),
    plus the embeddings and LM head with ``offsite.train_embeddings``. Adapter weights are fp32.
    The caller seeds the RNG (LoRA's initialisation)."""
    o = cfg.offsite
    blocks = plan.adapter_blocks()
    if o.train == "lora" and blocks:
        import peft

        from fedtune.models import arch_info

        targets = cfg.peft.target_modules or list(arch_info(model.config.model_type).lora_targets)
        pcfg = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=cfg.peft.r, lora_alpha=cfg.peft.alpha,
                               lora_dropout=cfg.peft.dropout, target_modules=targets, bias="none",
                               layers_to_transform=blocks, layers_pattern=layout.pattern)
        try:
            model = peft.get_peft_model(model, pcfg)
        except ValueError as e:
            raise FedtuneError(f"LoRA on the offsite adapter blocks {blocks} with target modules {targets}: {e}; "
                               "set peft.target_modules to linear layers of this model") from None
    elif o.train == "full":
        block_list = blocks_of(model, layout)
        for j in blocks:
            block_list[j].requires_grad_(True)
    if o.train_embeddings:
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None:
                emb.weight.requires_grad_(True)
    for _, p in trainable_parameters(model):
        p.data = p.data.float()
    return model


def frozen_state(model: torch.nn.Module) -> TensorDict:
    """What of ``model`` does not travel in the adapter messages: every frozen bare weight."""
    return {n: p.detach() for n, p in plain_params(model).items() if not p.requires_grad}


def frozen_spec(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (tuple(p.shape), p.dtype) for n, p in plain_params(model).items() if not p.requires_grad}


def lora_scaling(cfg: Config) -> float:
    """peft's LoRA scaling (alpha / r; fedtune never uses rsLoRA)."""
    return float(cfg.peft.alpha) / float(cfg.peft.r)


# ---- the emulator file ---------------------------------------------------------------------
def emulator_bytes(state: TensorDict, plan: Plan, info: dict[str, Any]) -> bytes:
    """The emulator as safetensors bytes (deterministic: the same weights give the same bytes and
    so the same content hash), with the plan and ``info`` in its metadata."""
    from safetensors.torch import save

    meta = {"format": FORMAT, "plan": plan.to_dict(), **info}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(state.items())}
    return save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def content_hash(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def read_emulator(source: Path | bytes, plan: Plan, spec: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> TensorDict:
    """Load an emulator (a file, or its bytes), checked strictly against what this side expects: its
    plan, and exactly the tensors ``spec`` names with their shapes and dtypes, all finite."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    what = source.name if isinstance(source, Path) else "received"
    try:
        if isinstance(source, Path):
            with safe_open(str(source), framework="pt") as f:
                raw, keys = (f.metadata() or {}).get(META_KEY, "null"), set(f.keys())
                tensors = None
        else:
            n = int.from_bytes(bytes(source[:8]), "little")
            header = json.loads(bytes(source[8:8 + n]))
            raw, keys = (header.get("__metadata__") or {}).get(META_KEY, "null"), set(header) - {"__metadata__"}
            tensors = load(bytes(source))
        meta = json.loads(raw)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise FedtuneError(f"emulator {what} is not a fedtune emulator file")
        if Plan.from_dict(meta["plan"]) != plan:
            raise FedtuneError(f"emulator {what} was cut with plan {meta['plan']}, this run expects {plan.to_dict()}")
        if keys != set(spec):
            missing, extra = sorted(set(spec) - keys)[:3], sorted(keys - set(spec))[:3]
            raise FedtuneError(f"emulator {what} does not fit this model: missing {missing}, unexpected {extra}")
        if tensors is None:
            with safe_open(str(source), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in sorted(keys)}
    except (SafetensorError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise FedtuneError(f"emulator {what} is malformed: {e}") from None
    for k in sorted(keys):
        t = tensors[k]
        shape, dtype = spec[k]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise FedtuneError(f"emulator tensor '{k}' is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FedtuneError(f"emulator tensor '{k}' holds NaN or Inf")
    return tensors


def cache_root(cfg: Config) -> Path:
    from fedtune.models.loading import cache_root as fedtune_cache

    return Path(cfg.offsite.cache_dir).expanduser() if cfg.offsite.cache_dir else fedtune_cache() / "emulators"


def store_emulator(data: bytes, root: Path) -> tuple[Path, str]:
    """Write emulator bytes under their content hash (once; atomic). Returns (path, hash)."""
    from fedtune.utils import atomic_write_bytes

    h = content_hash(data)
    path = Path(root) / f"{h}.safetensors"
    if not path.is_file() or path.stat().st_size != len(data):
        atomic_write_bytes(path, data)
    return path, h


# ---- plugging the adapter back into the full model ------------------------------------------
def plugin_values(full: torch.nn.Module, adapter: TensorDict, plan: Plan, layout: Layout,
                  scaling: float | None) -> TensorDict:
    """The full model's weights that change when the adapter is plugged in, under bare names:
    an adapter block's weights go to the block it came from (``plan.target``); LoRA factors are merged
    into that block's weight (W + scaling·B·A, transposed for GPT-2's Conv1D, as peft merges);
    trained embeddings replace the full model's."""
    from transformers.pytorch_utils import Conv1D

    params = plain_params(full)
    modules = dict(full.named_modules())

    def to_full(name: str) -> str:
        j = block_index(name, layout)
        return name if j is None else renumber(name, layout, plan.target(j))

    out: TensorDict = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for n, t in adapter.items():
        pn = plain_name(n)
        if ".lora_A." in pn or ".lora_B." in pn:
            module, _, rest = pn.partition(".lora_")
            lora.setdefault(module, {})[rest[0]] = t
            continue
        fn = to_full(pn)
        if fn not in params:
            raise FedtuneError(f"adapter tensor '{n}' has no place in the full model ('{fn}')")
        out[fn] = t.to(params[fn].dtype)
    for module, ab in sorted(lora.items()):
        if scaling is None or set(ab) != {"A", "B"}:
            raise FedtuneError(f"adapter module '{module}' has LoRA factors {sorted(ab)} (expected A and B with a scaling)")
        fm = to_full(module)
        w = params.get(fm + ".weight")
        if w is None or fm not in modules:
            raise FedtuneError(f"LoRA module '{module}' has no place in the full model ('{fm}')")
        delta = ab["B"].double() @ ab["A"].double()
        if isinstance(modules[fm], Conv1D):
            delta = delta.T
        base = out.get(fm + ".weight", w.detach())
        out[fm + ".weight"] = (base.double() + scaling * delta).to(w.dtype)
    return out


@contextlib.contextmanager
def plugged(full: torch.nn.Module, values: TensorDict) -> Iterator[torch.nn.Module]:
    """``full`` with ``values`` written into its weights; the original weights come back afterwards
    (bit for bit: they are copied, not recomputed)."""
    params = plain_params(full)
    saved = {n: params[n].detach().clone() for n in values}
    try:
        with torch.no_grad():
            for n, v in values.items():
                params[n].copy_(v)
        yield full
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every weight of ``model`` (names, dtypes, shapes, bytes): the exact identity of a
    full model for the distilled-emulator cache."""
    h = hashlib.sha256()
    for n, p in sorted(plain_params(model).items()):
        t = p.detach().to("cpu").contiguous()
        h.update(f"{n}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
