"""Message codecs: shrink what travels, per direction, self-describing and strictly parsed.

Configured by the ``comm`` config section (``comm.up: [topk, int8, zstd]``, ``comm.down: [bf16]``).
Tensor stages (:mod:`.quant`, :mod:`.sparse`) code every floating-point tensor; a compressor
(:mod:`.compress`) then squeezes the whole serialised message. See docs/codecs.md.
"""

from fedtune.codecs import compress, quant, sparse  # noqa: F401  (register the codecs)
from fedtune.codecs.base import (
    COMPRESSOR_TYPES,
    SEP,
    STAGES,
    Compressor,
    Pipeline,
    TensorStage,
    build_pipeline,
    decode_tensors,
    encode_tensors,
)

__all__ = ["COMPRESSOR_TYPES", "SEP", "STAGES", "Compressor", "Pipeline", "TensorStage", "build_pipeline",
           "decode_tensors", "encode_tensors"]
