"""Shared pytest setup: make ``src/`` importable when fedtune is not installed (src layout)."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("fedtune") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

