"""Size limits every end of the wire enforces (a module with no imports, so the per-message Flower
ClientApp process can read them without importing torch)."""

#: the largest fedtune message accepted from anyone (an adapter of ~1G fp32 values)
MAX_MESSAGE_BYTES = 4 << 30
