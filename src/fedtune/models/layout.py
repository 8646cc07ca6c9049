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
from fedtune.models.arch import ARCHITECTURES


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


#: config attribute naming the number of blocks where it is not ``num_hidden_layers``
_NUM_LAYERS = {"gpt2": "n_layer", "gpt_bigcode": "n_layer", "gptj": "n_layer", "bloom": "n_layer"}

#: model_type (``config.model_type``) -> layout: one row for every architecture of
#: :data:`fedtune.models.arch.ARCHITECTURES`, whose block path it takes (one table of where the
#: blocks live, not two that can disagree); a test builds a tiny model of each family it has and
#: checks the path is its block list and the attribute its number of blocks.
LAYOUTS: dict[str, Layout] = {
    t: Layout(info.layers, num_layers=_NUM_LAYERS.get(t, "num_hidden_layers")) for t, info in ARCHITECTURES.items()}


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
