"""Message codecs: round trips for every dtype and every pipeline, hand-worked cases, error feedback,
config validation, and hostile bytes (which must raise MessageError and nothing else)."""

import builtins
import itertools
import json
import math
import pickle
import random
import re
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from fedtune.codecs import COMPRESSOR_TYPES, STAGES, build_pipeline
from fedtune.config import COMPRESSORS, SPARSIFIERS, VALUE_CODECS, CommConfig, config_from_dict
from fedtune.errors import FedtuneError
from fedtune.messages import Message, MessageError, decode, encode
from fedtune.state import ClientState
from fedtune.transport import parse_reply

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]
PIPELINES = [[n for n in combo if n] for combo in
             itertools.product([None, *SPARSIFIERS], [None, *VALUE_CODECS], [None, *COMPRESSORS])]


def pipe(names, **kw):
    return build_pipeline(CommConfig(up=names, **kw), "up")


def test_every_configured_codec_is_implemented():
    assert set(STAGES) == set(SPARSIFIERS + VALUE_CODECS)
    assert set(COMPRESSOR_TYPES) == set(COMPRESSORS)
    assert len(PIPELINES) == 40


# ---- independent reference (numpy, written from the definitions in docs/codecs.md) -----------
def ref_quant(v: np.ndarray, qmax: int, block: int) -> np.ndarray:
    out = np.empty_like(v, dtype=np.float64)
    for i in range(0, len(v), block):
        b = v[i : i + block].astype(np.float32)
        s = np.float32(np.abs(b).max()) / np.float32(qmax)
        out[i : i + block] = 0 if s == 0 else np.clip(np.round(b / s), -qmax, qmax) * s
    return out


def reference(x: torch.Tensor, names: list[str], fraction: float, block: int) -> torch.Tensor:
    """What decoding must give, computed without fedtune's codec code."""
    if not x.is_floating_point():
        return x
    flat = x.reshape(-1)
    pos = np.arange(flat.numel())
    if "topk" in names:
        k = max(1, math.ceil(fraction * flat.numel()))
        mag = flat.abs().float().numpy()
        pos = np.sort(np.argsort(-mag, kind="stable")[:k])
    vals = flat[torch.from_numpy(pos)]
    if "fp16" in names:
        vals = vals.clamp(-65504, 65504).to(torch.float16)
    elif "bf16" in names:
        vals = vals.to(torch.bfloat16)
    elif "int8" in names or "int4" in names:
        q = ref_quant(vals.float().numpy(), 127 if "int8" in names else 7, block)
        vals = torch.from_numpy(q).float()
    dense = torch.zeros(flat.numel(), dtype=x.dtype)
    dense[torch.from_numpy(pos)] = vals.to(x.dtype)
    return dense.reshape(x.shape)


def sample(dtype, shape=(7, 13), seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 0.3).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    lo, hi = (0, 255) if dtype == torch.uint8 else (-100, 100)
    return torch.randint(lo, hi, shape, generator=g).to(dtype)


@pytest.mark.parametrize("names", PIPELINES, ids=lambda n: "+".join(n) or "plain")
def test_roundtrip_every_dtype_every_pipeline(names):
    p = pipe(names, topk_fraction=0.2, block_size=16)
    tensors = {f"t.{str(d).split('.')[-1]}": sample(d, seed=i) for i, d in enumerate(DTYPES)}
    tensors["odd"] = torch.randn(3, 5, 3)  # 45 entries: odd count (int4 nibble padding), short last block
    tensors["empty"] = torch.zeros(0, 4)
    data = encode(Message(tensors, metrics={"loss": 1.25}, config={"round": 3}, codec=p))
    out = decode(data, expect={k: (tuple(v.shape), v.dtype) for k, v in tensors.items()})
    assert out.metrics == {"loss": 1.25} and out.config == {"round": 3}
    for k, x in tensors.items():
        y = out.tensors[k]
        assert y.dtype == x.dtype and y.shape == x.shape, k
        want = reference(x, names, 0.2, 16)
        assert torch.equal(y, want), (k, (y.double() - want.double()).abs().max())
    rt = p.roundtrip(tensors)  # what a sender computes for error feedback equals what arrives
    assert all(torch.equal(rt[k], out.tensors[k]) for k in tensors)
    if not p.lossy:
        assert all(torch.equal(out.tensors[k], tensors[k]) for k in tensors)


