"""The codec framework: tensor stages, byte compressors, pipelines, and the strict tensor decoder.

A tensor stage turns a *payload* tensor into a smaller payload plus named side tensors and a few
integer parameters (top-k: values + ``idx``; int8: codes + ``scale``); stages chain on the payload.
Everything the receiver needs travels with the bytes — original dtype and shape, each stage's name
and parameters — so decoding needs no configuration, and everything it reads is checked before it
allocates: the receiver derives the exact shape and dtype of every part from the declared spec and
rejects any mismatch (:class:`~fedtune.errors.MessageError`).

Hand-written on purpose: no maintained library quantises/sparsifies tensors *into safetensors
with a self-describing spec* (bitsandbytes/torchao quantise model weights in memory for compute,
with formats that are neither portable nor meant to be parsed from untrusted bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedtune.config import COMPRESSORS, CommConfig, check_codec_pipeline
from fedtune.errors import FedtuneError, MessageError

TensorDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TensorSpec:
    """What a received tensor must be: its exact shape and dtype — or, with ``variable``, a
    bounded first dimension: any length from 0 to ``shape[0]`` (FedKSeed's list of (seed, scalar)
    pairs; a stacked adapter whose rank depends on the round's clients)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    variable: bool = False

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        return cls(tuple(t.shape), t.dtype)

    def accepts(self, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        shape = tuple(shape)
        if dtype != self.dtype or len(shape) != len(self.shape):
            return False
        if self.variable:
            return 0 <= shape[0] <= self.shape[0] and shape[1:] == tuple(self.shape[1:])
        return shape == tuple(self.shape)

    def describe(self) -> str:
        dims = [str(d) for d in self.shape]
        if self.variable and dims:
            dims[0] = f"<={dims[0]}"
        return f"({', '.join(dims)}) {self.dtype}"


def as_spec(v: TensorSpec | tuple) -> TensorSpec:
    """A :class:`TensorSpec` from itself or a plain ``(shape, dtype)`` pair."""
    return v if isinstance(v, TensorSpec) else TensorSpec(tuple(v[0]), v[1])


#: the receiver's spec: name -> what the tensor must be (a TensorSpec, or a (shape, dtype) pair)
Spec = dict[str, "TensorSpec | tuple[tuple[int, ...], torch.dtype]"]

#: separates a tensor's name from its part (``name::data``, ``name::scale``, ``name::idx``)
SEP = "::"

#: the only dtypes a message may hold (safetensors can carry others, e.g. float8, that we never send)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_DIMS = 8


@dataclass(frozen=True)
class PartSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


class TensorStage:
    """One lossy step on a floating-point payload. Subclasses are registered by ``name``."""

    name: ClassVar[str]
    #: the integer parameters that travel with the bytes (their ranges are checked by ``plan``)
    params: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls, comm: CommConfig) -> TensorStage:
        return cls()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, TensorDict, dict[str, int]]:
        """payload -> (new payload, side tensors, parameters)."""
        raise NotImplementedError

    @classmethod
    def plan(cls, shape: tuple[int, ...], dtype: torch.dtype, p: dict[str, int]) -> tuple[PartSpec, dict[str, PartSpec]]:
        """From the input's shape/dtype and the (already type-checked) parameters, the exact shape and
        dtype of the output payload and of each side tensor. Raises MessageError on bad parameters."""
        raise NotImplementedError

    @classmethod
    def decode(cls, payload: torch.Tensor, side: TensorDict, p: dict[str, int], shape: tuple[int, ...],
               dtype: torch.dtype) -> torch.Tensor:
        """Inverse of ``encode`` (up to its loss): a tensor of ``shape`` and ``dtype``."""
        raise NotImplementedError


class Compressor:
    """A lossless byte codec over the whole serialised message."""

    name: ClassVar[str]

    def __init__(self, level: int | None = None):
        self.level = level

    def compress(self, data: bytes) -> bytes:
        raise NotImplementedError

    @classmethod
    def decompress(cls, data: bytes, size: int) -> bytes:
        """Exactly ``size`` bytes or MessageError — never allocating more than ``size`` (+1)."""
        raise NotImplementedError


STAGES: dict[str, type[TensorStage]] = {}
COMPRESSOR_TYPES: dict[str, type[Compressor]] = {}


def register_stage(cls):
    STAGES[cls.name] = cls
    return cls


