"""Instruction records and the file readers that produce them.

Every dataset fedtune trains on becomes a list of :class:`Record` (instruction, input, output,
category), the same four fields FS-LLM's ``load_json``/``load_jsonl`` produce, so splitters,
templates and tokenisation never see a dataset-specific schema.

Readers are strict: a malformed line or a record missing a required field raises one
:class:`~fedtune.errors.FedtuneError` naming the file and the line, instead of FS-LLM's silent
``None`` that only fails later inside the tokenizer.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError, did_you_mean


@dataclass(frozen=True, slots=True)
class Record:
    """One instruction-tuning example.

    ``input`` is the optional context (empty string when absent); ``category`` is the meta label
    used by the meta/Dirichlet splitters (Dolly's task type, CodeAlpaca's language), ``None``
    when the dataset has none.
    """

    instruction: str
    input: str
    output: str
    category: str | None = None


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Record))
REQUIRED_FIELDS: tuple[str, ...] = ("instruction", "output")
OPTIONAL_FIELDS: tuple[str, ...] = ("input", "category")

#: file suffixes :func:`load_records_file` understands (optionally followed by ``.gz``).
FILE_FORMATS: tuple[str, ...] = (".json", ".jsonl", ".csv")

#: the longest text a record field may hold (characters): far beyond any training example (they are
#: cut to ``data.max_length`` tokens anyway), and small enough that one absurd field cannot stall the
#: tokenizer or exhaust memory
MAX_FIELD_CHARS = 10_000_000
#: nesting of JSON values: records are flat objects of text; Python's parser stops near its
#: recursion limit (~1000 levels) with a RecursionError, reported as one error with the line where
#: the nesting passed this depth
MAX_JSON_DEPTH = 500


def file_format(path: Path) -> str | None:
    """``.json``/``.jsonl``/``.csv`` for a path (looking through a ``.gz`` suffix), else None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in FILE_FORMATS:
        return suffixes[-1]
    return None


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FedtuneError(f"cannot read data file '{path}': {e.strerror or e}") from None
    if path.suffix.lower() == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise FedtuneError(f"data file '{path}' is not a valid gzip file: {e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise FedtuneError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None


def _json_problem(e: Exception, text: str) -> tuple[str, int | None]:
    """What a JSON parse error means, and the offset in ``text`` it points at (None: unknown)."""
    if isinstance(e, json.JSONDecodeError):
        return f"malformed JSON ({e.msg} at column {e.colno})", e.pos
    if isinstance(e, RecursionError):
        return ("JSON nested too deeply (the parser stops near 1000 levels; records are flat objects of text)",
                _too_deep_at(text))
    import re

    digits = re.search(r"\d{4301,}", text)  # int() refuses longer decimal strings (CVE-2020-10735)
    if digits is not None:
        return f"a number of {digits.end() - digits.start()} digits (more than 4300 are refused)", digits.start()
    return f"malformed JSON ({e})", None


def _too_deep_at(text: str, limit: int = MAX_JSON_DEPTH) -> int | None:
    """Offset where the nesting of ``text`` first exceeds ``limit`` (strings skipped)."""
    depth, i, n, in_str = 0, 0, len(text), False
    while i < n:
        c = text[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
            if depth > limit:
                return i
        elif c in "]}":
            depth -= 1
        i += 1
    return None


def iter_jsonl(path: Path, text: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON Lines file."""
    text = _read_text(path) if text is None else text
    loads = json.loads
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise FedtuneError(f"{path}:{lineno}: {_json_problem(e, line)[0]}") from None
        if not isinstance(obj, dict):
            raise FedtuneError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _json_list_lines(path: Path, text: str) -> list[int]:
    """Line number where each element of a top-level JSON array starts (slow path, errors only)."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    starts: list[int] = []
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            break
        starts.append(i)
        _, i = decoder.raw_decode(text, i)
    lines, pos, line = [], 0, 1
    for s in starts:
        line += text.count("\n", pos, s)
        pos = s
        lines.append(line)
    return lines


def _iter_json_list(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        why, pos = _json_problem(e, text)
        line = f":{text.count(chr(10), 0, pos) + 1}" if pos is not None else ""
        raise FedtuneError(f"{path}{line}: {why}") from None
    if not isinstance(data, list):
        raise FedtuneError(
            f"{path}: expected a JSON list of objects, got a {type(data).__name__} "
            "(use .jsonl for one object per line)"
        )
    line_of: list[int] | None = None
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            line_of = line_of or _json_list_lines(path, text)
            raise FedtuneError(f"{path}:{line_of[i]}: expected a JSON object, got {type(obj).__name__}")
    # Line numbers are only computed when a record turns out to be invalid (see _to_records).
    lazy = _LazyLines(path, text)
    for i, obj in enumerate(data):
        yield lazy.at(i), obj


class _LazyLines:
    """An int-like line number for JSON arrays that is computed only when an error needs it."""

    def __init__(self, path: Path, text: str):
        self.path, self.text, self.lines = path, text, None

    def at(self, i: int) -> _LineRef:
        return _LineRef(self, i)

    def line(self, i: int) -> int:
        if self.lines is None:
            self.lines = _json_list_lines(self.path, self.text)
        return self.lines[i]


class _LineRef:
    __slots__ = ("owner", "i")

    def __init__(self, owner: _LazyLines, i: int):
        self.owner, self.i = owner, i

    def __str__(self) -> str:
        return str(self.owner.line(self.i))


def _iter_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return
    try:
        for row in reader:
            if None in row:  # more cells than header columns
                raise FedtuneError(
                    f"{path}:{reader.line_num}: row has {len(reader.fieldnames) + len(row[None])} cells "
                    f"but the header has {len(reader.fieldnames)}"
                )
            if not any(v for v in row.values()):
                continue
            # line_num is the line where the row ended (rows may span lines when quoted).
            yield reader.line_num, row
    except csv.Error as e:
        raise FedtuneError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def iter_objects(path: Path) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Yield ``(line, object)`` from a JSON list, JSONL or CSV file (``.gz`` allowed)."""
    fmt = file_format(path)
    if fmt == ".jsonl":
        return iter_jsonl(path)
    if fmt == ".json":
        return _iter_json_list(path)
    if fmt == ".csv":
        return _iter_csv(path)
    raise FedtuneError(
        f"data file '{path}' has an unknown format; use one of {', '.join(FILE_FORMATS)} (optionally .gz)"
    )


def check_field_mapping(fields: Mapping[str, str] | None) -> dict[str, str]:
    """Validate ``our field -> file column`` and fill unmapped fields with their own name."""
    mapping = {f: f for f in RECORD_FIELDS}
    for ours, theirs in (fields or {}).items():
        if ours not in RECORD_FIELDS:
            raise FedtuneError(
                f"data.fields: unknown record field '{ours}'{did_you_mean(ours, RECORD_FIELDS)}; "
                f"valid: {', '.join(RECORD_FIELDS)} (map our field -> your file's column)"
            )
        if not isinstance(theirs, str) or not theirs:
            raise FedtuneError(f"data.fields.{ours} must be a column name, got {theirs!r}")
        mapping[ours] = theirs
    return mapping


def _text(value: Any, path: Path, line: Any, column: str) -> str:
    if isinstance(value, str):
        if len(value) > MAX_FIELD_CHARS:
            raise FedtuneError(f"{path}:{line}: field '{column}' holds {len(value)} characters; at most "
                               f"{MAX_FIELD_CHARS} are accepted")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's "\ud800" escape decodes to a lone surrogate
                raise FedtuneError(
                    f"{path}:{line}: field '{column}' holds an unpaired surrogate "
                    f"{value[e.start]!r} at character {e.start}, which is not Unicode text (a "
                    r"\uD800-\uDFFF escape without its pair); fix or drop that record") from None
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FedtuneError(
            f"{path}:{line}: field '{column}' must be text, got {type(value).__name__} {str(value)[:40]!r}"
        )
    return str(value)


def to_records(
    path: Path, objects: Iterator[tuple[Any, dict[str, Any]]], mapping: dict[str, str]
) -> list[Record]:
    """Turn raw objects into records, failing on the first invalid one with file and line."""
    ins_col, in_col, out_col, cat_col = (mapping[f] for f in RECORD_FIELDS)
    records: list[Record] = []
    append = records.append
    for line, obj in objects:
        ins = obj.get(ins_col)
        out = obj.get(out_col)
        if ins is None or out is None:
            ours, col = ("instruction", ins_col) if ins is None else ("output", out_col)
            keys = ", ".join(map(str, obj)) or "none"
            hint = f"{did_you_mean(col, [str(k) for k in obj])}" if col not in obj else " (it is null)"
            raise FedtuneError(
                f"{path}:{line}: record has no '{col}' for the required field '{ours}'{hint}; "
                f"its keys: {keys}. Map columns with data.fields, e.g. fields: {{{ours}: <column>}}"
            )
        inp = obj.get(in_col)
        cat = obj.get(cat_col)
        append(
            Record(
                _text(ins, path, line, ins_col),
                "" if inp is None else _text(inp, path, line, in_col),
                _text(out, path, line, out_col),
                None if cat is None or cat == "" else _text(cat, path, line, cat_col),
            )
        )
    return records


def load_records_file(path: str | Path, fields: Mapping[str, str] | None = None) -> list[Record]:
    """Read a JSON list, JSON Lines or CSV file (``.gz`` allowed) into records.

    ``fields`` maps our field to the file's column, e.g. ``{"instruction": "question",
    "output": "answer"}``; unmapped fields default to the same name. ``instruction`` and
    ``output`` are required, ``input`` (default ``""``) and ``category`` (default ``None``) are
    optional. Any problem raises :class:`FedtuneError` naming the file and line.
    """
    p = Path(path).expanduser()
    mapping = check_field_mapping(fields)
    if not p.is_file():
        raise FedtuneError(f"data file '{p}' not found")
    return to_records(p, iter_objects(p), mapping)
