"""What a person sees: the per-round table, the end-of-run summary and a loss-curve plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _f(v: Any, fmt: str = "{:.4f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


_SKIP_HINT = ("with train.precision=fp16 the loss scale may start too high (lower train.fp16_init_scale); "
              "otherwise check train.lr and the data")


def skipped_steps_note(rnd: int, client_rows: list[dict[str, Any]]) -> str | None:
    """A warning when clients skipped *every* local step of the round as non-finite (their update
    is the adapter they received), ``None`` otherwise."""
    trained = [c for c in client_rows if c.get("steps")]
    lost = sorted(str(c.get("client")) for c in trained if (c.get("skipped_nonfinite") or 0) >= c["steps"])
    if not lost:
        return None
    if len(lost) == len(trained):
        return (f"warning: every local step of round {rnd} was skipped as non-finite (NaN/Inf loss or gradients): "
                f"the adapter did not change this round; {_SKIP_HINT}")
    return (f"warning: {len(lost)} of {len(trained)} clients ({', '.join(lost)}) skipped every local step of round "
            f"{rnd} as non-finite, so their updates are the adapter they received; {_SKIP_HINT}")


def round_table(rnd: int, row: dict[str, Any], client_rows: list[dict[str, Any]]) -> str:
    headers = ["client", "train loss", "val loss", "test loss", "sent ↓", "recv ↑", "time"]
    # a "skipped" column only in a round where a step was skipped (NaN/Inf guard), "k/steps"
    skips = any((c.get("skipped_nonfinite") or 0) > 0 for c in client_rows)
    if skips:
        headers.insert(4, "skipped")
    body = []
    for c in sorted(client_rows, key=lambda r: str(r.get("client"))):
        cells = [str(c.get("client")), _f(c.get("train_loss")), _f(c.get("val_loss")), _f(c.get("test_loss")),
                 human_bytes(c.get("bytes_down")), human_bytes(c.get("bytes_up")), _f(c.get("seconds"), "{:.1f}s")]
        if skips:
            cells.insert(4, f"{c.get('skipped_nonfinite') or 0}/{c['steps']}" if c.get("steps") else "-")
        body.append(cells)
    total = ["ALL", _f(row.get("train_loss")), _f(row.get("val_loss")), _f(row.get("test_loss")),
             human_bytes(row.get("bytes_down")), human_bytes(row.get("bytes_up")), _f(row.get("seconds"), "{:.1f}s")]
    if skips:
        steps = sum(c.get("steps") or 0 for c in client_rows)
        total.insert(4, f"{sum(c.get('skipped_nonfinite') or 0 for c in client_rows)}/{steps}")
    body.append(total)
    title = f"round {rnd}" if rnd else "round 0 (before training)"
    extra = extra_metrics(row)
    more = "\n" + "  ".join(f"{k} {_f(v, '{:.4g}')}" for k, v in extra.items()) if extra else ""
    note = skipped_steps_note(rnd, client_rows)
    return f"\n{title}\n{table(headers, body)}{more}" + (f"\n{note}" if note else "")


#: round-row keys the tables above already show, or bookkeeping nobody needs per round
_SHOWN = {"round", "kind", "clients", "rejected", "bytes_down", "bytes_up", "eval_bytes_down", "eval_bytes_up",
          "train_loss", "val_loss", "test_loss", "val_ppl", "test_ppl", "seconds", "peak_rss_mb", "gpu_peak_mb",
          "tokens_per_s", "train_tokens", "train_label_tokens", "train_examples", "train_seconds", "step_seconds",
          "steps", "lr", "num_train", "task_eval_seconds"}


def extra_metrics(row: dict[str, Any]) -> dict[str, float]:
    """What an algorithm or objective adds to a round row (server step norms, control variates,
    local losses, codec error, task scores, ...): shown under the round table, never dropped."""
    return {k: v for k, v in sorted(row.items()) if k not in _SHOWN and isinstance(v, (int, float))
            and not isinstance(v, bool) and not k.endswith("_mean_of_clients")}


def summary_table(rows: list[dict[str, Any]]) -> str:
    headers = ["round", "train loss", "val loss", "val ppl", "test loss", "test ppl", "bytes ↓+↑", "tok/s",
               "time", "peak RSS"]
    body = []
    for r in rows:
        if r.get("kind") != "round":
            continue
        total = (r.get("bytes_down") or 0) + (r.get("bytes_up") or 0)
        body.append([str(r["round"]), _f(r.get("train_loss")), _f(r.get("val_loss")), _f(r.get("val_ppl"), "{:.2f}"),
                     _f(r.get("test_loss")), _f(r.get("test_ppl"), "{:.2f}"), human_bytes(total) if total else "-",
                     _f(r.get("tokens_per_s"), "{:.0f}"), _f(r.get("seconds"), "{:.1f}s"),
                     _f(r.get("peak_rss_mb"), "{:.0f} MB")])
    return table(headers, body)


def plot_losses(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Loss curves (train, val, test per round; val per client) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rr = [r for r in rows if r.get("kind") == "round"]
    if not rr:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train_loss", "val_loss", "test_loss"):
        pts = [(r["round"], r[key]) for r in rr if r.get(key) is not None]
        if pts:
            axes[0].plot(*zip(*pts), marker="o", label=key.replace("_", " "))
    axes[0].set(xlabel="round", ylabel="loss", title="aggregate")
    axes[0].legend()
    clients = sorted({r["client"] for r in rows if r.get("kind") == "client" and r.get("val_loss") is not None})
    for cid in clients:
        pts = [(r["round"], r["val_loss"]) for r in rows
               if r.get("kind") == "client" and r.get("client") == cid and r.get("val_loss") is not None]
        axes[1].plot(*zip(*pts), marker=".", label=cid)
    axes[1].set(xlabel="round", ylabel="val loss", title="per client (global adapter on client data)")
    if clients:
        axes[1].legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
