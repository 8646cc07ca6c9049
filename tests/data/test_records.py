import gzip
import json

import pytest

from fedtune.data import Record, load_records_file
from fedtune.errors import FedtuneError


def test_jsonl_with_field_mapping(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text(
        json.dumps({"question": "2+2?", "answer": "4", "topic": "math"}) + "\n"
        "\n"  # blank lines are skipped
         + json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n"
    )
    recs = load_records_file(p, {"instruction": "question", "output": "answer", "category": "topic"})
    assert recs == [Record("2+2?", "", "4", "math"), Record("Capital of France?", "", "Paris", None)]


def test_json_list_default_names_and_numbers(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"instruction": "a", "input": "b", "output": 3, "category": "x"}]))
    assert load_records_file(p) == [Record("a", "b", "3", "x")]


def test_csv_and_gzip(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('prompt,completion\n"multi\nline",yes\nq2,no\n')
    recs = load_records_file(p, {"instruction": "prompt", "output": "completion"})
    assert recs == [Record("multi\nline", "", "yes"), Record("q2", "", "no")]
    g = tmp_path / "d.jsonl.gz"
    g.write_bytes(gzip.compress(b'{"instruction": "i", "output": "o"}\n'))
    assert load_records_file(g) == [Record("i", "", "o")]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n{"instruction": oops}\n'
    )
    with pytest.raises(FedtuneError) as e:
        load_records_file(p)
    assert f"{p}:3" in str(e.value)


def test_missing_field_in_json_list_names_line(tmp_path):
    p = tmp_path / "list.json"
    # record 0 on lines 2-5, record 1 on lines 6-8 (no "output")
    p.write_text(
        '[\n  {\n    "instruction": "a",\n    "output": "b"\n  },\n  {\n    "instruction": "c"\n  }\n]\n'
    )
    with pytest.raises(FedtuneError) as e:
        load_records_file(p)
    msg = str(e.value)
    assert f"{p}:6" in msg and "'output'" in msg


def test_missing_mapped_column_in_csv_names_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("question,answer\nq1,a1\nq2,\n")
    # empty CSV cells are fine for output (they are text); a missing column is not
    with pytest.raises(FedtuneError) as e:
        load_records_file(p, {"instruction": "question", "output": "response"})
    assert f"{p}:2" in str(e.value) and "response" in str(e.value)


def test_unknown_mapping_key_suggests(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(FedtuneError, match="did you mean 'instruction'"):
        load_records_file(p, {"instructions": "q"})


def test_non_text_field_and_non_object_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": ["x"], "output": "b"}\n')
    with pytest.raises(FedtuneError, match=r":1: field 'instruction' must be text"):
        load_records_file(p)
    q = tmp_path / "e.jsonl"
    q.write_text('{"instruction": "a", "output": "b"}\n[1, 2]\n')
    with pytest.raises(FedtuneError, match=r"e.jsonl:2: expected a JSON object"):
        load_records_file(q)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FedtuneError, match="not found"):
        load_records_file(tmp_path / "nope.jsonl")
    p = tmp_path / "d.txt"
    p.write_text("x")
    with pytest.raises(FedtuneError, match="unknown format"):
        load_records_file(p)


def test_record_is_frozen():
    r = Record("i", "", "o")
    with pytest.raises(AttributeError):
        r.output = "x"  # type: ignore[misc]
