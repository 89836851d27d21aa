"""Per-subject results of an unfinished attack run, kept beside its output folder.

Attacking eight subjects takes hours on a CPU; a run that dies (or is stopped) after five of them should not redo
those five. Each finished subject is written to `.<out name>.partial/` beside OUT, with the settings and a stamp of
its inputs (files' sizes and modification times), and a later run with the same settings reuses them. A run with
different settings refuses, naming what changed, instead of mixing results; a subject whose inputs changed is
attacked again. The folder is removed once OUT is published."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..errors import UserError
from ..files import write_text_atomic
from ..train.loop import fingerprint_differences

SETTINGS_FILE = "settings.json"


def input_stamp(path) -> dict | None:
    """Size and mtime of each file in a folder (or of one file): enough to notice a retrained or edited input."""
    if path is None:
        return None
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.exists() else []
    return {str(f.relative_to(p) if p.is_dir() else f.name): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


class SubjectCache:
    """`get(name)` / `put(name, result)` per subject; `done()` removes the folder after OUT is published."""

    def __init__(self, out: Path, settings: dict):
        self.dir = out.parent / f".{out.name}.partial"
        self.settings = json.loads(json.dumps(settings, default=str))
        if self.dir.exists():
            try:
                saved = json.loads((self.dir / SETTINGS_FILE).read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"{self.dir}: unreadable partial results ({type(e).__name__}); remove the folder to "
                                "start over") from e
            diffs = fingerprint_differences(saved, self.settings)
            if diffs:
                raise UserError(f"{self.dir}: partial results of a different run ({'; '.join(diffs[:3])}); re-run "
                                "with the same arguments to continue it, or remove the folder to start over")

    def _file(self, name: str) -> Path:
        return self.dir / f"{hashlib.sha1(name.encode()).hexdigest()[:16]}.json"

    def get(self, name: str, ident: dict):
        """The subject's saved result, or None when absent or saved for other inputs (then it is redone)."""
        f = self._file(name)
        if not f.exists():
            return None
        try:
            entry = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{f}: unreadable partial result for {name!r}; remove it to redo that subject") from e
        same = entry.get("name") == name and entry.get("ident") == json.loads(json.dumps(ident, default=str))
        if not same:
            print(f"[attack] {name}: inputs changed since its partial result; attacking it again", flush=True)
        return entry["result"] if same else None

    def put(self, name: str, ident: dict, result) -> None:
        if not (self.dir / SETTINGS_FILE).exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.dir / SETTINGS_FILE, json.dumps(self.settings, indent=1))
        # Python's JSON keeps NaN (a model can score one); the published files turn it into null later.
        write_text_atomic(self._file(name), json.dumps({"name": name, "ident": ident, "result": result},
                                                       default=str))

    def done(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
