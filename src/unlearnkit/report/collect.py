"""Find what each folder given to `unlearnkit report` holds, by the files in it (never by its name).

Each known kind of folder (kinds.KINDS) has a detector: the file it is recognised by (plus, where one file name is
shared by two kinds, a check of its contents). A folder of no known kind is searched a few levels down for folders
of known kinds (e.g. a `runs/` folder holding several runs); a folder with none is an error naming it. Everything
here reads JSON only: it runs before any output is written."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..files import MARKER

SKIP_DIRS = {"checkpoint", "tb", "__pycache__"}  # work folders inside runs: never runs themselves
MAX_DEPTH = 3
REPORT_KIND = "report"  # our own output: recognised, and skipped when found inside a folder given


@dataclass
class Item:
    """One folder of a known kind."""
    kind: "Kind"
    path: Path
    label: str                   # how the report names it (the path as given, or below a folder given)
    doc: dict                    # its main JSON file
    marker: dict = field(default_factory=dict)


@dataclass
class ModelResult:
    """One evaluated model: a row of the results table and a point, bar or curve in the comparison figures."""
    name: str
    role: str                    # model | retain | target
    summary: dict
    source: str                  # label of the folder it comes from
    eval_path: Path | None = None
    group: str | None = None     # a sweep's label for its points
    reference: "ModelResult | None" = None   # the retain model it is compared with (set by the report)
    colour: int = 0              # palette index, the same in every figure


@dataclass(frozen=True)
class Kind:
    name: str                    # e.g. "unlearn"
    title: str                   # e.g. "Unlearn run"
    signature: str               # the file it is recognised by
    accept: Callable[[Path, dict], bool] = lambda folder, doc: True
    models: Callable[[Item], list] = lambda item: []
    facts: Callable[[Item], dict] = lambda item: {}          # command, versions, seed, seconds it records itself
    section: Callable | None = None                           # (item, report context) -> list of blocks


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UserError(f"{path}: no such file") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({str(e).splitlines()[0]})") from e


def marker_of(folder: Path) -> dict:
    try:
        m = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return m if isinstance(m, dict) else {}


def detect(folder: Path, label: str) -> Item | None:
    """The item a folder is, or None."""
    from .kinds import KINDS

    for kind in KINDS:
        main = folder / kind.signature
        if main.is_file():
            doc = read_json(main)
            if isinstance(doc, dict) and kind.accept(folder, doc):
                return Item(kind, folder, label, doc, marker_of(folder))
    return None


def _search(folder: Path, label: str, depth: int, found: list) -> None:
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        if child.name.startswith(".") or child.name in SKIP_DIRS:
            continue
        sub = f"{label.rstrip('/')}/{child.name}"
        if marker_of(child).get("kind") == REPORT_KIND:
            continue
        item = detect(child, sub)
        if item is not None:
            found.append(item)
        elif depth < MAX_DEPTH:
            _search(child, sub, depth + 1, found)


def find(paths, labels=None) -> list[Item]:
    """Items of every folder given (in order; a folder of no known kind: the known folders below it, by name).
    A missing folder, a file, or a folder with nothing we know is a one-line error naming it."""
    from .kinds import KINDS

    items = []
    for i, p in enumerate(paths):
        folder = Path(p).expanduser()
        label = labels[i] if labels else str(p)
        if not folder.exists():
            raise UserError(f"RUN_DIR {p}: no such folder")
        if not folder.is_dir():
            raise UserError(f"RUN_DIR {p}: is a file; give the folder a command wrote (e.g. the --out of unlearn, "
                            "eval, attack, sweep, analyze or demo)")
        if marker_of(folder).get("kind") == REPORT_KIND:
            raise UserError(f"RUN_DIR {p}: is a report, not a run; give the folders it was made from")
        item = detect(folder, label)
        if item is not None:
            items.append(item)
            continue
        found: list = []
        _search(folder, label, 1, found)
        if not found:
            known = ", ".join(sorted({k.signature for k in KINDS}))
            raise UserError(f"RUN_DIR {p}: holds no unlearnkit run, evaluation, attack, analysis, sweep or demo "
                            f"(looked for {known}, also in its subfolders)")
        items += found
    seen = set()
    for item in items:
        key = item.path.resolve()
        if key in seen:
            raise UserError(f"RUN_DIR {item.label}: given twice")
        seen.add(key)
    if not labels:
        short_labels(items)
    return items


def common_folder(items: list[Item]) -> Path | None:
    """The folder every item is in (None for a single item: it is named by its own name)."""
    if len(items) < 2:
        return None
    paths = [i.path.resolve() for i in items]
    base = Path(os.path.commonpath(paths))
    return base.parent if base in paths else base


def short_labels(items: list[Item]) -> None:
    """Name each item by its path below the folder they all share (the report says which), so names stay short
    in legends and tables."""
    base = common_folder(items)
    for item in items:
        item.label = item.path.name if base is None else str(item.path.resolve().relative_to(base))
