"""Library warnings stay off the terminal: they go to the run's log file (fedtune.logs)."""

import logging
import warnings

import pytest

from fedtune.logs import attach_log_file, setup_logging, teardown_logging


@pytest.fixture
def routed():
    yield setup_logging
    teardown_logging()


def test_library_records_go_to_the_log_file_and_fedtunes_own_to_stderr(routed, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FEDTUNE_SHOW_WARNINGS", raising=False)
    routed()
    warnings.warn("a library deprecation 1f3a", FutureWarning)
    logging.getLogger("transformers.modeling_utils").warning("transformers notice 1f3a")
    logging.getLogger("fedtune.run").warning("fedtune's own warning 1f3a")
    err = capsys.readouterr().err
    assert "deprecation 1f3a" not in err and "transformers notice 1f3a" not in err
    assert "fedtune's own warning 1f3a" in err
    assert attach_log_file(tmp_path / "run.log") == tmp_path / "run.log"
    warnings.warn("a later warning 1f3a", UserWarning)
    text = (tmp_path / "run.log").read_text()
    for s in ("FutureWarning: a library deprecation 1f3a", "transformers notice 1f3a", "fedtune's own warning 1f3a",
              "UserWarning: a later warning 1f3a"):
        assert s in text
    assert "later warning" not in capsys.readouterr().err


def test_show_warnings_escape_hatch(routed, capsys, monkeypatch):
    monkeypatch.setenv("FEDTUNE_SHOW_WARNINGS", "1")
    routed()
    warnings.warn("shown 7c2e", FutureWarning)
    assert "FutureWarning: shown 7c2e" in capsys.readouterr().err


def test_attach_is_a_no_op_for_library_users(tmp_path):
    teardown_logging()
    assert attach_log_file(tmp_path / "run.log") is None and not (tmp_path / "run.log").exists()


def test_a_real_run_keeps_the_terminal_clean(tiny_runs):
    for run_dir, err in tiny_runs.values():
        assert "Warning" not in err and "warnings.warn" not in err, err
        assert (run_dir / "run.log").is_file()
