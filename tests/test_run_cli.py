"""The ``fedtune`` command, in process: argument parsing and bad input (one message, exit 2)."""

import pytest

from fedtune import cli


@pytest.fixture
def captured_run(monkeypatch):
    """Replace the run itself: these tests are about what reaches it."""
    import fedtune.run

    calls = []
    monkeypatch.setattr(fedtune.run, "run", lambda cfg, resume=None, verbose=True: calls.append((cfg, resume, verbose)))
    return calls


@pytest.mark.parametrize("argv", [
    ["run", "CFG", "--resume", "R", "fl.rounds=5", "-q", "train.lr=0.002"],  # overrides after flags
    ["run", "CFG", "fl.rounds=5", "train.lr=0.002", "--resume", "R", "-q"],  # before
    ["run", "CFG", "fl.rounds=5", "-q", "train.lr=0.002", "--resume", "R"],  # between
    ["run", "--resume", "R", "-q", "CFG", "fl.rounds=5", "train.lr=0.002"],
])
def test_run_overrides_and_flags_in_any_order(tmp_path, captured_run, argv):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("fl: {rounds: 2}\n")
    argv = [str(cfg_file) if a == "CFG" else str(tmp_path / "r") if a == "R" else a for a in argv]
    assert cli.main(argv) == 0
    (cfg, resume, verbose), = captured_run
    assert cfg.fl.rounds == 5 and cfg.train.lr == 0.002
    assert resume == str(tmp_path / "r") and verbose is False


def test_data_describe_and_eval_take_options_after_flags(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_describe", lambda args: seen.setdefault("describe", args))
    monkeypatch.setattr(cli, "_eval", lambda args: seen.setdefault("eval", args))
    assert cli.main(["data", "describe", "fed-dolly", "--no-tokens", "data.num_clients=3", "--out", "o",
                     "data.max_length=64"]) == 0
    d = seen["describe"]
    assert d.overrides == ["data.num_clients=3", "data.max_length=64"] and d.no_tokens and d.out == "o"
    assert cli.main(["eval", "RUN", "--limit", "5", "humaneval.n=10", "-q", "gsm8k.shots=4"]) == 0
    e = seen["eval"]
    assert e.options == ["humaneval.n=10", "gsm8k.shots=4"] and e.limit == 5 and e.quiet


def test_unknown_flag_is_still_an_argparse_error(tmp_path, captured_run, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", str(tmp_path / "c.yaml"), "--nope", "x"])
    assert e.value.code == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err
    assert not captured_run
