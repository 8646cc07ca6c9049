"""Splitting a centralised dataset into clients.

Every splitter is a function ``(records, num_clients, rng, **opts) -> list[list[int]]`` returning
the record indices of each client. The result is a partition (disjoint, covering every record),
has exactly ``num_clients`` non-empty parts, and depends only on the records and the state of
``rng``. Splitters ignore options they do not use, so callers can pass the same options to all.

Fixes over FS-LLM: the meta splitter honours the client count (FS-LLM's ``MetaSplitter`` builds
the merged slices and then returns the unmerged ones), and the Dirichlet splitter always
terminates (FS-LLM's ``while size < min_size`` loop never ends when the constraint is hard to
hit, and hangs on records without a label).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from fedtune.data.records import RECORD_FIELDS, Record
from fedtune.errors import FedtuneError, did_you_mean


class Splitter(Protocol):
    def __call__(
        self, records: Sequence[Record], num_clients: int, rng: np.random.Generator, **opts: Any
    ) -> list[list[int]]: ...


SPLITTERS: dict[str, Splitter] = {}
#: splitters whose clients are named after the label values they hold (``open_qa``).
LABEL_NAMED: set[str] = set()


def register_splitter(name: str, *, label_named: bool = False) -> Callable[[Splitter], Splitter]:
    def deco(fn: Splitter) -> Splitter:
        SPLITTERS[name] = fn
        if label_named:
            LABEL_NAMED.add(name)
        return fn

    return deco


def _check_counts(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise FedtuneError(f"data.num_clients must be at least 1, got {num_clients}")
    if n < num_clients:
        raise FedtuneError(
            f"only {n} records for {num_clients} clients: every client needs at least one record; "
            "lower data.num_clients or use a larger dataset"
        )


def labels_of(records: Sequence[Record], label_field: str) -> list[str]:
    """The label of every record; a clear error when the field is unknown or a label is missing."""
    if label_field not in RECORD_FIELDS:
        raise FedtuneError(
            f"data.label_field '{label_field}' is not a record field{did_you_mean(label_field, RECORD_FIELDS)}; "
            f"valid: {', '.join(RECORD_FIELDS)}"
        )
    labels = [getattr(r, label_field) for r in records]
    missing = [i for i, v in enumerate(labels) if v is None or v == ""]
    if missing:
        raise FedtuneError(
            f"{len(missing)} of {len(labels)} records have no '{label_field}' (first: record #{missing[0]}); "
            f"the label-based splitters need it on every record. Use splitter 'iid', map a column to "
            f"it with data.fields, or choose another data.label_field"
        )
    return labels


@register_splitter("iid")
def iid_split(
    records: Sequence[Record], num_clients: int, rng: np.random.Generator, **_: Any
) -> list[list[int]]:
    """Uniform split: shuffle, then cut into parts whose sizes differ by at most one."""
    _check_counts(len(records), num_clients)
    perm = rng.permutation(len(records))
    return [part.tolist() for part in np.array_split(perm, num_clients)]


@register_splitter("dirichlet")
def dirichlet_split(
    records: Sequence[Record],
    num_clients: int,
    rng: np.random.Generator,
    *,
    label_field: str = "category",
    alpha: float = 0.5,
    min_client_size: int = 10,
    max_retries: int = 100,
    **_: Any,
) -> list[list[int]]:
    """Latent Dirichlet allocation over labels (FS-LLM's ``dirichlet_distribution_noniid_slice``).

    For each label, its records are shuffled and cut by proportions drawn from
    ``Dir(alpha, ..., alpha)``; smaller ``alpha`` gives more skewed clients. The draw is repeated
    (at most ``max_retries`` times) until every client holds ``min_client_size`` records; if that
    never happens, a deterministic repair moves records from the largest clients to the small
    ones, so the call always terminates. Infeasible requests fail fast.
    """
    n = len(records)
    _check_counts(n, num_clients)
    if alpha <= 0:
        raise FedtuneError(f"data.alpha must be positive, got {alpha}")
    labels = labels_of(records, label_field)
    min_size = max(1, int(min_client_size))
    if n < num_clients * min_size:
        raise FedtuneError(
            f"dirichlet split infeasible: {n} records cannot give {num_clients} clients at least "
            f"{min_size} each (needs {num_clients * min_size}); lower data.min_client_size or "
            "data.num_clients"
        )
    by_label: dict[str, list[int]] = {}
    for i, v in enumerate(labels):
        by_label.setdefault(v, []).append(i)
    groups = [np.asarray(by_label[k]) for k in sorted(by_label)]

    parts: list[list[int]] = []
    for _attempt in range(max(1, max_retries)):
        parts = [[] for _ in range(num_clients)]
        for idx in groups:
            idx = rng.permutation(idx)
            prop = rng.dirichlet(np.full(num_clients, float(alpha)))
            if not np.all(np.isfinite(prop)) or prop.sum() <= 0:  # underflow with tiny alpha
                prop = np.zeros(num_clients)
                prop[rng.integers(num_clients)] = 1.0
            cuts = (np.cumsum(prop) * len(idx)).astype(int)[:-1]
            for j, chunk in enumerate(np.split(idx, cuts)):
                parts[j].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    parts = [rng.permutation(np.asarray(p, dtype=np.int64)).tolist() for p in parts]
    _repair(parts, min_size)
    return parts


def _repair(parts: list[list[int]], min_size: int) -> None:
    """Top up clients below ``min_size`` from the currently largest client (deterministic).

    Feasible by construction: when some client has fewer than ``min_size`` records and the total
    is at least ``num_clients * min_size``, the largest client has more than ``min_size``.
    """
    for j in range(len(parts)):
        while len(parts[j]) < min_size:
            donor = max(range(len(parts)), key=lambda k: (len(parts[k]), -k))
            take = min(min_size - len(parts[j]), len(parts[donor]) - min_size)
            assert take > 0 and donor != j
            moved = parts[donor][-take:]
            del parts[donor][-take:]
            parts[j].extend(moved)


@register_splitter("meta", label_named=True)
def meta_split(
    records: Sequence[Record],
    num_clients: int,
    rng: np.random.Generator,
    *,
    label_field: str = "category",
    **_: Any,
) -> list[list[int]]:
    """One client per label value (Fed-Dolly's task types, Fed-CodeAlpaca's languages).

    With fewer clients than values, values are grouped deterministically and balanced: largest
    value first (ties by name) goes to the client holding the fewest records so far (ties by
    index). Clients are then ordered by their name (the sorted values joined with ``+``). More
    clients than values is an error. ``rng`` is unused: the split is a function of the labels.
    """
    n = len(records)
    _check_counts(n, num_clients)
    labels = labels_of(records, label_field)
    by_label: dict[str, list[int]] = {}
    for i, v in enumerate(labels):
        by_label.setdefault(v, []).append(i)
    values = sorted(by_label, key=lambda v: (-len(by_label[v]), v))
    if num_clients > len(values):
        raise FedtuneError(
            f"meta split: {num_clients} clients but only {len(values)} distinct '{label_field}' "
            f"values ({', '.join(sorted(values)[:12])}{'...' if len(values) > 12 else ''}); the meta "
            f"splitter gives one client per value, so set data.num_clients <= {len(values)} or use "
            "the 'dirichlet' splitter"
        )
    groups: list[list[str]] = [[] for _ in range(num_clients)]
    sizes = [0] * num_clients
    for v in values:
        j = min(range(num_clients), key=lambda k: (sizes[k], k))
        groups[j].append(v)
        sizes[j] += len(by_label[v])
    named = sorted(("+".join(sorted(g)), sorted(g)) for g in groups)
    return [[i for v in g for i in by_label[v]] for _, g in named]


def client_names(
    splitter: str, records: Sequence[Record], parts: Sequence[Sequence[int]], label_field: str
) -> list[str]:
    """``client_0..`` for anonymous splits; the label value(s) (``a+b``) for label-named ones."""
    if splitter in LABEL_NAMED:
        return ["+".join(sorted({str(getattr(records[i], label_field)) for i in p})) for p in parts]
    return [f"client_{k}" for k in range(len(parts))]
