import json

import pytest

from fedtune.config import DataConfig
from fedtune.data import build_federated_data, describe_federated_data, format_description

NO_INPUT_FRAME = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n\n\n### Response:"
)


@pytest.fixture
def fed(tmp_path):
    p = tmp_path / "toy.jsonl"
    rows = [{"instruction": "q", "output": "o" * k, "category": "A"} for k in range(1, 21)]
    rows += [{"instruction": "q", "output": "o", "category": "B"} for _ in range(10)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_federated_data(DataConfig(source=str(p), splitter="meta", max_length=160), 0)


def test_sizes_histogram_and_token_stats(fed, char_tokenizer):
    desc = describe_federated_data(fed, char_tokenizer)
    a, b = desc["clients"]
    assert (a["name"], b["name"]) == ("A", "B")
    assert (a["train"], a["val"], a["test"]) == (18, 1, 1)  # 5% of 20 -> 1 each
    assert a["labels"] == {"A": 20} and b["labels"] == {"B": 10}
    # char tokenizer: BOS + prompt chars + output chars + EOS; outputs of 1..20 characters
    base = 1 + len(NO_INPUT_FRAME) + len("q") + 1
    stats = dict(a["length"])
    p95 = stats.pop("p95")
    assert stats == {"min": base + 1, "mean": base + 10.5, "median": base + 10.5, "max": base + 20}
    # p95 of 1..20 with linear interpolation is 1 + 0.95 * 19 = 19.05, reported to one decimal
    assert abs(p95 - (base + 19.05)) <= 0.05 + 1e-9
    assert b["length"]["min"] == b["length"]["max"] == base + 1
    assert desc["length_unit"] == "tokens"
    assert a["over_max_length"] == sum(base + k > 160 for k in range(1, 21))
    assert desc["totals"] == {"train": 18 + 8, "val": 2, "test": 2}
    assert desc["labels"] == ["A", "B"]


def test_heatmap_and_table(fed, tmp_path):
    out = tmp_path / "describe"
    desc = describe_federated_data(fed, None, out)
    assert desc["length_unit"] == "words"
    png = out / "label_distribution.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert desc["heatmap"] == str(png)
    json.dumps(desc)  # JSON-serialisable as it is
    text = format_description(desc)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("client") and "train" in line)
    end = header.index("train") + len("train")
    rows = [line for line in lines if line.startswith(("A ", "B ", "total"))][:3]
    assert len(rows) == 3
    for row in rows:
        assert row[end - 1].isdigit() and (len(row) == end or row[end] == " ")  # right-aligned column
    assert "records per category" in text


def test_mbxp_caveat_is_shown(shared_data):
    fed = build_federated_data(
        DataConfig(preset="fed-mbxp", max_records_per_client=5, max_eval_records_per_client=2), 0
    )
    text = format_description(describe_federated_data(fed))
    assert "WARNING" in text and "evaluation" in text and "python" in text
