import random

import pytest
import torch

from fedtune.messages import Message, MessageError, decode, encode


def _msg():
    return Message(
        tensors={"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3)},
        metrics={"loss": 1.5, "n": 3},
        config={"round": 2, "splits": ["val"]},
    )


def test_roundtrip_all_dtypes_exact():
    m = _msg()
    out = decode(encode(m))
    for k, t in m.tensors.items():
        assert out.tensors[k].dtype == t.dtype
        assert torch.equal(out.tensors[k], t)
    assert out.metrics == m.metrics and out.config == m.config


def test_size_is_exact_bytes():
    m = Message(tensors={"w": torch.zeros(100, dtype=torch.float32)})
    data = encode(m)
    # 400 bytes of payload plus a small JSON header
    assert 400 < len(data) < 400 + 300


def test_rejects_nonfinite_and_wrong_shapes():
    with pytest.raises(MessageError, match="NaN"):
        decode(encode(Message(tensors={"w": torch.tensor([1.0, float("nan")])})))
    data = encode(Message(tensors={"w": torch.zeros(2, 2)}))
    with pytest.raises(MessageError, match="expected"):
        decode(data, expect={"w": ((4,), torch.float32)})
    with pytest.raises(MessageError, match="missing"):
        decode(data, expect={"v": ((2, 2), torch.float32)})


def test_truncated_and_hostile_headers():
    data = encode(_msg())
    for cut in (0, 4, 8, 20, len(data) - 1):
        with pytest.raises(MessageError):
            decode(data[:cut])
    huge = (10**12).to_bytes(8, "little") + data[8:]
    with pytest.raises(MessageError, match="header declares"):
        decode(huge)


def test_random_bytes_never_crash():
    rng = random.Random(0)
    base = encode(_msg())
    for i in range(500):
        if i % 2:
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
        else:
            b = bytearray(base)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.getrandbits(8)
            blob = bytes(b)
        try:
            decode(blob)
        except MessageError:
            pass
