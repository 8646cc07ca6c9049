"""Base-model loading: embedded SmolLM2 (GGUF), tiny random models, local HF dirs, GGUF files, hub ids.

Architecture differences live in one table (:data:`ARCHITECTURES`), so the rest of fedtune stays
model-agnostic (peft's own habit).
"""

from fedtune.models.arch import ARCHITECTURES, ArchInfo, arch_info
from fedtune.models.loading import (
    EMBEDDED_MODELS,
    TINY_MODELS,
    load_model,
    load_tokenizer,
    model_fingerprint,
    probe_mismatch,
    weight_probe,
)

__all__ = [
    "ARCHITECTURES",
    "ArchInfo",
    "arch_info",
    "EMBEDDED_MODELS",
    "TINY_MODELS",
    "load_model",
    "load_tokenizer",
    "model_fingerprint",
    "probe_mismatch",
    "weight_probe",
]
