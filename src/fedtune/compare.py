"""``fedtune compare``: several run directories side by side, one table and one plot.

    fedtune compare runs/fed runs/global runs/local [--out DIR] [--per-client] [--markdown]

The paper's Fed / Global / Local comparison (FS-LLM Tables 2-5) is one command: the runs may be of
any scenario, model, adapter or algorithm. What is compared comes from each run's own files, read
defensively so that runs made by other fedtune versions still compare:

* ``metrics.jsonl``: ``kind: round`` rows (the aggregate of each round) and ``kind: client`` rows.
  Nothing is whitelisted: besides the standard rows of the table (losses, perplexities, bytes, time,
  memory) every other numeric metric of the round rows (task metrics ``<task>_<metric>`` such as
  ``gsm8k_accuracy``, metrics an algorithm adds) gets a row; a run without it shows ``-``. A final
  value is the one in the last round row that has the key. A line that is not JSON (a run killed
  while writing) is skipped with a warning.
* ``config.yaml`` as plain YAML (not validated, so a config key added or removed since the run was
  made is no obstacle): the table ends with every config key whose value differs between the runs
  (``output.*`` left out: it always differs).

Written to ``--out`` (default ``runs/compare-<run>-<run>...``): ``compare.md`` (the table for a
paper's appendix, the plot, the per-client table with ``--per-client``), ``compare.png`` (loss
curves per round, one colour per run: validation solid, train dashed, test dotted; with
``--per-client`` one panel per client too), ``compare.json`` (everything, machine-readable). Files
of an earlier compare in that directory are replaced (atomically); nothing else there is touched.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError

log = logging.getLogger(__name__)

#: round-row keys that are bookkeeping, shown in the standard rows or meaningless as a final value.
_BOOKKEEPING = {"round", "kind", "client", "clients", "rejected", "train_tokens", "tokens_per_s", "skipped_nonfinite",
                "bytes_down", "bytes_up", "eval_bytes_down", "eval_bytes_up", "seconds", "peak_rss_mb",
                "gpu_peak_mb", "task_eval_seconds", "lr", "steps", "step_seconds", "train_label_tokens",
                "up_rel_error"}

#: (row label, metrics.jsonl key, format) of the standard metric rows, in table order.
STANDARD: list[tuple[str, str, str]] = [
    ("val loss", "val_loss", "{:.4f}"),
    ("val ppl", "val_ppl", "{:.2f}"),
    ("test loss", "test_loss", "{:.4f}"),
    ("test ppl", "test_ppl", "{:.2f}"),
    ("val loss, mean of clients", "val_loss_mean_of_clients", "{:.4f}"),
    ("test loss, mean of clients", "test_loss_mean_of_clients", "{:.4f}"),
    ("train loss (last round)", "train_loss", "{:.4f}"),
]


def _is_quality(key: str) -> bool:
    """A held-out metric (what the "no common metric" check looks for): not bookkeeping and not a
    training statistic (every run has a train loss; it says nothing about the adapter's quality)."""
    return key not in _BOOKKEEPING and not key.startswith("train_")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _num(v: Any) -> float | int | None:
    """A finite number from a metrics row (ints stay ints: counts print as counts), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, int):
        return v
    return v if math.isfinite(v) else None


@dataclass
class RunRecord:
    """What one run directory says about itself."""

    path: Path
    label: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    skipped_lines: int = 0
    flat: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.flat = flatten(self.config)

    @property
    def round_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("kind") == "round"]

    @property
    def client_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("kind") == "client"]

    def final(self, key: str) -> float | None:
        """The value of ``key`` in the last round row that has one."""
        for r in reversed(self.round_rows):
            v = _num(r.get(key))
            if v is not None:
                return v
        return None

    def first(self, key: str) -> float | None:
        for r in self.round_rows:
            v = _num(r.get(key))
            if v is not None:
                return v
        return None

    @property
    def rounds(self) -> int:
        return max((int(r.get("round", 0)) for r in self.round_rows), default=0)

    def total(self, *keys: str) -> float:
        return float(sum(_num(r.get(k)) or 0.0 for r in self.round_rows for k in keys))

    def peak(self, key: str) -> float | None:
        vals = [v for r in self.round_rows if (v := _num(r.get(key))) is not None]
        return max(vals) if vals else None

    def metric_keys(self) -> set[str]:
        """Every numeric key some round row has."""
        return {k for r in self.round_rows for k, v in r.items() if _num(v) is not None}

    def clients(self) -> list[str]:
        """The clients with held-out metrics (a ``global`` run's single training client has none)."""
        return sorted({str(r["client"]) for r in self.client_rows if r.get("client") is not None
                       and any(_is_quality(k) and _num(v) is not None for k, v in r.items())})

    def client_final(self, client: str, key: str) -> float | None:
        for r in reversed(self.client_rows):
            if str(r.get("client")) == client and (v := _num(r.get(key))) is not None:
                return v
        return None

    def get(self, dotted: str, default: Any = None) -> Any:
        return self.flat.get(dotted, default)


def read_run(path: Path | str, label: str | None = None) -> RunRecord:
    """Read a run directory's ``config.yaml`` and ``metrics.jsonl`` (module docstring)."""
    import yaml

    p = Path(path)
    if not p.is_dir():
        raise FedtuneError(f"{p}: no such run directory")
    metrics = p / "metrics.jsonl"
    if not (p / "config.yaml").is_file() or not metrics.is_file():
        missing = [n for n in ("config.yaml", "metrics.jsonl") if not (p / n).is_file()]
        raise FedtuneError(f"{p} is not a fedtune run directory (no {' or '.join(missing)} in it)")
    try:
        config = yaml.safe_load((p / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise FedtuneError(f"{p}/config.yaml is not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise FedtuneError(f"{p}/config.yaml does not hold a config (a mapping)")
    rows, bad = [], 0
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        log.warning("%s: skipped %d line(s) of metrics.jsonl that are not JSON objects", metrics, bad)
    rec = RunRecord(p, label or p.name, config, rows, bad)
    if not rec.round_rows:
        raise FedtuneError(f"{p}/metrics.jsonl holds no round yet (no 'kind: round' row): has the run started?")
    return rec


def _labels(paths: list[Path], given: list[str] | None) -> list[str]:
    if given:
        if len(given) != len(paths):
            raise FedtuneError(f"--labels gives {len(given)} names for {len(paths)} runs")
        return given
    labels = [p.resolve().name for p in paths]
    if len(set(labels)) < len(labels):  # same directory names under different parents
        labels = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({i + 1})" for i, lab in enumerate(labels)]
    return labels


# ---- the comparison --------------------------------------------------------------------------

def _fmt(v: Any, fmt: str = "{:.4f}") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return fmt.format(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _duration(s: float | None) -> str:
    if not s:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


@dataclass
class Comparison:
    runs: list[RunRecord]
    #: (row label, one cell per run) in table order; ``sections`` marks where a new part starts.
    rows: list[tuple[str, list[str]]]
    values: dict[str, list[Any]]
    config_diff: dict[str, list[Any]]
    common: list[str]


def compare_runs(runs: list[RunRecord]) -> Comparison:
    """The table: standard rows, every other numeric metric, the differing config keys."""
    from fedtune.report import human_bytes

    keys = [r.metric_keys() for r in runs]
    quality = [{k for k in ks if _is_quality(k)} for ks in keys]
    common = sorted(set.intersection(*quality)) if quality else []
    if not common:
        have = "; ".join(f"{r.label}: {', '.join(sorted(q)) or 'none'}" for r, q in zip(runs, quality))
        raise FedtuneError(f"the runs share no metric to compare ({have}); evaluate them on the same splits "
                           "(eval.splits) or tasks (eval.tasks)")
    rows: list[tuple[str, list[str]]] = []
    values: dict[str, list[Any]] = {}

    def add(label: str, vals: list[Any], fmt: Any = "{:.4f}") -> None:
        if all(v is None for v in vals):
            return
        values[label] = vals
        rows.append((label, [fmt(v) if callable(fmt) else _fmt(v, fmt) for v in vals]))

    add("scenario", [r.get("fl.scenario") for r in runs])
    add("algorithm", [r.get("fl.algorithm") for r in runs])
    add("adapter", [_adapter_desc(r) for r in runs])
    add("rounds", [r.rounds for r in runs])
    add("clients", [len(r.clients()) or None for r in runs])
    for label, key, fmt in STANDARD:
        add(label, [r.final(key) for r in runs], fmt)
    shown = {key for _, key, _ in STANDARD}
    others = sorted(set().union(*keys) - shown - _BOOKKEEPING)
    for key in others:
        add(key, [r.final(key) for r in runs])
    add("bytes exchanged (train)", [r.total("bytes_up", "bytes_down") or None for r in runs], human_bytes)
    add("bytes exchanged (eval)", [r.total("eval_bytes_up", "eval_bytes_down") or None for r in runs], human_bytes)
    add("time in rounds", [r.total("seconds") or None for r in runs], _duration)
    add("peak RSS", [r.peak("peak_rss_mb") for r in runs], lambda v: "-" if v is None else f"{v:.0f} MB")
    add("peak GPU memory", [r.peak("gpu_peak_mb") for r in runs], lambda v: "-" if v is None else f"{v:.0f} MB")
    flat_keys = sorted(set().union(*(r.flat for r in runs)))
    diff = {k: [r.flat.get(k) for r in runs] for k in flat_keys
            if not k.startswith("output.") and len({json.dumps(r.flat.get(k), sort_keys=True) for r in runs}) > 1}
    for k, vals in diff.items():
        rows.append((f"config: {k}", [_fmt(v) for v in vals]))
    return Comparison(runs, rows, values, diff, common)


def _adapter_desc(r: RunRecord) -> str | None:
    method = r.get("peft.method")
    if method is None:
        return None
    if method == "lora":
        return f"lora r={r.get('peft.r')}"
    return f"{method} ({r.get('peft.num_virtual_tokens')} tokens)"


def text_table(c: Comparison) -> str:
    from fedtune.report import table

    return table(["", *(r.label for r in c.runs)], [[label, *cells] for label, cells in c.rows])


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def markdown(c: Comparison, *, png: str | None = None, per_client: bool = False, command: str | None = None) -> str:
    head = ["", *(r.label for r in c.runs)]
    lines = ["# fedtune compare", "", f"{time.strftime('%Y-%m-%d %H:%M')} · {len(c.runs)} runs", ""]
    lines += ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|---" + "|---:" * len(c.runs) + "|"]
    lines += ["| " + " | ".join(_md_cell(x) for x in (label, *cells)) + " |" for label, cells in c.rows]
    lines += ["", ("Final values: the last round that has the metric. Losses are token-weighted over every "
              "client's held-out split; a `local` run's loss pools each client's own adapter on its own data "
              "(the mean of clients is the unweighted mean of their losses). Time in rounds excludes model "
              "loading.")]
    if per_client:
        clients = sorted(set().union(*(r.clients() for r in c.runs)))
        for key in ("val_loss", "test_loss"):
            if not any(r.client_final(cl, key) is not None for r in c.runs for cl in clients):
                continue
            lines += ["", f"## {key.replace('_', ' ')} per client (last evaluated round)", "",
                      "| client | " + " | ".join(_md_cell(r.label) for r in c.runs) + " |",
                      "|---" + "|---:" * len(c.runs) + "|"]
            for cl in clients:
                vals = [r.client_final(cl, key) for r in c.runs]
                if all(v is None for v in vals):
                    continue
                lines.append(f"| {_md_cell(cl)} | " + " | ".join(_fmt(v) for v in vals) + " |")
    if png:
        lines += ["", f"![loss curves]({png})"]
    lines += ["", "Runs:", ""] + [f"- **{_md_cell(r.label)}**: `{r.path}`" for r in c.runs]
    if command:
        lines += ["", f"Made with `{command}`."]
    return "\n".join(lines) + "\n"


def plot(c: Comparison, path: Path, per_client: bool = False) -> Path:
    """Loss curves per round, runs overlaid (and one panel per client with ``per_client``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    clients = sorted(set().union(*(r.clients() for r in c.runs))) if per_client else []
    clients = [cl for cl in clients
               if any(r.client_final(cl, "val_loss") is not None or r.client_final(cl, "test_loss") is not None
                      for r in c.runs)]
    cols = min(4, max(1, len(clients)))
    grid_rows = math.ceil(len(clients) / cols) if clients else 0
    fig = plt.figure(figsize=(max(8, 3.2 * cols), 4 + 2.6 * grid_rows))
    gs = fig.add_gridspec(1 + grid_rows, cols, height_ratios=[1.6] + [1] * grid_rows)
    ax = fig.add_subplot(gs[0, :])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = (("val_loss", "-", "val", "o"), ("train_loss", "--", "train", "x"), ("test_loss", ":", "test", "s"))
    for i, r in enumerate(c.runs):
        col = colors[i % len(colors)]
        for key, ls, name, marker in styles:
            pts = [(int(row["round"]), v) for row in r.round_rows if (v := _num(row.get(key))) is not None]
            if pts:
                ax.plot(*zip(*pts), ls, color=col, marker=marker, ms=3, label=f"{r.label} ({name})")
    ax.set(xlabel="round", ylabel="loss", title="loss per round (val solid, train dashed, test dotted)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, ncol=max(1, len(c.runs) // 3 + 1))
    for j, cl in enumerate(clients):
        a = fig.add_subplot(gs[1 + j // cols, j % cols])
        for i, r in enumerate(c.runs):
            for key, ls in (("val_loss", "-"), ("test_loss", ":")):
                pts = [(int(row["round"]), v) for row in r.client_rows
                       if str(row.get("client")) == cl and (v := _num(row.get(key))) is not None]
                if pts:
                    a.plot(*zip(*pts), ls, color=colors[i % len(colors)], marker=".", label=r.label)
        a.set_title(cl, fontsize=9)
        a.tick_params(labelsize=7)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    from fedtune.utils import _atomic

    _atomic(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path


def default_out(labels: list[str]) -> Path:
    from fedtune.utils import safe_name

    name = "-vs-".join(safe_name(lab.replace("/", "_")) for lab in labels)
    return Path("runs") / f"compare-{name[:80]}"


def run_compare(paths: list[str], *, out: str | None = None, per_client: bool = False,
                labels: list[str] | None = None, command: str | None = None) -> tuple[Comparison, Path]:
    """Read, compare, write ``compare.md``, ``compare.png`` and ``compare.json``; return the comparison."""
    from fedtune.utils import atomic_write_json, atomic_write_text

    if len(paths) < 2:
        raise FedtuneError("give at least two run directories to compare")
    ps = [Path(p) for p in paths]
    names = _labels(ps, labels)
    runs = [read_run(p, lab) for p, lab in zip(ps, names)]
    c = compare_runs(runs)
    out_dir = Path(out) if out else default_out(names)
    if out_dir.exists() and not out_dir.is_dir():
        raise FedtuneError(f"--out {out_dir} exists and is not a directory")
    png = plot(c, out_dir / "compare.png", per_client=per_client)
    atomic_write_text(out_dir / "compare.md", markdown(c, png=png.name, per_client=per_client, command=command))
    atomic_write_json(out_dir / "compare.json", {
        "runs": [{"label": r.label, "path": str(r.path), "rounds": r.rounds} for r in runs],
        "table": {label: vals for label, vals in c.values.items()},
        "config_diff": c.config_diff, "common_metrics": c.common, "command": command,
        "per_client": {r.label: {cl: {k: r.client_final(cl, k) for k in ("val_loss", "test_loss")}
                                 for cl in r.clients()} for r in runs},
    })
    return c, out_dir


def main(args: Any) -> int:
    """Entry point of ``fedtune compare`` (arguments in :mod:`fedtune.cli`)."""
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    command = "fedtune compare " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["compare"] else None
    c, out_dir = run_compare(args.runs, out=args.out, per_client=args.per_client, labels=labels, command=command)
    if args.markdown:
        print((out_dir / "compare.md").read_text(), end="")
    else:
        print(text_table(c))
    print(f"\nwritten: {out_dir}/compare.md, compare.png, compare.json", file=sys.stderr if args.markdown else sys.stdout)
    return 0
