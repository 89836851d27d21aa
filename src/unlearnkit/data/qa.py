"""Generic loaders: QA pairs from JSON / JSONL / CSV with configurable fields, raw-text corpora, HF datasets.

Every error names the file, the field and the row, in one line.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import UserError


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A data file's text; a UTF-8 byte-order mark (Excel writes one) is dropped. Bytes that are not valid in
    `encoding` give a one-line error naming the file, line and byte position."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from e
    skip = 3 if data.startswith(b"\xef\xbb\xbf") and encoding.lower().replace("_", "-") in ("utf-8", "utf8") else 0
    try:
        return data[skip:].decode(encoding)
    except LookupError as e:
        raise UserError(f"{path}: unknown encoding {encoding!r}") from e
    except UnicodeDecodeError as e:
        pos = skip + e.start
        line = data.count(b"\n", 0, pos) + 1
        raise UserError(f"{path}: not valid {encoding} text at line {line}, byte {pos} "
                        f"(0x{data[pos]:02x}); save the file as UTF-8") from e


def read_records(path: Path, encoding: str = "utf-8") -> list[dict]:
    text = read_text(path, encoding)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        try:
            # newline="": quoted fields may hold line breaks
            return list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as e:
            raise UserError(f"{path}: invalid CSV ({e})") from e
    if suffix in (".json", ".jsonl"):
        stripped = text.lstrip()
        if suffix == ".json" and stripped.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from e
        return _json_lines(path, text)
    raise UserError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl or .csv")


def _json_lines(path: Path, text: str) -> list:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
    return records


def load_qa(path: str | Path, question_field: str = "question", answer_field: str = "answer",
            extra_fields: tuple[str, ...] = (), encoding: str = "utf-8") -> list[dict]:
    """QA pairs as [{"question", "answer", ...extra, "index"}]. Empty file → error."""
    path = Path(path)
    records = read_records(path, encoding)
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


def load_corpus(path: str | Path, text_field: str = "text", encoding: str = "utf-8") -> list[str]:
    """Raw-text documents: a .txt file (blank-line separated passages) or JSON/JSONL rows with a text field."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        text = read_text(path, encoding).replace("\r\n", "\n")  # Windows line ends still separate passages
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    else:
        docs = []
        for i, rec in enumerate(read_records(path, encoding)):
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
    rows = []
    for i, rec in enumerate(ds):
        for f in (question_field, answer_field):
            value = rec[f]
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"dataset {name!r} split {split!r}: row {i}: field {f!r} empty or not text "
                                f"({value!r:.40})")
        rows.append({"index": i, **rec, "question": rec[question_field], "answer": rec[answer_field]})
    return rows
