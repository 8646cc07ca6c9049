"""The one table of per-architecture facts fedtune needs, and a fallback for the rest.

``lora_targets``: default LoRA target modules (attention and MLP projections, as peft's own
defaults do for attention only; adapting the MLP too is what most LLM fine-tuning recipes use).
``layers``: dotted path to the decoder layer list, for layer-dropping emulators (offsite tuning).

A model type missing from the table is not refused: :func:`detect_arch` finds its decoder layer
list (the shallowest ``ModuleList`` of identical blocks holding linear layers) and takes the linear
layers of a block, less MoE routers, as the targets, and says which it chose. The rows below were
read off the models transformers builds (each block's ``nn.Linear``/``Conv1D`` names); MoE models
whose experts are fused parameters rather than linear layers (Mixtral, Qwen3-MoE, GPT-OSS in
current transformers) get their attention projections.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fedtune.errors import FedtuneError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchInfo:
    lora_targets: tuple[str, ...]
    layers: str


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_LIKE = ArchInfo(_ATTN + ("gate_proj", "up_proj", "down_proj"), "model.layers")
_ATTN_ONLY = ArchInfo(_ATTN, "model.layers")
_NEOX_LIKE = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

ARCHITECTURES: dict[str, ArchInfo] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "stablelm",
                                "olmo", "olmo2", "olmo3", "granite", "cohere", "cohere2", "smollm3")},
    # fused experts (not linear layers): LoRA on attention
    **{t: _ATTN_ONLY for t in ("mixtral", "qwen3_moe")},
    "qwen2_moe": ArchInfo(_ATTN + ("gate_proj", "up_proj", "down_proj"), "model.layers"),  # its shared expert
    "deepseek_v3": ArchInfo(("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
                             "up_proj", "down_proj"), "model.layers"),
    "glm": ArchInfo(_ATTN + ("gate_up_proj", "down_proj"), "model.layers"),
    "phi": ArchInfo(("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"), "model.layers"),
    "phi3": ArchInfo(("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "model.layers"),
    "starcoder2": ArchInfo(_ATTN + ("c_fc", "c_proj"), "model.layers"),
    "gpt2": ArchInfo(("c_attn", "c_proj", "c_fc"), "transformer.h"),
    "gpt_bigcode": ArchInfo(("c_attn", "c_proj", "c_fc"), "transformer.h"),
    "gptj": ArchInfo(("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"), "transformer.h"),
    "opt": ArchInfo(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "model.decoder.layers"),
    "gpt_neox": ArchInfo(_NEOX_LIKE, "gpt_neox.layers"),
    "bloom": ArchInfo(_NEOX_LIKE, "transformer.h"),
    "falcon": ArchInfo(_NEOX_LIKE, "transformer.h"),
}


def _is_router(block: Any, name: str, module: Any) -> bool:
    """MoE routing layers (a LoRA there would change which experts run, not what they compute)."""
    last = name.rsplit(".", 1)[-1]
    if "router" in last or last.endswith("expert_gate"):
        return True
    parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
    return last == "gate" and hasattr(parent, "experts")


def detect_arch(model: Any) -> ArchInfo:
    """Targets and layer list of a decoder missing from :data:`ARCHITECTURES`, found in ``model``."""
    import torch
    from transformers.pytorch_utils import Conv1D

    best: tuple[int, int, str, list[str]] | None = None
    for path, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0 or len({type(m) for m in mod}) != 1:
            continue
        block = mod[0]
        names = [n for n, m in block.named_modules()
                 if isinstance(m, (torch.nn.Linear, Conv1D)) and not _is_router(block, n, m)]
        if not names:
            continue
        key = (path.count("."), -len(mod))  # shallowest first (experts lists lie inside blocks), then longest
        if best is None or key < best[:2]:
            best = (*key, path, names)
    if best is None:
        raise FedtuneError(
            f"no default LoRA targets for model type '{model.config.model_type}' and no decoder layer list with "
            f"linear layers found in it; set peft.target_modules explicitly (known types: "
            f"{', '.join(sorted(ARCHITECTURES))})")
    _, _, path, names = best
    targets = tuple(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    log.warning("model type '%s' is not in fedtune's architecture table: LoRA targets the linear layers of its "
                "decoder blocks (%s.*): %s; set peft.target_modules to choose others",
                model.config.model_type, path, ", ".join(targets))
    return ArchInfo(targets, path)


def arch_info(model_type: str, model: Any = None) -> ArchInfo:
    """The table's row for ``model_type``; for a type it lacks, what :func:`detect_arch` finds in
    ``model`` (an error when no model is given)."""
    info = ARCHITECTURES.get(model_type)
    if info is not None:
        return info
    if model is not None:
        return detect_arch(model)
    raise FedtuneError(
        f"no default LoRA targets for model type '{model_type}'; set peft.target_modules "
        f"explicitly (known types: {', '.join(sorted(ARCHITECTURES))})"
    )
