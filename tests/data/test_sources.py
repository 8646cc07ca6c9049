import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from fedtune.config import DataConfig
from fedtune.data import SOURCES, Record, git_blob_id, gsm8k_answer, load_source
from fedtune.data.sources import Source, SourceFile, _parse_gsm8k, locate
from fedtune.errors import FedtuneError


def _available(name: str) -> bool:
    root = os.environ.get("FEDTUNE_DATA_DIR")  # set to ../shared/data by conftest when present
    return bool(root) and all(
        any((Path(root) / r).is_file() for r in f.relpaths) for f in SOURCES[name].files
    )


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_source_loads_or_explains_what_is_missing(name, tmp_path, monkeypatch):
    source = SOURCES[name]
    assert source.files and all(f.url.startswith("https://") for f in source.files)
    if _available(name):
        recs = load_source(name, DataConfig())
        assert recs and all(isinstance(r, Record) for r in recs)
        assert all(isinstance(r.instruction, str) and r.instruction.strip() for r in recs)
        assert all(isinstance(r.output, str) and isinstance(r.input, str) for r in recs)
    # Contract for every source: with no copy anywhere, one error naming file, URL and setting.
    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(FedtuneError) as e:
        load_source(name, DataConfig())
    msg = str(e.value)
    first = source.files[0]
    assert first.name in msg
    assert first.url in msg
    assert "data.data_dir" in msg and "FEDTUNE_DATA_DIR" in msg
    assert str(tmp_path / "empty" / first.name) in msg


def test_git_blob_id_matches_git():
    # Well-known ids: `printf '' | git hash-object --stdin`, `echo hello | git hash-object --stdin`.
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_gsm8k_answer_rewrite_hand_cases():
    assert gsm8k_answer("3 + 4 = <<3+4=7>>7\n#### 7") == "3 + 4 = <<3+4=7>>7\nThe answer is 7"
    assert gsm8k_answer("a\n#### 1,080") == "a\nThe answer is 1,080"


def test_gsm8k_answers_end_with_the_answer_is(shared_data):
    raw = [json.loads(line) for line in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()]
    recs = load_source("gsm8k", DataConfig())
    assert len(recs) == len(raw) == 7473
    for r, obj in zip(recs, raw):
        final = obj["answer"].split("####")[-1].strip()
        assert r.instruction == obj["question"]
        assert r.output.endswith(f"The answer is {final}")
        assert "####" not in r.output
        # FS-LLM's own transformation gives the same text
        assert r.output == obj["answer"].replace("####", "The answer is")
    assert len(load_source("gsm8k-test", DataConfig())) == 1319


def test_dolly_fields_and_category_counts(shared_data):
    recs = load_source("dolly", DataConfig())
    counts = Counter(r.category for r in recs)
    # MANIFEST.md note 7
    assert counts == {
        "open_qa": 3742,
        "general_qa": 2191,
        "classification": 2136,
        "closed_qa": 1773,
        "brainstorming": 1766,
        "information_extraction": 1506,
        "summarization": 1188,
        "creative_writing": 709,
    }
    first = json.loads((shared_data / "dolly" / "databricks-dolly-15k.jsonl").open().readline())
    assert recs[0] == Record(first["instruction"], first["context"], first["response"], first["category"])


def test_mbxp_only_languages_with_solutions(shared_data):
    recs = load_source("mbxp", DataConfig())
    # MANIFEST.md note 8: records with a canonical solution per language
    assert Counter(r.category for r in recs) == {
        "python": 974,
        "cpp": 773,
        "csharp": 725,
        "java": 874,
        "javascript": 938,
        "kotlin": 796,
        "php": 950,
        "ruby": 784,
        "typescript": 967,
    }
    assert all(r.input == r.category for r in recs)
    first = json.loads((shared_data / "mbxp" / "mbjp_release_v1.2.jsonl").open().readline())
    java = next(r for r in recs if r.category == "java")
    assert java.instruction == first["description"]
    assert java.output == first["prompt"] + first["canonical_solution"]


def test_alpaca_count(shared_data):
    assert len(load_source("alpaca", DataConfig())) == 52002


