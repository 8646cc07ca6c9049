"""``fedtune eval`` given bad options, as a careless or hostile user would: each is one ``error:``
line naming the setting (exit 2, no traceback), found before any model is loaded, with nothing
written; an output directory that cannot be written is refused before the evaluation, not after."""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.cli import main


@pytest.fixture
def no_model(monkeypatch):
    import fedtune.models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(fedtune.models, "load_model", refuse)


BAD = [
    (["--limit", "-1"], "--limit must be a positive number of examples per task, got -1"),
    (["--limit", "0"], "--limit must be a positive number of examples per task, got 0"),
    (["--batch-size", "0"], "--batch-size must be from 1 to 65536"),
    (["--seed", "-5"], "--seed must be from 0 to 2^63-1, got -5"),
    (["--seed", str(10**30)], "--seed must be from 0 to 2^63-1"),
    (["--tasks", ","], "--tasks ',' names no task"),
    (["--tasks", "gsm8k,mmlu,gsm8k"], "--tasks lists gsm8k more than once"),
    (["gsm8k.shots=-1"], "option 'gsm8k.shots' must be from 0 to 8, got -1"),
    (["gsm8k.shots=9"], "option 'gsm8k.shots' must be from 0 to 8"),  # 8 published exemplars
    (["gsm8k.shots=.inf"], "option 'gsm8k.shots' must be a finite number"),
    (["gsm8k.temperature=.nan"], "option 'gsm8k.temperature' must be a finite number"),
    (["gsm8k.max_new_tokens=100000000000"], "option 'gsm8k.max_new_tokens' must be from 1 to 1,048,576"),
    (["gsm8k.shots=[&a [1,1], [*a, *a]]"], "task option 'gsm8k.shots' uses a YAML alias"),
    (["gsm8k.prompt=" + "x" * 20_000], "characters long"),
    (["--tasks", "humaneval", "humaneval.n=2.5"], "option 'humaneval.n' must be a whole number, got 2.5"),
    (["--tasks", "humaneval", "humaneval.timeout=.inf"], "option 'humaneval.timeout' must be a finite number"),
    (["--tasks", "humaneval", "humaneval.sandbox=off"], "humaneval.sandbox' must be one of require, best-effort"),
    (["--tasks", "mmlu", "mmlu.shots=6"], "option 'mmlu.shots' must be from 0 to 5"),  # 5 dev questions a subject
    (["--tasks", "imdb", "imdb.shots=500"], "option 'imdb.shots' must be from 0 to 50"),
    (["--tasks", "nq-open-book", "nq-open-book.shots=-1"], "option 'nq-open-book.shots' must be from 0 to 20"),
    (["--tasks", "helm-mini", "helm-mini.parts=[mmlu,foo]"], "unknown helm-mini part 'foo'"),
    (["--tasks", "helm-mini", "helm-mini.parts=[mmlu,mmlu]"], "lists a part twice"),
    (["--tasks", "helm-mini", "helm-mini.parts=7"], "option 'helm-mini.parts' must be a list of parts"),
    (["--tasks", "heldout", "heldout.split=training"], "option 'heldout.split' must be train, val or test"),
    (["--tasks", "heldout", "heldout.batch_size=0"], "option 'heldout.batch_size' must be from 1 to 65,536"),
    (["--tasks", "openbookqa", "openbookqa.calibrated=maybe"], "must be true or false"),
]


@pytest.mark.parametrize("extra, says", BAD, ids=[" ".join(b[0])[:40] for b in BAD])
def test_bad_eval_options_are_one_error_before_anything(extra, says, tmp_path, capsys, no_model):
    tasks = [] if "--tasks" in extra else ["--tasks", "gsm8k"]
    out = tmp_path / "out"
    rc = main(["eval", "tiny-llama", *tasks, *extra, "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and says in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_data_dir_that_is_a_file(tmp_path, capsys, no_model):
    f = tmp_path / "data.txt"
    f.write_text("x")
    assert main(["eval", "tiny-llama", "--tasks", "gsm8k", "--data-dir", str(f), "-q", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--data-dir {f} is a file, not a directory" in err and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# the output directory


def test_out_that_cannot_be_written_is_refused_first(tmp_path, capsys, no_model, monkeypatch):
    regular = tmp_path / "results.txt"
    regular.write_text("keep")
    cases = [(regular, f"--out {regular} is a file, not a directory"),
             (regular / "sub" / "dir", f"--out {regular / 'sub' / 'dir'} lies below {regular}, which is a file"),
             (Path("/proc/fedtune-eval-out"), "--out /proc/fedtune-eval-out cannot be written (/proc:")]
    for out, says in cases:
        rc = main(["eval", "tiny-llama", "--tasks", "gsm8k", "--limit", "1", "--out", str(out), "-q"])
        err = capsys.readouterr().err
        assert rc == 2 and says in err and "Traceback" not in err, err
    assert regular.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]
    # a read-only or full file system (as the probe sees it)
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    rc = main(["eval", "tiny-llama", "--tasks", "gsm8k", "--out", str(tmp_path / "new" / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be written" in err and "Read-only file system" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare (CI)")
def test_out_on_a_really_read_only_mount(tmp_path):
    """As root, permission bits do not stop writes; a read-only bind mount (in a private mount
    namespace, so nothing outside sees it) does, and the check must notice."""
    ro = tmp_path / "ro"
    ro.mkdir()
    src = Path(__file__).resolve().parents[2] / "src"
    code = ("import sys; from fedtune.eval.runner import check_output_dir\n"
            f"check_output_dir(__import__('pathlib').Path({str(ro / 'out')!r}), '--out')\n")
    script = f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && {sys.executable} -c \"$CODE\""
    r = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CODE": code, "PYTHONPATH": str(src)})
    assert r.returncode != 0 and "cannot be written" in r.stderr and "Read-only file system" in r.stderr, r.stderr
    assert list(ro.iterdir()) == []


def test_results_that_cannot_be_written_are_printed_and_one_error(tmp_path, capsys, monkeypatch, data_dir):
    """The disk fills (or the directory vanishes) during the evaluation: the tables are printed
    before the write, and the failure is one error naming the directory."""
    import fedtune.utils

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fedtune.utils, "atomic_write_json", full)
    out = tmp_path / "out"
    rc = main(["eval", "tiny-llama", "--tasks", "openbookqa", "--limit", "1", "--out", str(out), "-q",
               "--data-dir", str(data_dir)])
    captured = capsys.readouterr()
    assert rc == 2 and f"could not write the results to {out}: No space left on device" in captured.err
    assert "| base |" in captured.out and "Traceback" not in captured.err
