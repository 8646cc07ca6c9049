from collections import Counter

import pytest

from fedtune.config import DataConfig
from fedtune.data import PRESETS, build_federated_data, eval_counts, load_source, resolve_data_config
from fedtune.errors import FedtuneError

DOLLY_COUNTS = {  # MANIFEST.md note 7
    "brainstorming": 1766,
    "classification": 2136,
    "closed_qa": 1773,
    "creative_writing": 709,
    "general_qa": 2191,
    "information_extraction": 1506,
    "open_qa": 3742,
    "summarization": 1188,
}


def test_presets_match_the_paper():
    assert PRESETS["fed-dolly"]["source"] == "dolly" and PRESETS["fed-dolly"]["splitter"] == "meta"
    assert PRESETS["fed-dolly"]["num_clients"] == 8
    assert (PRESETS["fed-gsm8k-3"]["splitter"], PRESETS["fed-gsm8k-3"]["num_clients"]) == ("iid", 3)
    ca = PRESETS["fed-codealpaca"]
    assert (ca["source"], ca["splitter"], ca["num_clients"], ca["exclude_labels"]) == (
        "code-alpaca",
        "meta",
        9,
        ["X86-64 Assembly"],
    )
    assert (PRESETS["fed-codesearchnet"]["splitter"], PRESETS["fed-codesearchnet"]["num_clients"]) == (
        "meta",
        6,
    )
    assert (PRESETS["fed-mbxp"]["source"], PRESETS["fed-mbxp"]["num_clients"]) == ("mbxp", 9)
    assert PRESETS["alpaca"]["splitter"] == PRESETS["alpaca-cleaned"]["splitter"] == "iid"


def test_eval_counts_by_hand():
    assert eval_counts(100, 0.05, 0.05) == (5, 5)
    assert eval_counts(3742, 0.05, 0.05) == (187, 187)  # 187.1 rounds to 187
    assert eval_counts(3, 0.05, 0.05) == (1, 1)  # at least one each, one left to train
    assert eval_counts(2, 0.05, 0.05) == (1, 0)
    assert eval_counts(1, 0.05, 0.05) == (0, 0)
    assert eval_counts(10, 0.0, 0.1) == (0, 1)


def test_fed_dolly_clients_and_counts(shared_data):
    fed = build_federated_data(DataConfig(preset="fed-dolly"), seed=0)
    assert fed.names == sorted(DOLLY_COUNTS)
    for c in fed.clients:
        n = DOLLY_COUNTS[c.name]
        v = max(1, round(0.05 * n))
        assert (len(c.val), len(c.test), len(c.train)) == (v, v, n - 2 * v)
        assert {r.category for r in c.train + c.val + c.test} == {c.name}
    open_qa = fed.client("open_qa")
    assert (len(open_qa.train), len(open_qa.val), len(open_qa.test)) == (3368, 187, 187)
    # every record of the source is in exactly one client split
    all_recs = Counter(load_source("dolly", DataConfig()))
    assert Counter(r for c in fed.clients for r in c.train + c.val + c.test) == all_recs


def test_same_config_and_seed_give_identical_data(shared_data):
    cfg = DataConfig(preset="fed-dolly", num_clients=3)
    a, b = build_federated_data(cfg, 5), build_federated_data(cfg, 5)
    assert (
        a.names
        == b.names
        == [
            "brainstorming+creative_writing+general_qa",  # 2191 + 1766 + 709 = 4666
            "classification+closed_qa+summarization",  # 2136 + 1773 + 1188 = 5097
            "information_extraction+open_qa",  # 3742 + 1506 = 5248
        ]
    )
    for x, y in zip(a.clients, b.clients):
        assert (x.train, x.val, x.test) == (y.train, y.val, y.test)
    c = build_federated_data(cfg, 6)
    assert a.clients[0].val != c.clients[0].val


def test_gsm8k_3_iid(shared_data):
    fed = build_federated_data(DataConfig(preset="fed-gsm8k-3", val_fraction=0.0, test_fraction=0.0), 0)
    assert fed.names == ["client_0", "client_1", "client_2"]
    assert [len(c.train) for c in fed.clients] == [2491, 2491, 2491]  # 7473 / 3


def test_caps_do_not_change_eval_records(shared_data):
    base = build_federated_data(DataConfig(preset="fed-mbxp"), 1)
    capped = build_federated_data(
        DataConfig(preset="fed-mbxp", max_records_per_client=50, max_eval_records_per_client=5), 1
    )
    assert (
        base.names
        == capped.names
        == sorted(["cpp", "csharp", "java", "javascript", "kotlin", "php", "python", "ruby", "typescript"])
    )
    for full, small in zip(base.clients, capped.clients):
        assert len(small.train) == 50 and small.val == full.val[:5] and small.test == full.test[:5]
        assert small.train == full.train[:50]
    assert capped.num_capped_train == sum(len(c.train) - 50 for c in base.clients)
    assert capped.num_capped_eval == sum(len(c.val) - 5 + len(c.test) - 5 for c in base.clients)


def _write(tmp_path, sizes):
    import json

    p = tmp_path / "toy.jsonl"
    with p.open("w") as f:
        for label, n in sizes.items():
            for i in range(n):
                f.write(json.dumps({"instruction": f"{label}{i}", "output": "o", "category": label}) + "\n")
    return p


def test_exclusion_meta_default_count_and_pooled(tmp_path):
    p = _write(tmp_path, {"A": 20, "B": 10, "X86-64 Assembly": 3})
    cfg = DataConfig(
        source=str(p),
        splitter="meta",
        exclude_labels=["X86-64 Assembly"],
        val_fraction=0.1,
        test_fraction=0.1,
    )
    fed = build_federated_data(cfg, 0)
    assert fed.names == ["A", "B"]  # one client per remaining label
    assert (fed.num_loaded, fed.num_excluded) == (33, 3)
    a = fed.client("A")
    assert (len(a.train), len(a.val), len(a.test)) == (16, 2, 2)
    g = fed.pooled()
    assert g.name == "global"
    assert (len(g.train), len(g.val), len(g.test)) == (16 + 8, 2 + 1, 2 + 1)
    assert g.train == fed.clients[0].train + fed.clients[1].train


def test_preset_explicit_keys_win_and_errors():
    cfg = resolve_data_config(DataConfig(preset="fed-dolly", num_clients=4, splitter="dirichlet"))
    assert (cfg.source, cfg.splitter, cfg.num_clients) == ("dolly", "dirichlet", 4)
    cfg = resolve_data_config(DataConfig(preset="fed-codealpaca"))
    assert cfg.exclude_labels == ["X86-64 Assembly"] and cfg.num_clients == 9
    with pytest.raises(FedtuneError, match="did you mean 'fed-dolly'"):
        resolve_data_config(DataConfig(preset="fed-doly"))
    with pytest.raises(FedtuneError, match="no data source"):
        resolve_data_config(DataConfig())
    with pytest.raises(FedtuneError, match="num_clients is required"):
        resolve_data_config(DataConfig(source="x.jsonl"))


def test_more_clients_than_records_is_a_clear_error(tmp_path):
    p = _write(tmp_path, {"A": 3})
    with pytest.raises(FedtuneError, match="only 3 records for 5 clients"):
        build_federated_data(DataConfig(source=str(p), num_clients=5), 0)
