"""The per-architecture layer-layout table: where a causal LM keeps its transformer blocks.

Offsite tuning (:mod:`fedtune.offsite`) cuts a model into bottom and top adapter blocks and a
layer-dropped emulator of the middle ones, so it has to know, for every architecture, which
``nn.ModuleList`` holds the blocks, which config key counts them, and which config entries are
lists with one value per block (they must follow their blocks into the emulator: Qwen2's and
Gemma2's ``layer_types`` say which blocks use sliding-window attention).

This is its own table, not the ``layers`` field of :data:`fedtune.models.arch.ARCHITECTURES`
(that table may fall back to guessed defaults for LoRA targets): a block layout must never be
guessed. FS-LLM silently assumed ``transformer.h`` for any model it did not recognise, which
cuts the wrong module (or nothing) without a word; here an architecture without an entry is one
clear error that names this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.errors import FedtuneError


@dataclass(frozen=True)
class Layout:
    #: dotted path from the ``*ForCausalLM`` model to the ``nn.ModuleList`` of blocks
    blocks: str
    #: the config attribute holding the number of blocks
    num_layers: str = "num_hidden_layers"
    #: config attributes that hold one entry per block (subset with the blocks that are kept)
    per_layer: tuple[str, ...] = ("layer_types",)

    @property
    def pattern(self) -> str:
        """The ModuleList's own name (peft's ``layers_pattern``: ``layers``, ``h``)."""
        return self.blocks.rsplit(".", 1)[-1]


_DECODER = Layout("model.layers")

#: model_type (``config.model_type``) -> layout. Every architecture in
#: :data:`fedtune.models.arch.ARCHITECTURES` has an entry (a test checks it on a tiny model of each).
LAYOUTS: dict[str, Layout] = {
    "llama": _DECODER,  # SmolLM/SmolLM2 are llama
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "phi3": _DECODER,
    "gpt2": Layout("transformer.h", num_layers="n_layer"),
    "opt": Layout("model.decoder.layers"),
    "gpt_neox": Layout("gpt_neox.layers"),
    "bloom": Layout("transformer.h", num_layers="n_layer"),
}


def layout_of(model_type: str) -> Layout:
    """The layout of ``model_type``, or one clear error naming the table to extend."""
    try:
        return LAYOUTS[model_type]
    except KeyError:
        raise FedtuneError(
            f"offsite tuning does not know where model type '{model_type}' keeps its transformer blocks: "
            f"it has no entry in the layer-layout table fedtune.models.layout.LAYOUTS "
            f"(src/fedtune/models/layout.py; known: {', '.join(sorted(LAYOUTS))}). Add one: the dotted path "
            "of its block list (e.g. 'model.layers') and its config's layer-count key"
        ) from None