def test_quantisation_error_bounds():
    x = torch.randn(10_000, dtype=torch.float64)
    for name, qmax in (("int8", 127), ("int4", 7)):
        y = decode(encode(Message({"x": x}, codec=pipe([name], block_size=64)))).tensors["x"]
        # at most half a quantisation step (absmax / qmax / 2) per block, plus fp32 rounding
        absmax = torch.nn.functional.pad(x, (0, -len(x) % 64)).reshape(-1, 64).abs().amax(1)
        bound = (absmax / qmax / 2).repeat_interleave(64)[: len(x)] * (1 + 1e-6) + 1e-7 * x.abs()
        assert ((y - x).abs() <= bound).all(), name


def test_int8_and_int4_wire_bytes_by_hand():
    # int8, block 2: blocks [1, -0.5] (scale 1/127) and [0.25, 2] (scale 2/127)
    # codes: 127, round(-63.5) = -64 (half to even), round(15.875) = 16, 127
    data = encode(Message({"w": torch.tensor([1.0, -0.5, 0.25, 2.0])}, codec=pipe(["int8"], block_size=2)))
    parts = load(data)
    assert parts["w::data"].tolist() == [127, -64, 16, 127]
    assert torch.allclose(parts["w::scale"], torch.tensor([1 / 127, 2 / 127]))
    # int4, block 4: scale 7/7 = 1; codes 7, -7, round(3.5) = 4, 0 -> nibbles q+8 = 15, 1, 12, 8
    # packed low nibble first: 15 | 1 << 4 = 31, 12 | 8 << 4 = 140; fifth value 0.5 -> own block
    data = encode(Message({"w": torch.tensor([7.0, -7.0, 3.5, 0.0, 0.5])}, codec=pipe(["int4"], block_size=4)))
    parts = load(data)
    assert parts["w::data"].tolist() == [31, 140, 15 | 8 << 4]  # last: code 7 (+8 = 15), pad nibble 8
    assert parts["w::scale"].tolist() == pytest.approx([1.0, 0.5 / 7])
    assert decode(data).tensors["w"].tolist() == pytest.approx([7.0, -7.0, 4.0, 0.0, 0.5])


def test_topk_wire_format_by_hand():
    x = torch.tensor([[0.5, -2.0, 0.0], [1.0, 0.1, -3.0]])  # k = ceil(0.5 * 6) = 3: -3, -2, 1
    parts = load(encode(Message({"w": x}, codec=pipe(["topk"], topk_fraction=0.5))))
    assert parts["w::idx"].tolist() == [1, 2, 2]  # positions 1, 3, 5 as gaps
    assert parts["w::data"].tolist() == [-2.0, 1.0, -3.0]
    assert parts["w::idx"].dtype == torch.int32


def test_fp16_saturates_instead_of_overflowing():
    x = torch.tensor([1e6, -1e6, 1.0])
    y = decode(encode(Message({"w": x}, codec=pipe(["fp16"])))).tensors["w"]
    assert y.tolist() == [65504.0, -65504.0, 1.0]


def test_compression_shrinks_and_bytes_are_what_travels():
    x = {"a": torch.randn(64, 64), "b": torch.randn(64, 8)}
    sizes = {tuple(n): len(encode(Message(x, codec=pipe(n)))) for n in
             (["int8"], ["int8", "zstd"], ["int8", "deflate"], [], ["bf16"])}
    n = 64 * 72
    assert 4 * n < sizes[()] < 4 * n + 1024
    assert 2 * n < sizes[("bf16",)] < 2 * n + 1024
    assert n < sizes[("int8",)] < n * 1.1 + 1024  # codes + one fp32 scale per 64
    assert sizes[("int8", "zstd")] < sizes[("int8",)] and sizes[("int8", "deflate")] < sizes[("int8",)]


# ---- error feedback against a hand computation ------------------------------------------------
def _wire(names, ef=True, fraction=0.5):
    from fedtune.algorithms.base import Algorithm
    from fedtune.payload import Wire

    return Wire(CommConfig(up=names, topk_fraction=fraction, error_feedback=ef), Algorithm.groups)


def _send(wire, local, received, state):
    """A client's reply of adapter ``local`` after receiving ``received``: (what the server decodes
    for it, the reply's metrics)."""
    from fedtune.algorithms import ClientResult, Instruction

    msg = wire.result(ClientResult({"adapter": local}), Instruction({"adapter": received}), state)
    assert msg.delta == ("adapter",)  # a lossy codec runs: the adapter travels as a difference
    return decode(encode(msg)).tensors["adapter/w"], msg.metrics