def register_compressor(cls):
    COMPRESSOR_TYPES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Pipeline:
    """What one direction does to a message: tensor stages in order, then an optional compressor."""

    stages: tuple[TensorStage, ...] = ()
    compressor: Compressor | None = None

    @property
    def lossy(self) -> bool:
        return bool(self.stages)

    def names(self) -> list[str]:
        return [s.name for s in self.stages] + ([self.compressor.name] if self.compressor else [])

    def roundtrip(self, tensors: TensorDict) -> TensorDict:
        """What the receiver will decode from ``tensors``: the tensor stages encoded and decoded in
        memory. Serialisation and compression are lossless, so this equals decoding the real bytes
        (the stages are deterministic); the server uses it to know what clients hold, a client to
        compute its error-feedback residual."""
        if not self.stages:
            return dict(tensors)
        out = {}
        for k, t in tensors.items():
            parts, spec = encode_tensor(t, self.stages)
            out[k] = decode_tensor(k, parts, spec) if spec is not None else t
        return out


def build_pipeline(comm: CommConfig, direction: str) -> Pipeline:
    """The codec pipeline of ``direction`` (``up`` or ``down``) from the ``comm`` config section."""
    names = list(getattr(comm, direction))
    check_codec_pipeline(names, f"comm.{direction}")
    stages: list[TensorStage] = []
    compressor = None
    for n in names:
        if n in COMPRESSORS:
            cls = COMPRESSOR_TYPES[n]
            compressor = cls(comm.level)
            compressor.compress(b"")  # a missing optional dependency fails here, with its fix
        else:
            stages.append(STAGES[n].from_config(comm))
    return Pipeline(tuple(stages), compressor)


# ---- encoding ------------------------------------------------------------------------------
def encode_tensor(t: torch.Tensor, stages: tuple[TensorStage, ...]) -> tuple[TensorDict, dict[str, Any] | None]:
    """Run ``stages`` on one tensor: (parts by suffix, spec) — or (``{"": t}``, None) when the tensor
    is not floating point (integer/bool tensors travel as they are)."""
    if not stages or t.dtype not in FLOAT_DTYPES:
        return {"": t}, None
    payload = t
    parts: TensorDict = {}
    spec: dict[str, Any] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "stages": []}
    for st in stages:
        payload, side, p = st.encode(payload)
        parts.update(side)
        spec["stages"].append({"codec": st.name, **p})
    parts["data"] = payload
    return {k: v.contiguous() for k, v in parts.items()}, spec


def encode_tensors(tensors: TensorDict, stages: tuple[TensorStage, ...],
                   skip: frozenset[str] | set[str] = frozenset()) -> tuple[TensorDict, dict[str, Any]]:
    """Every floating-point tensor through ``stages`` (FS-LLM's quantiser only touched parameters
    whose names contained ``fc``/``conv``, a no-op on LoRA; here every adapter tensor is coded),
    except those named in ``skip`` (tensors that must arrive exactly).
    Returns the named tensors to serialise and the per-tensor specs for the metadata."""
    out: TensorDict = {}
    specs: dict[str, Any] = {}
    for name, t in tensors.items():
        if SEP in name:
            raise ValueError(f"tensor name '{name}' contains the reserved separator '{SEP}'")
        parts, spec = encode_tensor(t, () if name in skip else stages)
        if spec is None:
            out[name] = t
        else:
            specs[name] = spec
            out.update({f"{name}{SEP}{k}": v for k, v in parts.items()})
    return out, specs


# ---- strict decoding -----------------------------------------------------------------------
def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise MessageError(f"{what} must be an integer, got {v!r}")
    return v


