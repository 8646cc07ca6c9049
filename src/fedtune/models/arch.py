"""The one table of per-architecture facts fedtune needs.

``lora_targets``: default LoRA target modules (attention and MLP projections, as peft's own
defaults do for attention only; adapting the MLP too is what most LLM fine-tuning recipes use).
``layers``: dotted path to the decoder layer list, for layer-dropping emulators (offsite tuning).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.errors import FedtuneError


@dataclass(frozen=True)
class ArchInfo:
    lora_targets: tuple[str, ...]
    layers: str


_LLAMA_LIKE = ArchInfo(
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), "model.layers"
)

ARCHITECTURES: dict[str, ArchInfo] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": ArchInfo(("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "model.layers"),
    "gpt2": ArchInfo(("c_attn", "c_proj", "c_fc"), "transformer.h"),
    "opt": ArchInfo(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "model.decoder.layers"),
    "gpt_neox": ArchInfo(
        ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"), "gpt_neox.layers"
    ),
    "bloom": ArchInfo(
        ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"), "transformer.h"
    ),
}


def arch_info(model_type: str) -> ArchInfo:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise FedtuneError(
            f"no default LoRA targets for model type '{model_type}'; set peft.target_modules "
            f"explicitly (known types: {', '.join(sorted(ARCHITECTURES))})"
        ) from None