def test_error_feedback_by_hand():
    w, state = _wire(["topk"]), ClientState()
    g0 = torch.tensor([1.0, 1.0, 1.0, 1.0])
    # round 1: delta = [0.5, -2, 1, 0.1]; top-2 sends [0, -2, 1, 0]; residual [0.5, 0, 0, 0.1]
    sent, m = _send(w, {"w": g0 + torch.tensor([0.5, -2.0, 1.0, 0.1])}, {"w": g0}, state)
    assert torch.allclose(sent, torch.tensor([0.0, -2.0, 1.0, 0.0]))
    assert torch.allclose(state.group("ef")["adapter/w"], torch.tensor([0.5, 0.0, 0.0, 0.1]))
    assert m["up_rel_error"] == pytest.approx(math.sqrt(0.26) / math.sqrt(0.25 + 4 + 1 + 0.01))
    # round 2: delta [0.1, 0.2, -0.3, 0.05] + residual = [0.6, 0.2, -0.3, 0.15]; top-2 sends
    # [0.6, 0, -0.3, 0]; residual [0, 0.2, 0, 0.15]
    g1 = torch.tensor([2.0, -1.0, 0.0, 3.0])
    sent, _ = _send(w, {"w": g1 + torch.tensor([0.1, 0.2, -0.3, 0.05])}, {"w": g1}, state)
    assert torch.allclose(sent, torch.tensor([0.6, 0.0, -0.3, 0.0]))
    assert torch.allclose(state.group("ef")["adapter/w"], torch.tensor([0.0, 0.2, 0.0, 0.15]))


def test_without_error_feedback_the_residual_is_dropped():
    w, state = _wire(["topk"], ef=False), ClientState()
    g = torch.zeros(4)
    _send(w, {"w": torch.tensor([0.5, -2.0, 1.0, 0.1])}, {"w": g}, state)
    sent, _ = _send(w, {"w": torch.tensor([0.1, 0.2, -0.3, 0.05])}, {"w": g}, state)
    assert state.group("ef") == {}
    assert torch.allclose(sent, torch.tensor([0.0, 0.2, -0.3, 0.0]))  # top-2 of the delta alone


def test_error_feedback_with_quantisation_keeps_the_sum():
    # whatever the codec, sent + new residual == delta + old residual (nothing is lost)
    w, state = _wire(["topk", "int4"], fraction=0.3), ClientState()
    rng = torch.Generator().manual_seed(1)
    total_delta, total_sent = torch.zeros(50), torch.zeros(50)
    for _ in range(5):
        d = torch.randn(50, generator=rng)
        sent, _ = _send(w, {"w": d}, {"w": torch.zeros(50)}, state)
        total_delta += d
        total_sent += sent
    assert torch.allclose(total_sent + state.group("ef")["adapter/w"], total_delta, atol=1e-5)


# ---- config validation --------------------------------------------------------------------------
@pytest.mark.parametrize("comm,needle", [
    ({"up": ["int16"]}, "did you mean 'int8'"),
    ({"down": ["zstdd"]}, "did you mean 'zstd'"),
    ({"up": ["topk", "gzip", "int8"]}, "in that order"),
    ({"up": ["int8", "int4"]}, "at most one value codec"),
    ({"down": ["topk"]}, "comm.down cannot use topk"),
    ({"up": ["zstd"], "level": 30}, "out of range for zstd"),
    ({"up": ["gzip"], "level": 12}, "out of range for gzip"),
    ({"topk_fraction": 0}, "topk_fraction"),
    ({"block_size": 1}, "block_size"),
])
def test_bad_codec_config_is_one_clear_error(comm, needle):
    with pytest.raises(FedtuneError, match="invalid config") as e:
        config_from_dict({"comm": comm})
    assert needle in str(e.value)


def test_unknown_comm_key_suggests():
    with pytest.raises(FedtuneError, match="did you mean 'error_feedback'"):
        config_from_dict({"comm": {"error_feedbak": True}})


# ---- hostile bytes ----------------------------------------------------------------------------
SPEC = {"a": ((8, 16), torch.float32), "b": ((16,), torch.float32)}


