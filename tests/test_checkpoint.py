"""Checkpoints: the global RNG states go in and come back (safetensors + JSON, no pickle)."""

import json
import random

import numpy as np
import torch
from safetensors import safe_open

from fedtune.checkpoint import latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint
from fedtune.state import ClientState, ClientStateStore


def _draws():
    return torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], random.gauss(0, 1)


def test_rng_states_are_saved_and_restored(tmp_path):
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    random.gauss(0, 1)  # leaves a cached second gaussian in Python's state: it must survive too
    _draws()
    store = ClientStateStore(None)
    store.put("c", ClientState(meta={"x": 1}))
    ckpt = save_checkpoint(tmp_path, 4, {"global": {"w": torch.ones(2)}}, store, {"fingerprint": "f"})
    expected = _draws()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)  # what a restarted process does
    restore_rng_state(ckpt)
    got = _draws()
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2] and expected[3] == got[3]
    # the states are plain tensors + JSON in their own file; the checkpoint still loads
    with safe_open(str(ckpt / "rng.safetensors"), framework="pt") as f:
        assert {"torch_cpu", "numpy_keys"} <= set(f.keys())
        assert len(json.loads(f.metadata()["meta"])["python"][1]) == 625
    assert latest_checkpoint(tmp_path) == ckpt
    rnd, models, meta = load_checkpoint(ckpt, ClientStateStore(None))
    assert rnd == 4 and torch.equal(models["global"]["w"], torch.ones(2)) and "rng" not in meta
