"""Where log records and Python warnings go, so the terminal shows only what the user needs.

Libraries print deprecation notices on every run (transformers' ``is_gradient_checkpointing``
FutureWarning, peft's and torch's UserWarnings): they are about fedtune's code, not the user's
input, and drown the round tables. :func:`setup_logging` (called once, by ``fedtune.cli.main``)
sends them elsewhere:

* Python warnings are captured into logging (``logging.captureWarnings``: logger ``py.warnings``)
  and transformers' own logger is made to propagate instead of printing itself;
* the terminal (stderr) shows fedtune's records at ``$FEDTUNE_LOG`` (default WARNING) and above,
  and library records (``py.warnings``, transformers, peft, torch, ...) only with
  ``FEDTUNE_SHOW_WARNINGS=1`` or ``-v``;
* transformers' own progress bars (``Loading weights``, ``Writing model shards``) are switched off
  unless library warnings are shown; fedtune's own bars (rounds, evaluation) stay;
* every record that passes the level (library warnings included) is kept: in memory until
  :func:`attach_log_file` names a file (``fedtune run`` attaches ``RUN_DIR/run.log`` as soon as the
  run directory exists, and the records held so far are written first), else, for commands
  without a run directory (``chat``, ``export``, ``compare``, ``eval``), dropped at exit.

Library code that never calls :func:`setup_logging` (fedtune used as a library, the tests) keeps
Python's and the libraries' defaults: :func:`attach_log_file` is then a no-op.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

#: loggers whose records are library noise on the terminal (kept in the log file).
LIBRARY_LOGGERS = ("py.warnings", "transformers", "peft", "torch", "accelerate", "huggingface_hub",
                   "safetensors", "matplotlib", "PIL", "urllib3", "filelock", "fsspec")
#: records held before a log file is attached (the oldest are dropped beyond this).
_BUFFER_LIMIT = 2000
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _is_library(record: logging.LogRecord) -> bool:
    return any(record.name == n or record.name.startswith(n + ".") for n in LIBRARY_LOGGERS)


class _Console(logging.Handler):
    """stderr as it is when a record arrives (pytest and other callers swap ``sys.stderr``), so the
    handler never writes to a stream that has been closed."""

    def __init__(self, show_library: bool):
        super().__init__()
        self.show_library = show_library
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if _is_library(record) and not self.show_library:
            return
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


class _Keeper(logging.Handler):
    """Every record: held in memory until a file is attached, then written to that file."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None
        self.setFormatter(logging.Formatter(_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.emit(record)
        else:
            self.held.append(record)
            if len(self.held) > _BUFFER_LIMIT:
                del self.held[0]

    def attach(self, path: Path) -> None:
        if self.file is not None:
            if Path(self.file.baseFilename) == Path(path).absolute():
                return
            self.file.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(path, mode="a", encoding="utf-8", delay=False)
        self.file.setFormatter(self.formatter)
        for r in self.held:
            self.file.emit(r)
        self.held.clear()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.held.clear()
        super().close()


_installed: list[logging.Handler] = []
_captured = False  # whether captureWarnings(True) is ours to undo


def show_library_warnings(verbose: bool = False) -> bool:
    """``-v`` or ``FEDTUNE_SHOW_WARNINGS=1`` (any value but empty/0/false/no)."""
    env = os.environ.get("FEDTUNE_SHOW_WARNINGS", "").strip().lower()
    return bool(verbose) or env not in ("", "0", "false", "no")


def setup_logging(verbose: bool = False) -> None:
    """Route log records and warnings as the module docstring says. Idempotent: a second call
    (the tests call ``fedtune.cli.main`` many times in one process) replaces the first one's
    handlers."""
    global _captured
    teardown_logging()
    root = logging.getLogger()
    level = os.environ.get("FEDTUNE_LOG", "WARNING").upper()
    root.setLevel(logging.INFO if verbose and level == "WARNING" else level)
    show = show_library_warnings(verbose)
    for h in (_Console(show), _Keeper()):
        root.addHandler(h)
        _installed.append(h)
    logging.captureWarnings(True)
    _captured = True
    try:  # transformers prints through its own stderr handler unless told to propagate
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        if not show:  # its "Loading weights" / "Writing model shards" bars: library output too
            hf_logging.disable_progress_bar()
    except ImportError:
        pass


def teardown_logging() -> None:
    """Undo :func:`setup_logging` (closing the log file)."""
    global _captured
    root = logging.getLogger()
    while _installed:
        h = _installed.pop()
        root.removeHandler(h)
        h.close()
    if _captured:
        logging.captureWarnings(False)
        _captured = False
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_propagation()
            hf_logging.enable_default_handler()
            hf_logging.enable_progress_bar()
        except ImportError:
            pass


def attach_log_file(path: Path | str) -> Path | None:
    """Write the records kept so far, and every later one, to ``path`` (appended: a resumed run
    continues its ``run.log``). A no-op (None) unless :func:`setup_logging` is in effect."""
    keeper = next((h for h in _installed if isinstance(h, _Keeper)), None)
    if keeper is None:
        return None
    keeper.attach(Path(path))
    return Path(path)