#: the same tensors as a reply's ``adapter`` group (what a server expects of an adapter like SPEC)
GSPEC = {f"adapter/{k}": v for k, v in SPEC.items()}


def _good(names=("topk", "int8", "zstd"), spec=SPEC):
    t = {k: torch.randn(s) for k, (s, _) in spec.items()}
    return encode(Message(t, metrics={"loss": 1.0}, codec=pipe(list(names), topk_fraction=0.3)))


def _forge(tensors, meta=None, envelope=None):
    md = {"fedtune": json.dumps(meta or {})} if envelope is None else {"fedtune_envelope": json.dumps(envelope)}
    return save(tensors, metadata=md)


def _coded(shape, stages, parts):
    return _forge({f"a::{k}": v for k, v in parts.items()},
                  {"codecs": {"a": {"dtype": "float32", "shape": list(shape), "stages": stages}}})


@pytest.mark.parametrize("data,needle", [
    # a tiny top-k message declaring a terabyte tensor: refused before anything is allocated
    (lambda: _coded([10**12], [{"codec": "topk", "k": 1}],
                    {"data": torch.ones(1), "idx": torch.zeros(1, dtype=torch.int32)}), "elements"),
    (lambda: _coded([4], [{"codec": "int9", "block": 2}], {"data": torch.ones(4)}), "unknown codec"),
    (lambda: _coded([4], [{"codec": "int8", "block": 2}],
                    {"data": torch.ones(4, dtype=torch.int8), "scale": torch.ones(3)}), "implies"),
    (lambda: _coded([4], [{"codec": "int8", "block": 2}],
                    {"data": torch.ones(4, dtype=torch.int8), "scale": torch.tensor([1.0, float("inf")])}),
     "scales"),
    (lambda: _coded([4], [{"codec": "int8", "block": 2, "evil": "__import__('os')"}],
                    {"data": torch.ones(4, dtype=torch.int8), "scale": torch.ones(2)}), "parameters"),
    (lambda: _coded([4], [{"codec": "topk", "k": 2}],
                    {"data": torch.ones(2), "idx": torch.tensor([3, 2], dtype=torch.int32)}), "out of range"),
    (lambda: _coded([4], [{"codec": "topk", "k": 2}],
                    {"data": torch.ones(2), "idx": torch.tensor([1, 0], dtype=torch.int32)}), "increasing"),
    (lambda: _coded([4], [{"codec": "int8", "block": 2}, {"codec": "topk", "k": 2}],
                    {"data": torch.ones(2)}), "in that order"),
    (lambda: _coded([4], [{"codec": "fp16"}], {"data": torch.tensor([1.0, 2, 3, float("nan")]).half()}), "NaN"),
    (lambda: _forge({"a::data": torch.ones(4)}, {"codecs": []}), "object"),
    (lambda: _forge({"a::data": torch.ones(4)}, {}), "belongs to no coded tensor"),
    (lambda: _forge({"payload": torch.zeros(10, dtype=torch.uint8)}, envelope={"codec": "zstd", "size": 10**15}),
     "declares"),
    (lambda: _forge({"payload": torch.zeros(10, dtype=torch.uint8)}, envelope={"codec": "lzma", "size": 100}),
     "unknown compressor"),
    (lambda: _forge({"payload": torch.zeros(10, dtype=torch.uint8)}, envelope={"codec": "gzip", "size": 100}),
     "corrupt"),
])
def test_hostile_messages_are_rejected_with_a_reason(data, needle):
    with pytest.raises(MessageError, match=needle):
        decode(data(), expect={"a": ((4,), torch.float32)})


def test_decompression_bombs_are_capped():
    big = b"\0" * (64 << 20)  # 64 MiB of zeros: compresses to a few KiB
    for codec, blob in (("deflate", zlib.compress(big, 9)), ("zstd", __import__("zstandard").compress(big))):
        bomb = _forge({"payload": torch.frombuffer(bytearray(blob), dtype=torch.uint8)},
                      envelope={"codec": codec, "size": len(big)})
        with pytest.raises(MessageError, match="allowed"):
            decode(bomb, expect=SPEC)  # the expected adapter is 144 floats: 64 MiB is not plausible
        # lying about the size does not help: the stream is cut at the declared size
        liar = _forge({"payload": torch.frombuffer(bytearray(blob), dtype=torch.uint8)},
                      envelope={"codec": codec, "size": 4096})
        with pytest.raises(MessageError, match="exactly|declares|holds"):
            decode(liar, expect=SPEC)


