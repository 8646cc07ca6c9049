import random
import time

import numpy as np
import pytest

from fedtune.data import SPLITTERS, Record, client_names
from fedtune.errors import FedtuneError


def _records(sizes: dict[str, int]) -> list[Record]:
    out = []
    for label, n in sizes.items():
        out += [Record(f"{label} question {i}", "", f"answer {i}", label) for i in range(n)]
    return out


RECS = _records({"A": 30, "B": 20, "C": 10})
OPTS = {"label_field": "category", "alpha": 0.5, "min_client_size": 2}


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("name", sorted(SPLITTERS))
@pytest.mark.parametrize("num_clients", [1, 2, 3])
def test_splitter_contract_partition(name, num_clients):
    parts = SPLITTERS[name](RECS, num_clients, _rng(), **OPTS)
    assert len(parts) == num_clients
    assert all(len(p) > 0 for p in parts)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(RECS)))  # disjoint and covering
    assert all(isinstance(i, int) for i in flat)


@pytest.mark.parametrize("name", sorted(SPLITTERS))
def test_splitter_contract_deterministic(name):
    a = SPLITTERS[name](RECS, 3, _rng(7), **OPTS)
    b = SPLITTERS[name](RECS, 3, _rng(7), **OPTS)
    assert a == b


@pytest.mark.parametrize("name", sorted(SPLITTERS))
def test_splitter_contract_too_few_records(name):
    with pytest.raises(FedtuneError, match="records for 4 clients"):
        SPLITTERS[name](_records({"A": 1, "B": 1, "C": 1}), 4, _rng(), **OPTS)


def test_iid_sizes_differ_by_at_most_one_and_seed_matters():
    recs = _records({"A": 10})
    parts = SPLITTERS["iid"](recs, 3, _rng(0))
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    assert SPLITTERS["iid"](recs, 3, _rng(0)) != SPLITTERS["iid"](recs, 3, _rng(1))


def test_dirichlet_adversarial_terminates_with_min_size():
    # 200 records, 10 clients, min 20 each: feasible only as an exact 20/20/.../20 split, and a
    # tiny alpha makes almost every draw put each label on one client. FS-LLM loops forever here.
    recs = _records({"A": 100, "B": 100})
    t = time.perf_counter()
    parts = SPLITTERS["dirichlet"](recs, 10, _rng(3), label_field="category", alpha=1e-3, min_client_size=20)
    assert time.perf_counter() - t < 5
    assert [len(p) for p in parts] == [20] * 10
    assert sorted(i for p in parts for i in p) == list(range(200))


def test_dirichlet_tiny_alpha_stays_heterogeneous():
    recs = _records({"A": 50, "B": 50, "C": 50, "D": 50})
    parts = SPLITTERS["dirichlet"](recs, 4, _rng(0), label_field="category", alpha=1e-3, min_client_size=1)
    for label in "ABCD":
        per_client = [sum(recs[i].category == label for i in p) for p in parts]
        assert max(per_client) >= 45  # nearly all of each label on one client


def test_dirichlet_infeasible_and_missing_labels():
    with pytest.raises(FedtuneError, match="infeasible"):
        SPLITTERS["dirichlet"](_records({"A": 50}), 10, _rng(), min_client_size=6)
    unlabeled = _records({"A": 5}) + [Record("q", "", "a", None)]
    for name in ("dirichlet", "meta"):
        with pytest.raises(FedtuneError, match="1 of 6 records have no 'category'"):
            SPLITTERS[name](unlabeled, 2, _rng(), label_field="category", min_client_size=1)
    with pytest.raises(FedtuneError, match="did you mean 'category'"):
        SPLITTERS["meta"](RECS, 2, _rng(), label_field="categroy")


def test_meta_grouping_balanced_by_hand():
    recs = _records({"a": 5, "b": 4, "c": 3, "d": 2, "e": 1})
    # largest first to the lightest client: a->0 (5), b->1 (4), c->1 (7), d->0 (7), e->0 (8, tie -> 0)
    parts = SPLITTERS["meta"](recs, 2, _rng())
    assert client_names("meta", recs, parts, "category") == ["a+d+e", "b+c"]
    assert [len(p) for p in parts] == [8, 7]
    five = SPLITTERS["meta"](recs, 5, _rng())
    assert client_names("meta", recs, five, "category") == ["a", "b", "c", "d", "e"]
    assert [len(p) for p in five] == [5, 4, 3, 2, 1]


def test_meta_independent_of_record_order_and_rng():
    recs = _records({"a": 5, "b": 4, "c": 3, "d": 2, "e": 1})
    shuffled = recs[:]
    random.Random(0).shuffle(shuffled)
    p1 = SPLITTERS["meta"](recs, 3, _rng(0))
    p2 = SPLITTERS["meta"](shuffled, 3, _rng(99))
    n1 = client_names("meta", recs, p1, "category")
    assert n1 == client_names("meta", shuffled, p2, "category")
    assert [sorted(recs[i].instruction for i in p) for p in p1] == [
        sorted(shuffled[i].instruction for i in p) for p in p2
    ]


def test_meta_ties_by_name():
    recs = _records({"y": 2, "x": 2})
    assert client_names("meta", recs, SPLITTERS["meta"](recs, 1, _rng()), "category") == ["x+y"]


def test_meta_more_clients_than_values_errors():
    with pytest.raises(FedtuneError, match="4 clients but only 3 distinct 'category' values"):
        SPLITTERS["meta"](RECS, 4, _rng())


def test_anonymous_client_names():
    parts = SPLITTERS["iid"](RECS, 3, _rng())
    assert client_names("iid", RECS, parts, "category") == ["client_0", "client_1", "client_2"]
