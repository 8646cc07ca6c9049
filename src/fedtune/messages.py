"""Typed messages between server and clients: named tensors + metrics + config, never pickled.

A :class:`Message` serialises to safetensors bytes: the tensors (any dtype, bfloat16 included,
with name and shape in the header) and a JSON metadata block for metrics/config. ``len()`` of
those bytes is what fedtune reports as bytes up/down, in simulation as in deployment.
The in-process transport really encodes and decodes every message, so both paths run the same
bytes through the same parser.

With a codec pipeline (``Message.codec``, see :mod:`fedtune.codecs` and docs/codecs.md) each
floating-point tensor ``w`` travels as parts ``w::data`` (+ ``w::scale``, ``w::idx``) and its spec
(original dtype and shape, each stage's name and parameters) rides in the metadata; a compressor
wraps the whole serialised message in an envelope — again safetensors: one ``uint8`` tensor
``payload`` and ``{"codec": ..., "size": ...}``. Decoding needs no configuration and trusts none of it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from fedtune.codecs import COMPRESSOR_TYPES, Pipeline, decode_tensors, encode_tensors
from fedtune.codecs.base import DTYPES, Spec, as_spec, numel
from fedtune.errors import MessageError
from fedtune.limits import MAX_MESSAGE_BYTES

__all__ = ["MAX_MESSAGE_BYTES", "Message", "MessageError", "decode", "encode"]

_META_KEY = "fedtune"
_ENVELOPE_KEY = "fedtune_envelope"
_PAYLOAD = "payload"
#: refuse to parse messages whose header declares more than this many bytes (hostile input).
#: bytes of decoded message allowed per expected tensor element (fp64 top-k at fraction 1 needs
#: 12) plus room for header and metrics: the cap on what a compressed message may expand to.
_BYTES_PER_ELEMENT = 16
_HEADER_ROOM = 1 << 20
#: without ``expect`` (defence in depth: every network path passes one), what a message's own length
#: allows: coded tensors may declare at most this many elements per byte of their parts, plus a
#: small allowance — int4 packs 2 per byte, top-k at fraction f about 1/(5f) (value + int32 index), so
#: 64 covers top-k fractions down to ~1/300; a 324-byte message can no longer ask for 16 GiB ...
_ELEMENTS_PER_BYTE = 64
_FREE_ELEMENTS = 1 << 16
#: ... and a compressed message may expand at most this factor, plus a little room for a small one
#: (real adapters, float noise, compress by a few x; the global adapter the clustered followers
#: decode never uses top-k)
_EXPANSION = 256
_ENVELOPE_ROOM = 1 << 16
#: metrics and config entries a message may carry, and the longest name or string value: what
#: fedtune sends is a dozen short names; anything far beyond is not a fedtune message.
MAX_ENTRIES = 64
MAX_NAME = 64
MAX_STRING = 1024
#: largest integer accepted: counts never get near it, and every int up to it is exact as a float
#: (the server divides and sums them as floats).
MAX_INT = 2**53


@dataclass
class Message:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    #: how to encode the tensors on the wire (``None``: plain safetensors); not itself sent —
    #: the bytes describe themselves.
    codec: Pipeline | None = None
    #: tensor groups (``group/name`` prefixes, see :mod:`fedtune.payload`) carried as differences
    #: from what the receiver sent under the same names (sent on the wire)
    delta: tuple[str, ...] = ()
    #: names of floating-point tensors the codec's lossy stages must leave exact (seeds, integer
    #: masks, ...); not itself sent — the bytes describe which tensors are coded
    exact: frozenset[str] = frozenset()


def encode(msg: Message) -> bytes:
    from safetensors.torch import save

    meta: dict[str, Any] = {"metrics": msg.metrics, "config": msg.config}
    if msg.delta:
        meta["delta"] = sorted(msg.delta)
    tensors = {k: v.detach().contiguous().cpu() for k, v in msg.tensors.items()}
    pipe = msg.codec
    if pipe is not None and pipe.stages:
        tensors, specs = encode_tensors(tensors, pipe.stages, skip=msg.exact)
        if specs:
            meta["codecs"] = specs
    data = save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    if pipe is not None and pipe.compressor is not None:
        body = pipe.compressor.compress(data)
        env = json.dumps({"codec": pipe.compressor.name, "size": len(data)})
        data = save({_PAYLOAD: torch.frombuffer(bytearray(body), dtype=torch.uint8)},
                    metadata={_ENVELOPE_KEY: env})
    return data


def _read(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Strictly parse one safetensors blob: (tensors, metadata)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES} limit")
    if len(data) < 8:
        raise MessageError("message shorter than its 8-byte header length")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise MessageError(f"header declares {header_len} bytes but only {len(data) - 8} follow")
    try:
        header = json.loads(data[8 : 8 + header_len])
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        # validated by the safetensors library: offsets, sizes vs dtype x shape, no overlaps
        tensors = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, RecursionError, TypeError) as e:
        raise MessageError(f"malformed message: {e}") from None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise MessageError("malformed message metadata")
    for k, t in tensors.items():
        if t.dtype not in DTYPES.values():
            raise MessageError(f"tensor '{k}' has dtype {t.dtype}, which messages never carry")
    return tensors, meta


def _json(raw: str, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise MessageError(f"malformed {what}") from None


def _open_envelope(tensors: dict[str, torch.Tensor], raw_env: str, limit: int) -> bytes:
    env = _json(raw_env, "compression envelope")
    if not isinstance(env, dict) or set(env) != {"codec", "size"}:
        raise MessageError("compression envelope must hold exactly codec and size")
    name, size = env["codec"], env["size"]
    if not isinstance(name, str) or name not in COMPRESSOR_TYPES:
        raise MessageError(f"unknown compressor {name!r}")
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= limit:
        raise MessageError(f"compressed message declares {size!r} bytes; allowed 8..{limit}")
    if set(tensors) != {_PAYLOAD} or tensors[_PAYLOAD].dtype != torch.uint8 or tensors[_PAYLOAD].dim() != 1:
        raise MessageError("compression envelope must hold exactly one uint8 vector 'payload'")
    return COMPRESSOR_TYPES[name].decompress(tensors[_PAYLOAD].numpy().tobytes(), size)


def _names(d: dict, what: str) -> None:
    if len(d) > MAX_ENTRIES:
        raise MessageError(f"{len(d)} {what} entries; at most {MAX_ENTRIES} are allowed")
    for k in d:
        if not 0 < len(k) <= MAX_NAME:
            raise MessageError(f"{what} name {k[:MAX_NAME]!r} is empty or longer than {MAX_NAME} characters")


def _is_number(v: Any) -> bool:
    """A finite float or an int within ±MAX_INT (bool is not a number here)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return -MAX_INT <= v <= MAX_INT
    return isinstance(v, float) and math.isfinite(v)