def test_nested_envelopes_and_extra_metadata_are_rejected():
    inner = _good(("int8", "gzip"))
    nested = _forge({"payload": torch.frombuffer(bytearray(zlib.compress(inner)), dtype=torch.uint8)},
                    envelope={"codec": "deflate", "size": len(inner)})
    with pytest.raises(MessageError, match="nested"):
        decode(nested, expect=SPEC)


def test_pickle_payloads_are_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    blob = pickle.dumps({"a": Evil()})
    # decode must need neither unpickling nor eval nor a fresh import of a pickle-like module
    real_import = builtins.__import__
    loaded = set(__import__("sys").modules)

    def guarded_import(name, *a, **kw):
        if name in ("pickle", "dill", "marshal") and name not in loaded:
            raise AssertionError(f"decode imported {name}")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(pickle, "loads", lambda *a, **k: (_ for _ in ()).throw(AssertionError("unpickled")))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("unpickled")))
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: (_ for _ in ()).throw(AssertionError("eval")))
    monkeypatch.setattr(builtins, "__import__", guarded_import)
    for data in (blob, b"\x08\0\0\0\0\0\0\0" + blob, _forge({"payload": torch.frombuffer(
            bytearray(zlib.compress(blob)), dtype=torch.uint8)}, envelope={"codec": "deflate", "size": len(blob)})):
        with pytest.raises(MessageError):
            decode(data, expect=SPEC)
    assert not marker.exists()
    decode(_good(), expect=SPEC)  # and a good message still decodes under the same guards


def _mutations(rng: random.Random, bases: list[bytes], n: int):
    for i in range(n):
        kind = i % 5
        base = bases[rng.randrange(len(bases))]
        if kind == 0:  # random bytes
            yield bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        elif kind == 1:  # truncated
            yield base[: rng.randrange(len(base))]
        elif kind == 2:  # flipped bytes anywhere
            b = bytearray(base)
            for _ in range(rng.randint(1, 6)):
                b[rng.randrange(len(b))] = rng.getrandbits(8)
            yield bytes(b)
        elif kind == 3:  # edits inside the JSON header (sizes, shapes, names, numbers)
            hl = int.from_bytes(base[:8], "little")
            header = bytearray(base[8 : 8 + hl])
            digits = [j for j, c in enumerate(header) if chr(c).isdigit()]
            for _ in range(rng.randint(1, 3)):
                if digits:
                    header[rng.choice(digits)] = ord(rng.choice("0123456789"))
            yield base[:8] + bytes(header) + base[8 + hl :]
        else:  # a valid header length with garbage after, or a huge declared header length
            yield rng.getrandbits(64).to_bytes(8, "little") + base[8:]


def test_fuzz_thousands_of_hostile_inputs_never_crash_the_server():
    rng = random.Random(0)
    bases = [_good(n) for n in (("topk", "int8", "zstd"), ("int4", "gzip"), ("bf16",), ("topk", "fp16"),
                                ("int8", "deflate"), ())]
    bases.append(encode(Message({k: torch.randn(s) for k, (s, _) in SPEC.items()}, metrics={"x": 2.0})))
    outcomes = {"ok": 0, "rejected": 0}
    for data in _mutations(rng, bases, 3000):
        r = parse_reply("c", "fit", data, bytes_down=0, seconds=0.0, expect=SPEC)  # must not raise
        assert r.bytes_up == len(data)
        if r.message is None:
            assert r.error
            outcomes["rejected"] += 1
        else:  # a mutation that survives parsing is still well-formed and finite
            assert {k: (tuple(t.shape), t.dtype) for k, t in r.message.tensors.items()} == SPEC
            assert all(torch.isfinite(t).all() for t in r.message.tensors.values())
            outcomes["ok"] += 1
    assert outcomes["rejected"] > 2000


# values a hostile client may put in its metrics: none of them may reach the round's sums
_HOSTILE_VALUES = [None, float("nan"), float("inf"), -float("inf"), 10**400, 2**60, -7, "1.5", True, [1], {"a": 1},
                   1e308, 0, 3, 2.5]
_FIT_KEYS = ["train_loss", "train_label_tokens", "train_tokens", "train_seconds", "skipped_nonfinite", "lr",
             "steps", "local_val_tokens", "local_val_loss_sum", "up_rel_error", "x" * 100, ""]