def parse_spec(name: str, spec: Any) -> tuple[tuple[int, ...], torch.dtype, list[tuple[type[TensorStage], dict[str, int]]]]:
    """Type-check one tensor's declared spec (shape, dtype, stages) without trusting any of it."""
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "stages"}:
        raise MessageError(f"tensor '{name}': codec spec must have exactly dtype, shape, stages")
    dtype = DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype not in FLOAT_DTYPES:
        raise MessageError(f"tensor '{name}': coded tensors must be floating point, got dtype {spec['dtype']!r}")
    shape = spec["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise MessageError(f"tensor '{name}': shape must be a list of at most {MAX_DIMS} sizes")
    shape = tuple(_int(s, f"tensor '{name}' shape") for s in shape)
    if any(s < 0 for s in shape):
        raise MessageError(f"tensor '{name}': negative size in shape {shape}")
    raw = spec["stages"]
    if not isinstance(raw, list) or not raw or not all(isinstance(s, dict) for s in raw):
        raise MessageError(f"tensor '{name}': stages must be a non-empty list of objects")
    names = [s.get("codec") for s in raw]
    if not all(isinstance(n, str) and n in STAGES for n in names):
        bad = next(n for n in names if not (isinstance(n, str) and n in STAGES))
        raise MessageError(f"tensor '{name}': unknown codec {bad!r}")
    try:
        check_codec_pipeline(names, f"tensor '{name}' stages")
    except ValueError as e:
        raise MessageError(str(e)) from None
    stages = []
    for s, n in zip(raw, names):
        cls = STAGES[n]
        p = {k: v for k, v in s.items() if k != "codec"}
        if set(p) != set(cls.params):
            raise MessageError(f"tensor '{name}': codec {n} takes parameters {list(cls.params)}, got {sorted(p)}")
        stages.append((cls, {k: _int(v, f"tensor '{name}' {n}.{k}") for k, v in p.items()}))
    return shape, dtype, stages


def check_parts(name: str, shape: tuple[int, ...], dtype: torch.dtype,
                stages: list[tuple[type[TensorStage], dict[str, int]]], parts: TensorDict) -> list[tuple[PartSpec, dict[str, PartSpec]]]:
    """Derive every part's exact shape and dtype from the declared spec and compare with what came."""
    plans = []
    cur = PartSpec(shape, dtype)
    want: dict[str, PartSpec] = {}
    for cls, p in stages:
        out, side = cls.plan(cur.shape, cur.dtype, p)
        plans.append((cur, side))
        want.update(side)
        cur = out
    want["data"] = cur
    if set(parts) != set(want):
        raise MessageError(f"tensor '{name}': parts {sorted(parts)} do not match its codecs (need {sorted(want)})")
    for k, ps in want.items():
        t = parts[k]
        if tuple(t.shape) != ps.shape or t.dtype != ps.dtype:
            raise MessageError(f"tensor '{name}' part '{k}': got {tuple(t.shape)} {t.dtype}, "
                               f"its codec spec implies {ps.shape} {ps.dtype}")
    return plans


def decode_tensor(name: str, parts: TensorDict, spec: Any, expect: TensorSpec | tuple | None = None) -> torch.Tensor:
    shape, dtype, stages = parse_spec(name, spec)
    if expect is not None and not as_spec(expect).accepts(shape, dtype):
        raise MessageError(f"tensor '{name}': declares {shape} {dtype}, expected {as_spec(expect).describe()}")
    plans = check_parts(name, shape, dtype, stages, parts)
    payload = parts["data"]
    for (cls, p), (inp, side) in zip(reversed(stages), reversed(plans)):
        payload = cls.decode(payload, {k: parts[k] for k in side}, p, inp.shape, inp.dtype)
    return payload


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def decode_tensors(raw: TensorDict, specs: Any, *, expect: Spec | None, max_elements: int) -> TensorDict:
    """Rebuild the named tensors of a message from its stored parts and per-tensor codec specs.

    Checks run before anything is reconstructed: names (against ``expect`` when given), declared
    shapes/dtypes, the total declared size (``max_elements``: a small top-k message cannot declare a
    terabyte tensor), and every part's exact shape and dtype.
    """
    if not isinstance(specs, dict):
        raise MessageError("codec specs must be an object")
    grouped: dict[str, TensorDict] = {}
    plain: TensorDict = {}
    for key, t in raw.items():
        if SEP in key:
            base, _, part = key.partition(SEP)
            if base not in specs:
                raise MessageError(f"part '{key}' belongs to no coded tensor")
            grouped.setdefault(base, {})[part] = t
        else:
            plain[key] = t
    for base in specs:
        if not isinstance(base, str) or base in plain or base not in grouped:
            raise MessageError(f"coded tensor '{base}' has no parts, or also travels uncoded")
    names = set(plain) | set(specs)
    if expect is not None and names != set(expect):
        missing = sorted(set(expect) - names)[:3]
        extra = sorted(names - set(expect))[:3]
        raise MessageError(f"tensor names differ: missing {missing}, unexpected {extra}")
    declared = sum(numel(tuple(s["shape"])) if isinstance(s, dict) and isinstance(s.get("shape"), list)
                   and all(isinstance(x, int) and x >= 0 for x in s["shape"]) and len(s["shape"]) <= MAX_DIMS
                   else 0 for s in specs.values())
    if declared > max_elements:
        raise MessageError(f"codec specs declare {declared} elements, more than the {max_elements} allowed")
    out: TensorDict = dict(plain)
    for base, spec in specs.items():
        out[base] = decode_tensor(base, grouped[base], spec, expect.get(base) if expect is not None else None)
    return out


def missing_dependency(name: str, package: str) -> FedtuneError:
    return FedtuneError(f"codec '{name}' needs the '{package}' package: pip install 'fedtune[codecs]' "
                        f"(or pip install {package})")