def test_data_dir_wins_and_unknown_checksum_only_warns(shared_data, tmp_path, caplog):
    d = tmp_path / "mine"
    (d / "gsm8k").mkdir(parents=True)
    lines = (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines(keepends=True)[:5]
    (d / "gsm8k" / "test.jsonl").write_text("".join(lines))
    with caplog.at_level(logging.WARNING, logger="fedtune.data.sources"):
        recs = load_source("gsm8k-test", DataConfig(data_dir=str(d)))
    assert len(recs) == 5
    assert "does not match any known version" in caplog.text
    # a byte-identical copy is recognised silently
    caplog.clear()
    exact = tmp_path / "exact" / "gsm8k"
    exact.mkdir(parents=True)
    shutil.copy(shared_data / "gsm8k" / "test.jsonl", exact / "test.jsonl")
    with caplog.at_level(logging.WARNING, logger="fedtune.data.sources"):
        load_source("gsm8k-test", DataConfig(data_dir=str(exact.parent)))
    assert "does not match" not in caplog.text


def _file_source(tmp_path, content: bytes, **digests) -> Source:
    src = tmp_path / "remote" / "train.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(content)
    spec = SourceFile(name="toy/train.jsonl", url=src.as_uri(), **digests)
    return Source(name="toy", description="", files=(spec,), parse=_parse_gsm8k)


def test_download_verifies_checksum_then_renames(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDTUNE_OFFLINE")
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(tmp_path / "empty"))
    content = b'{"question": "q", "answer": "r\\n#### 5"}\n'
    good = _file_source(tmp_path, content, sha256=(hashlib.sha256(content).hexdigest(),))
    (path,) = locate(good, DataConfig())
    assert path == tmp_path / "cache" / "data" / "toy" / "train.jsonl"
    assert path.read_bytes() == content
    assert good.parse([path]) == [Record("q", "", "r\nThe answer is 5")]

    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache2"))
    bad = _file_source(tmp_path, content, git_blob=("0" * 40,))
    with pytest.raises(FedtuneError, match="does not match the expected checksum"):
        locate(bad, DataConfig())
    leftovers = list((tmp_path / "cache2").rglob("*"))
    assert [p for p in leftovers if p.is_file()] == []  # nothing half-written or unverified


def test_download_without_digest_records_first_sha256(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDTUNE_OFFLINE")
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(tmp_path / "empty"))
    content = b'{"question": "q", "answer": "#### 1"}\n'
    (path,) = locate(_file_source(tmp_path, content), DataConfig())
    side = path.with_name(path.name + ".sha256")
    assert side.read_text().split()[0] == hashlib.sha256(content).hexdigest()


def test_offline_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(tmp_path / "empty"))
    src = _file_source(tmp_path, b'{"question": "q", "answer": "a"}\n')
    with pytest.raises(FedtuneError, match="FEDTUNE_OFFLINE"):
        locate(src, DataConfig())
    assert not (tmp_path / "cache" / "data" / "toy").exists()


def test_file_path_source_and_unknown_name(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "mine.jsonl").write_text('{"q": "x", "a": "y"}\n')
    cfg = DataConfig(data_dir=str(d), fields={"instruction": "q", "output": "a"})
    assert load_source("mine.jsonl", cfg) == [Record("x", "", "y")]  # relative: found in data_dir
    assert load_source(str(d / "mine.jsonl"), cfg) == [Record("x", "", "y")]
    with pytest.raises(FedtuneError, match="did you mean 'dolly'"):
        load_source("dolyl", DataConfig())
    with pytest.raises(FedtuneError, match="not found"):
        load_source("missing.jsonl", DataConfig())
    # every place looked in is named once: an absolute path is only itself
    absent = str(tmp_path / "absent.jsonl")
    with pytest.raises(FedtuneError) as e:
        load_source(absent, DataConfig(data_dir=str(d)))
    assert str(e.value).count(absent) == 1
    with pytest.raises(FedtuneError) as e:
        load_source("absent.jsonl", DataConfig(data_dir=str(d)))
    msg = str(e.value)
    assert msg.count(str(d / "absent.jsonl")) == 1 and str(Path.cwd() / "absent.jsonl") in msg