_EVAL_KEYS = ["val_loss_sum", "val_tokens", "test_loss_sum", "test_tokens", "other"]


def _hostile_metrics(rng: random.Random, keys: list[str]) -> dict:
    return {rng.choice(keys): rng.choice(_HOSTILE_VALUES) for _ in range(rng.randint(0, 5))}


class _HostileTransport:
    """Answers every instruction with the next hostile reply, through the real parser."""

    def __init__(self, rng: random.Random, fit_bases: list[bytes]):
        self.rng, self.fit_bases, self.replies = rng, fit_bases, []

    def _blob(self, kind: str) -> bytes:
        rng = self.rng
        if rng.random() < 0.3:  # byte-level damage to a well-formed reply
            return next(_mutations(rng, self.fit_bases, rng.randint(1, 5)))
        keys = _FIT_KEYS if kind == "fit" else _EVAL_KEYS
        if kind == "fit":
            msg = Message({k: torch.randn(s) * rng.choice([1e-3, 1.0, 1e30]) for k, (s, _) in GSPEC.items()},
                          delta=("adapter",) if rng.random() < 0.5 else ())
        else:
            msg = Message()
        msg.metrics = _hostile_metrics(rng, keys)
        # well-formed metrics too, so that accepted replies do reach the sums
        if rng.random() < 0.4:
            msg.metrics = {"train_loss": 2.0, "train_label_tokens": 7, "train_tokens": 9, "train_seconds": 0.5,
                           "local_val_loss_sum": 3.0, "local_val_tokens": 2} if kind == "fit" else \
                          {"val_loss_sum": 4.0, "val_tokens": 2, "test_loss_sum": 1.0, "test_tokens": 1}
        return encode(msg)

    def send(self, kind, instructions, *, expect=None, on_reply=None):
        out = []
        for cid in instructions:
            r = parse_reply(cid, kind, self._blob(kind), bytes_down=1, seconds=0.0, expect=(expect or {}).get(cid))
            self.replies.append(r)
            out.append(r)
            if on_reply is not None:
                on_reply(r)
        return out


def test_fuzzed_replies_through_server_rounds_never_crash_the_run(tmp_path):
    """Hostile fit and evaluate replies go through whole Server rounds (pooling, FedAvg, per-client
    rows, evaluation, the console table, metrics.jsonl): nothing raises and nothing non-finite is
    logged or aggregated. Before metrics had a schema, a null loss, a null token count or a loss sum
    without its count crashed the round (TypeError/KeyError) and NaN poisoned val_loss."""
    from fedtune.algorithms import Setup, get_algorithm
    from fedtune.config import load_config
    from fedtune.metrics import MetricsLogger
    from fedtune.run import console_hooks
    from fedtune.server import GLOBAL, Server
    from fedtune.state import ClientStateStore

    rng = random.Random(1)
    cfg = load_config(None, ["fl.rounds=1000", "eval.every=1", "checkpoint.every=0", "output.tensorboard=false",
                             "output.progress=false"])
    bases = [_good(n, GSPEC) for n in (("topk", "int8", "zstd"), ("int4",), ())]
    transport = _HostileTransport(rng, bases)
    cids = ["c0", "c1", "c2"]
    printed = []
    algorithm = get_algorithm("fedavg")
    algorithm.init(Setup(cids, {c: 10 for c in cids}, 1000, 3, {k: torch.zeros(s) for k, (s, _) in SPEC.items()}))
    server = Server(cfg=cfg, algorithm=algorithm, transport=transport, train_clients=cids,
                    eval_clients=cids, num_train={c: 10 for c in cids},
                    store=ClientStateStore(None), logger=MetricsLogger(tmp_path, tensorboard=False), run_dir=tmp_path,
                    save_adapters=lambda *a: None, hooks=console_hooks(cfg, printed.append, True))
    for rnd in range(1, 201):
        server.run_round(rnd)  # must not raise
        assert all(torch.isfinite(t).all() for t in algorithm.adapters()[GLOBAL].values())

    def finite(v):
        if isinstance(v, float):
            return math.isfinite(v)
        return not isinstance(v, (list, dict))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 200 * 4 and len(printed) == 200
    bad = [(r["round"], k, v) for r in rows for k, v in r.items() if not finite(v)]
    assert not bad, bad[:5]
    accepted = [r for r in transport.replies if r.message is not None]
    rejected = [r for r in transport.replies if r.message is None]
    assert len(accepted) > 200 and len(rejected) > 600  # both paths really ran
    assert sum("metric" in r.error for r in rejected) > 200  # hostile metrics: rejected with a reason
    pooled = [r for r in rows if r["kind"] == "round" and r.get("val_loss") is not None]
    assert pooled and all(r["val_loss"] >= 0 for r in pooled)


