"""Helpers shared by the benchmark scripts (each script stays runnable on its own:
``python benchmarks/NAME.py`` puts this folder first on ``sys.path``)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_log(name: str):
    """``log(msg)``: a timestamped progress line on stderr (stdout ends with the JSON result)."""

    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


def data_dir() -> str:
    """Where the benchmark data is: ``$FEDTUNE_DATA_DIR``, else ``../shared/data`` beside the repo."""
    return os.environ.get("FEDTUNE_DATA_DIR") or str((REPO / ".." / "shared" / "data").resolve())


class CpuMonitor:
    """CPU time used by *other* processes while we measure (background load on a shared box)."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.proc = psutil.Process()
        self.t0 = time.perf_counter()
        self.busy0 = self._busy()
        self.own0 = self._own()

    def _busy(self) -> float:
        c = self.psutil.cpu_times()
        return c.user + c.nice + c.system + getattr(c, "irq", 0) + getattr(c, "softirq", 0)

    def _own(self) -> float:
        c = self.proc.cpu_times()
        return c.user + c.system + c.children_user + c.children_system

    def result(self) -> dict:
        wall = time.perf_counter() - self.t0
        other = max(0.0, (self._busy() - self.busy0) - (self._own() - self.own0))
        return {"wall_s": round(wall, 1), "other_cpu_s": round(other, 1),
                "other_cpu_cores": round(other / wall, 3) if wall > 0 else 0.0,
                "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
