"""``fedtune data describe``: what each client holds, as numbers, tables and a heatmap.

Shows clients x split sizes, the label histogram per client (how heterogeneous the split is) and
the length of prompt + response per client, in tokens when a tokenizer is given (else in
whitespace-separated words), so ``max_length`` can be chosen knowingly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedtune.data.federated import FederatedData, label_histogram
from fedtune.data.presets import PRESET_CAVEATS
from fedtune.data.records import Record
from fedtune.data.sources import SOURCES
from fedtune.data.templates import get_template, tokenize_parts

HEATMAP_FILE = "label_distribution.png"


def _stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"min": 0, "mean": 0.0, "median": 0.0, "p95": 0.0, "max": 0}
    a = np.asarray(lengths, dtype=np.float64)
    return {
        "min": int(a.min()),
        "mean": round(float(a.mean()), 1),
        "median": float(np.median(a)),
        "p95": round(float(np.percentile(a, 95)), 1),
        "max": int(a.max()),
    }


def _lengths(records: list[Record], tokenizer: Any, template: str) -> list[int]:
    if tokenizer is None:
        tpl = get_template(template if template != "chat" else "alpaca")
        return [len(tpl.prompt(r).split()) + len(r.output.split()) for r in records]
    prompts, responses = tokenize_parts(records, tokenizer, template)
    return [len(p) + len(r) for p, r in zip(prompts, responses)]


def describe_federated_data(
    fed: FederatedData, tokenizer: Any | None = None, out_dir: Path | None = None
) -> dict[str, Any]:
    """Sizes, label histograms and length statistics per client (JSON-serialisable).

    With ``out_dir``, also writes ``label_distribution.png`` (clients x labels heatmap) there and
    records its path under ``"heatmap"``.
    """
    cfg = fed.config
    template = cfg.template if cfg is not None else "alpaca"
    max_length = cfg.max_length if cfg is not None else None
    clients: list[dict[str, Any]] = []
    all_labels: set[str] = set()
    for c in fed.clients:
        records = c.train + c.val + c.test
        hist = label_histogram(records, fed.label_field)
        all_labels |= set(hist)
        lengths = _lengths(records, tokenizer, template)
        entry: dict[str, Any] = {
            "name": c.name,
            **c.sizes,
            "labels": dict(sorted(hist.items())),
            "length": _stats(lengths),
        }
        if tokenizer is not None and max_length is not None:
            entry["over_max_length"] = int(sum(n > max_length for n in lengths))
        clients.append(entry)
    desc: dict[str, Any] = {
        **fed.info(),
        "template": template,
        "max_length": max_length,
        "length_unit": "tokens" if tokenizer is not None else "words",
        "labels": sorted(all_labels),
        "clients": clients,
        "totals": {k: sum(c[k] for c in clients) for k in ("train", "val", "test")},
        "caveats": [
            x
            for x in (
                PRESET_CAVEATS.get(fed.preset or ""),
                SOURCES[fed.source].caveat if fed.source in SOURCES else "",
            )
            if x
        ],
    }
    if out_dir is not None:
        desc["heatmap"] = str(write_heatmap(desc, Path(out_dir) / HEATMAP_FILE))
    return desc


def write_heatmap(desc: dict[str, Any], path: Path) -> Path:
    """Clients x labels heatmap of record counts (colour = share of the client's records)."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from fedtune.utils import atomic_write_bytes

    labels: list[str] = desc["labels"]
    names = [c["name"] for c in desc["clients"]]
    counts = np.array([[c["labels"].get(lab, 0) for lab in labels] for c in desc["clients"]], dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 2.5), max(2.5, 0.45 * len(names) + 1.5)))
    im = ax.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(desc.get("label_field") or "label")
    ax.set_ylabel("client")
    if counts.size <= 400:
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(counts[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if share[i, j] < 0.6 else "black",
                    )
    fig.colorbar(im, ax=ax, label="share of client's records")
    title = desc.get("preset") or desc.get("source") or ""
    ax.set_title(f"{title} ({desc.get('splitter')}, {len(names)} clients)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            str(x).rjust(w) if i in right else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths))
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), sep, *(fmt(r) for r in rows)])


def _num(x: float) -> str:
    return f"{int(x)}" if float(x).is_integer() else f"{x:.1f}"


def format_description(desc: dict[str, Any]) -> str:
    """Aligned terminal tables for :func:`describe_federated_data`'s result."""
    head = (
        f"data: {desc.get('preset') or desc.get('source')} (source {desc.get('source')}, splitter "
        f"{desc.get('splitter')}, {len(desc['clients'])} clients, seed {desc.get('seed')})"
    )
    notes = []
    if desc.get("num_excluded"):
        notes.append(
            f"excluded {desc['num_excluded']} records with labels {', '.join(desc.get('excluded_labels', []))}"
        )
    if desc.get("num_capped_train") or desc.get("num_capped_eval"):
        notes.append(
            f"caps left out {desc.get('num_capped_train', 0)} train / {desc.get('num_capped_eval', 0)} eval records"
        )
    unit = desc.get("length_unit", "tokens")
    over = any("over_max_length" in c for c in desc["clients"])
    header = ["client", "train", "val", "test", f"min {unit}", "mean", "median", "p95", "max"]
    if over:
        header.append(f">{desc.get('max_length')}")
    rows = []
    for c in desc["clients"]:
        s = c["length"]
        row = [c["name"], str(c["train"]), str(c["val"]), str(c["test"])] + [
            _num(s[k]) for k in ("min", "mean", "median", "p95", "max")
        ]
        if over:
            row.append(str(c.get("over_max_length", 0)))
        rows.append(row)
    t = desc["totals"]
    rows.append(["total", str(t["train"]), str(t["val"]), str(t["test"])] + [""] * (len(header) - 4))
    parts = [head, *notes, "", _table(header, rows, set(range(1, len(header))))]

    labels: list[str] = desc["labels"]
    if labels and labels != ["(none)"]:
        shown = labels[:12]
        lh = ["client", *shown] + (["other"] if len(labels) > len(shown) else [])
        lrows = []
        for c in desc["clients"]:
            row = [c["name"]] + [str(c["labels"].get(lab, 0) or ".") for lab in shown]
            if len(labels) > len(shown):
                row.append(str(sum(v for k, v in c["labels"].items() if k not in shown)))
            lrows.append(row)
        parts += [
            "",
            f"records per {desc.get('label_field')} (all splits):",
            _table(lh, lrows, set(range(1, len(lh)))),
        ]
    for cav in desc.get("caveats", []):
        parts += ["", f"WARNING: {cav}"]
    if desc.get("heatmap"):
        parts += ["", f"heatmap: {desc['heatmap']}"]
    return "\n".join(parts)