def test_metric_schema_is_strict_but_takes_what_clients_send():
    ok = {"train_loss": 1.5, "train_label_tokens": 3, "lr": 1e-4, "local_val_loss_sum": 2.0, "local_val_tokens": 4}
    assert parse_reply("c", "fit", encode(Message({k: torch.zeros(s) for k, (s, _) in SPEC.items()}, metrics=ok)),
                       bytes_down=0, seconds=0.0, expect=SPEC).message.metrics == ok
    zeros = {k: torch.zeros(s) for k, (s, _) in SPEC.items()}
    for metrics, needle in [({"train_loss": None}, "finite numbers"), ({"train_loss": float("nan")}, "finite"),
                            ({"train_tokens": float("inf")}, "finite"), ({"steps": 2**60}, "2\\*\\*53"),
                            ({"steps": True}, "finite numbers"), ({"lr": "0.1"}, "finite numbers"),
                            ({f"m{i}": 1 for i in range(65)}, "at most 64"), ({"x" * 65: 1}, "longer than"),
                            ({"train_tokens": 2.5}, "non-negative integer"), ({"val_tokens": -1}, "non-negative"),
                            ({"local_val_tokens": 5}, "unpaired"), ({"val_loss_sum": 1.0}, "unpaired")]:
        r = parse_reply("c", "fit", encode(Message(zeros, metrics=metrics)), bytes_down=0, seconds=0.0, expect=SPEC)
        assert r.message is None and re.search(needle, r.error), (metrics, r.error)
    r = parse_reply("c", "evaluate", encode(Message(metrics={"val_tokens": 3})), bytes_down=0, seconds=0.0)
    assert r.message is None and "unpaired" in r.error
    r = parse_reply("c", "evaluate", encode(Message(metrics={"val_tokens": 3, "val_loss_sum": 1.0, "lr": 1.0})),
                    bytes_down=0, seconds=0.0)
    assert r.message is None and "'lr'" in r.error  # an evaluation carries loss pairs only
    with pytest.raises(MessageError, match="config"):
        decode(encode(Message(config={"splits": [["val"]]})))


def test_server_parse_reply_reports_the_reason():
    r = parse_reply("c", "fit", b"\x00" * 7, bytes_down=10, seconds=0.1, expect=SPEC)
    assert r.message is None and "8-byte" in r.error and r.bytes_up == 7
    r = parse_reply("c", "evaluate", _good(), bytes_down=10, seconds=0.1)
    assert r.message is None and "unexpected" in r.error  # evaluate replies carry no tensors
    r = parse_reply("c", "fit", _good(), bytes_down=10, seconds=0.1, expect=SPEC)
    assert r.error is None and r.message.metrics == {"loss": 1.0}


def test_numpy_reference_matches_hand_case():
    # keep the reference honest: int8 codes of [1, -0.5] with block 2 are 127, -64
    assert np.allclose(ref_quant(np.array([1.0, -0.5]), 127, 2), [1.0, -64 / 127])


def test_clients_check_instructions_against_the_adapter_they_hold():
    from fedtune.transport import handle_on_client

    class Client:
        def instruction_spec(self, kind):
            return SPEC

        def fit(self, msg):
            return Message(msg.tensors)

    good = encode(Message({k: torch.zeros(s) for k, (s, _) in SPEC.items()}, codec=pipe(["int8", "zstd"])))
    assert len(decode(handle_on_client(Client(), "fit", good)).tensors) == 2
    big = b"\0" * (8 << 20)
    bomb = _forge({"payload": torch.frombuffer(bytearray(zlib.compress(big, 9)), dtype=torch.uint8)},
                  envelope={"codec": "deflate", "size": len(big)})
    with pytest.raises(MessageError, match="allowed"):
        handle_on_client(Client(), "fit", bomb)
    wrong = encode(Message({"a": torch.zeros(8, 16)}))
    with pytest.raises(MessageError, match="missing"):
        handle_on_client(Client(), "evaluate", wrong)
