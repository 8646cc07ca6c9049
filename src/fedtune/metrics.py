"""Per-round metrics: JSONL (appended as it happens), CSV (rewritten atomically), TensorBoard.

Two kinds of rows share one stream: ``kind=client`` (one per client per round) and
``kind=round`` (the aggregate). Memory figures come from the OS, so they include everything.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from fedtune.utils import atomic_write_text

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` of /proc/self/status — ``ru_maxrss`` is inherited across fork + exec, so a run
    started by a bigger process (a test runner, a benchmark, ``fedtune hpo``) would report the
    parent's peak instead of its own. Elsewhere ``ru_maxrss`` (KiB on Linux/BSD, bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def gpu_peak_mb() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_round: int | None = None):
        self.dir = Path(run_dir)
        self.jsonl = self.dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if resume_round is not None and self.jsonl.is_file():
            # keep what the checkpoint covers; rounds after it will be redone
            bad = 0
            for line in self.jsonl.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):  # e.g. a line cut short by a kill mid-append
                    row = None
                if not isinstance(row, dict) or not isinstance(row.get("round", 0), int):
                    bad += line.strip() != ""
                    continue
                if row.get("round", 0) <= resume_round:
                    self.rows.append(row)
            if bad:
                log.warning("%s: dropped %d malformed line(s) (a write cut short?)", self.jsonl, bad)
            atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        elif self.jsonl.exists():
            self.jsonl.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                log.debug("tensorboard not installed; skipping it")

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None and row.get("kind") in ("round", "client"):
            prefix = "round" if row["kind"] == "round" else f"client/{row.get('client')}"
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round":
                    self.tb.add_scalar(f"{prefix}/{k}", v, row.get("round", 0))

    def flush(self) -> None:
        for kind in ("round", "client"):
            rows = [r for r in self.rows if r.get("kind") == kind]
            if not rows:
                continue
            cols: list[str] = []
            for r in rows:
                cols += [k for k in r if k not in cols]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
            atomic_write_text(self.dir / f"metrics_{kind}s.csv", buf.getvalue())
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer (idempotent: every exit path of a run calls it)."""
        self.flush()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