def _check_metrics(metrics: dict) -> None:
    """Metrics are what the server sums, divides and logs: finite numbers only, no null, no NaN
    (a NaN loss would poison the round's pooled loss and metrics.jsonl), no strings or lists."""
    _names(metrics, "metric")
    for k, v in metrics.items():
        if not _is_number(v):
            raise MessageError(f"metric '{k}' is {repr(v)[:40]}: metrics must be finite numbers "
                               f"(integers within ±2**53)")


def _check_config(config: dict) -> None:
    """Config (round, splits, flags) holds numbers, booleans, short strings or flat lists of them."""
    _names(config, "config")

    def scalar(v: Any) -> bool:
        return isinstance(v, bool) or _is_number(v) or (isinstance(v, str) and len(v) <= MAX_STRING)

    for k, v in config.items():
        if not (scalar(v) or (isinstance(v, list) and len(v) <= MAX_ENTRIES and all(scalar(x) for x in v))):
            raise MessageError(f"config '{k}' is not a number, boolean, short string or flat list of them")


def decode(data: bytes, *, expect: Spec | None = None, allow_nonfinite: bool = False) -> Message:
    """Parse bytes strictly. ``expect`` maps names to what the receiver requires: a
    :class:`~fedtune.codecs.base.TensorSpec`-like object with ``shape``, ``dtype`` and ``accepts``
    (a bounded variable first dimension allowed), or a plain ``(shape, dtype)`` pair.

    With ``expect``, a compressed message may expand to at most about 16 bytes per expected
    element (the largest allowed size), and coded tensors' declared shapes are checked before
    anything is rebuilt. Without it the message's own size bounds both: it may expand at most
    ``_EXPANSION``-fold, and its coded tensors may declare at most ``_ELEMENTS_PER_BYTE`` elements
    per byte of their parts.
    """
    tensors, meta = _read(data)
    if expect is not None:
        expect = {k: as_spec(v) for k, v in expect.items()}
        expected_elems = sum(numel(tuple(s.shape)) for s in expect.values())
        limit = min(MAX_MESSAGE_BYTES, _BYTES_PER_ELEMENT * expected_elems + _HEADER_ROOM)
    else:  # bounded by the message itself
        expected_elems, limit = None, min(MAX_MESSAGE_BYTES, _EXPANSION * len(data) + _ENVELOPE_ROOM)
    if _ENVELOPE_KEY in meta:
        if set(meta) != {_ENVELOPE_KEY}:
            raise MessageError("a compression envelope carries nothing but its payload")
        tensors, meta = _read(_open_envelope(tensors, meta[_ENVELOPE_KEY], limit))
        if _ENVELOPE_KEY in meta:
            raise MessageError("nested compression envelopes are not allowed")
    body = _json(meta.get(_META_KEY, "{}"), "message metadata")
    if not isinstance(body, dict):
        raise MessageError("message metadata is not an object")
    metrics, config = body.get("metrics") or {}, body.get("config") or {}
    delta = body.get("delta", [])
    if not isinstance(metrics, dict) or not isinstance(config, dict):
        raise MessageError("message metadata: metrics and config must be objects")
    if not (isinstance(delta, list) and len(delta) <= MAX_ENTRIES
            and all(isinstance(g, str) and 0 < len(g) <= MAX_NAME for g in delta) and len(set(delta)) == len(delta)):
        raise MessageError("message metadata: delta must be a list of distinct tensor group names")
    _check_metrics(metrics)
    _check_config(config)
    if expected_elems is not None:
        max_elems = expected_elems
    else:
        raw_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        max_elems = min(MAX_MESSAGE_BYTES // 2, _ELEMENTS_PER_BYTE * raw_bytes + _FREE_ELEMENTS)
    tensors = decode_tensors(tensors, body.get("codecs", {}), expect=expect, max_elements=max_elems)
    if expect is not None:
        if tensors.keys() != expect.keys():
            missing = sorted(expect.keys() - tensors.keys())[:3]
            extra = sorted(tensors.keys() - expect.keys())[:3]
            raise MessageError(f"tensor names differ: missing {missing}, unexpected {extra}")
        for k, want in expect.items():
            t = tensors[k]
            if not want.accepts(tuple(t.shape), t.dtype):
                raise MessageError(f"tensor '{k}': got {tuple(t.shape)} {t.dtype}, expected {want.describe()}")
    if not allow_nonfinite:
        for k, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise MessageError(f"tensor '{k}' holds NaN or Inf")
    return Message(tensors=tensors, metrics=metrics, config=config, delta=tuple(delta))
