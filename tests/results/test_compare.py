"""``fedtune compare``: the table's values come from the runs' files (hand-written runs with known
numbers, and two real tiny runs of different scenarios), the plot and the markdown are written,
unknown metrics are shown rather than dropped, and bad input is one error."""

import json

import pytest
import yaml

from fedtune import cli
from fedtune.compare import read_run, run_compare, text_table
from fedtune.errors import FedtuneError


def _fake_run(d, scenario, lr, rounds, extra=None, drop=(), bad_line=False):
    """A run directory written by hand: round r has val loss 3 - r/10 (+ lr), 100 bytes up and 200
    down per round, 2 s per round, client rows for two clients."""
    d.mkdir(parents=True)
    cfg = {"seed": 0, "model": {"name": "tiny-llama"}, "fl": {"scenario": scenario, "algorithm": "fedavg",
           "rounds": rounds}, "train": {"lr": lr}, "peft": {"method": "lora", "r": 4},
           "output": {"dir": str(d)}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for r in range(rounds + 1):
        for c in ("a", "b"):
            lines.append({"round": r, "kind": "client", "client": c, "val_loss": 3 - r / 10 + (0.5 if c == "b" else 0)})
        row = {"round": r, "kind": "round", "val_loss": 3 - r / 10 + lr, "val_ppl": 20.0 - r}
        if r:
            row.update(train_loss=4 - r / 10, bytes_up=100, bytes_down=200, seconds=2.0, peak_rss_mb=500.0 + r)
        row.update(extra or {})
        for k in drop:
            row.pop(k, None)
        lines.append(row)
    text = "".join(json.dumps(x) + "\n" for x in lines)
    if bad_line:
        text += '{"round": 9, "kind": "rou'  # a run killed while writing
    (d / "metrics.jsonl").write_text(text)
    return d


def test_table_values_come_from_the_runs(tmp_path):
    a = _fake_run(tmp_path / "fed", "fed", 0.0, 3, extra={"gsm8k_accuracy": 0.25, "prox_term": 1.5})
    b = _fake_run(tmp_path / "local", "local", 0.01, 2, extra={"val_loss_mean_of_clients": 2.5}, bad_line=True)
    c, out = run_compare([str(a), str(b)], out=str(tmp_path / "cmp"), per_client=True)
    v = c.values
    assert v["scenario"] == ["fed", "local"] and v["rounds"] == [3, 2]
    assert v["val loss"] == [pytest.approx(2.7), pytest.approx(2.81)]  # 3 - 3/10, 3 - 2/10 + 0.01
    assert v["val loss, mean of clients"] == [None, 2.5]
    assert v["gsm8k_accuracy"] == [0.25, None] and v["prox_term"] == [1.5, None]  # not whitelisted away
    assert v["bytes exchanged (train)"] == [900, 600] and v["time in rounds"] == [6.0, 4.0]
    assert v["peak RSS"] == [503.0, 502.0]
    assert set(c.config_diff) == {"fl.scenario", "fl.rounds", "train.lr"}  # output.dir left out
    text = text_table(c)
    assert "config: train.lr" in text and "2.7000" in text and "900 B" in text
    md = (out / "compare.md").read_text()
    assert "| val loss | 2.7000 | 2.8100 |" in md and "![loss curves](compare.png)" in md
    assert "## val loss per client" in md and "| b | 3.2000 | 3.3000 |" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "compare.json").read_text())
    assert data["table"]["rounds"] == [3, 2] and "val_loss" in data["common_metrics"]
    assert read_run(b).skipped_lines == 1


def test_runs_with_no_common_metric_are_one_error(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", "fed", 0.0, 1, drop=("val_loss", "val_ppl"), extra={"test_loss": 2.0})
    b = _fake_run(tmp_path / "b", "fed", 0.0, 1)
    with pytest.raises(FedtuneError, match="share no metric"):
        run_compare([str(a), str(b)], out=str(tmp_path / "cmp"))
    assert not (tmp_path / "cmp").exists()
    assert cli.main(["compare", str(a), str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["compare", str(a), str(tmp_path / "empty")]) == 2
    assert "not a fedtune run directory" in capsys.readouterr().err
    assert cli.main(["compare", str(a)]) == 2
    assert "at least two" in capsys.readouterr().err


def test_compare_real_fed_and_local_runs(tiny_runs, tmp_path, capsys):
    fed, _ = tiny_runs["fed"]
    local, _ = tiny_runs["local"]
    assert cli.main(["compare", str(fed), str(local), "--out", str(tmp_path / "c"), "--per-client",
                     "--markdown"]) == 0
    out = capsys.readouterr().out
    def mean_of_clients(run):  # every run logs it: the unweighted mean of the clients' val losses
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["val_loss_mean_of_clients"] for r in rows if r.get("kind") == "round"][-1]

    assert out.startswith("# fedtune compare") and "| scenario | fed | local |" in out
    assert f"| val loss, mean of clients | {mean_of_clients(fed):.4f} | {mean_of_clients(local):.4f} |" in out
    assert "| config: fl.scenario | fed | local |" in out
    assert "## val loss per client" in out and "| alpha |" in out
    assert (tmp_path / "c" / "compare.png").stat().st_size > 10_000


def test_counts_print_as_counts_and_non_numbers_are_skipped():
    from fedtune.compare import _fmt, _num

    assert _fmt(_num(100)) == "100"  # num_train, tokens: not 100.0000
    assert _fmt(_num(2.5)) == "2.5000"
    assert _num(float("nan")) is None and _num(float("inf")) is None
    assert _num(True) is None and _num("3") is None
