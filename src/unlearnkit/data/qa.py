"""Generic loaders: QA pairs from JSON / JSONL / CSV with configurable fields, raw-text corpora, HF datasets.

Every error names the file, the field and the row, in one line.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import UserError


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from e
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix in (".json", ".jsonl"):
        stripped = text.lstrip()
        if suffix == ".json" and stripped.startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from e
            return data
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        return records
    raise UserError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl or .csv")


def load_qa(path: str | Path, question_field: str = "question", answer_field: str = "answer",
            extra_fields: tuple[str, ...] = ()) -> list[dict]:
    """QA pairs as [{"question", "answer", ...extra, "index"}]. Empty file → error."""
    path = Path(path)
    records = _read_records(path)
    if not records:
        raise UserError(f"{path}: no rows (empty data set)")
    rows = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: row {i} is not an object")
        row = {"index": i}
        for src, dst in ((question_field, "question"), (answer_field, "answer")):
            value = rec.get(src)
            if not isinstance(value, str) or not value.strip():
                what = "missing" if src not in rec else f"empty or not text ({value!r:.40})"
                raise UserError(f"{path}: row {i}: field {src!r} {what}")
            row[dst] = value
        for name in extra_fields:
            if name not in rec:
                raise UserError(f"{path}: row {i}: field {name!r} missing")
            row[name] = rec[name]
        for key, value in rec.items():  # keep other fields (e.g. perturbed answers) for evaluation
            row.setdefault(key, value)
        rows.append(row)
    return rows


def load_corpus(path: str | Path, text_field: str = "text") -> list[str]:
    """Raw-text documents: a .txt file (blank-line separated passages) or JSON/JSONL rows with a text field."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    else:
        docs = []
        for i, rec in enumerate(_read_records(path)):
            value = rec.get(text_field) if isinstance(rec, dict) else rec if isinstance(rec, str) else None
            if not isinstance(value, str):
                raise UserError(f"{path}: row {i}: field {text_field!r} missing or not text")
            if value.strip():
                docs.append(value)
    if not docs:
        raise UserError(f"{path}: no text (empty corpus)")
    return docs


def load_hf_qa(name: str, split: str = "train", question_field: str = "question", answer_field: str = "answer",
               config: str | None = None) -> list[dict]:
    """QA pairs from a Hugging Face `datasets` dataset (local path or cached hub id), if `datasets` is installed."""
    try:
        import datasets
    except ImportError as e:
        raise UserError("Hugging Face datasets support needs `pip install datasets`") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types; report one line
        raise UserError(f"dataset {name!r} split {split!r}: cannot load ({str(e).splitlines()[0]})") from e
    for f in (question_field, answer_field):
        if f not in ds.column_names:
            raise UserError(f"dataset {name!r}: field {f!r} missing (columns: {', '.join(ds.column_names)})")
    return [{"index": i, **{k: v for k, v in rec.items()}, "question": rec[question_field],
             "answer": rec[answer_field]} for i, rec in enumerate(ds)]
