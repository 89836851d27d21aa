"""Output folders and atomic writes: the one place that decides what unlearnkit may write, replace or delete.

Rules (every command that writes a folder follows them):
- An output folder must be new, empty, or a folder this kind of command wrote before. Ours = it holds our marker
  file (MARKER, naming the kind of command) and nothing but the names the marker lists or the kind's work names
  (e.g. an unlearn run's checkpoint/). Anything else — a user's folder, the current directory, a folder of another
  command — is refused with a one-line error (exit 2) before any work starts.
- An output folder is never equal to, inside, or around an input (a model folder, a data file), nor the current
  folder or one of its parents.
- An output file (e.g. `bench --json`) is never a folder, and replaces only a JSON file of ours (holding a key the
  caller names, e.g. "bench").
- Files appear whole or not at all: written to a temporary name in the same folder, then renamed.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable

from .errors import UserError

MARKER = ".unlearnkit.json"  # {"kind", "files": [top-level names written], "written": time, "versions", and from
# the CLI "command" and "seconds" (provenance.py)}
# Names a command may leave in its folder while it works (besides what its marker lists): the resume checkpoint and
# the live TensorBoard events (train/live_log.py), which the published folder then carries.
WORK_NAMES = {"unlearn": {"checkpoint", "tb"}, "prepare": {"checkpoint", "tb"}}
# Folders written before the marker existed: (signature file, every name such a folder may hold).
LEGACY = {"demo": ("summary.json", {"summary.json", "summary.txt", "eval", "unlearned"}),
          "eco fit": ("eco.json", {"eco.json", "classifier.json", "metrics.json", "search.json"})}


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def _is_within(a: Path, b: Path) -> bool:
    """a == b or a is inside b (both resolved)."""
    return a == b or b in a.parents


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_out_dir(path, kind: str, *, inputs: Iterable = (), option: str = "--out") -> Path:
    """Validate an output folder for a command of `kind` before any work starts; creates nothing.

    Refuses (UserError): a path that is a file; a non-empty folder that is not ours (see module docstring); a folder
    equal to, inside or containing one of `inputs` (model folders, data files); a place we cannot write.
    Returns the path (absolute)."""
    out = Path(path).expanduser()
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, resolved):
        # Replacing it would pull the current folder (and whatever the user keeps there) from under them.
        where = "is" if cwd == resolved else "contains"
        raise UserError(f"{option} {path}: {where} the current folder; give a separate output folder")
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).expanduser().resolve()
        if _is_within(resolved, src) or _is_within(src, resolved):
            where = "is" if resolved == src else "is inside" if _is_within(resolved, src) else "contains"
            raise UserError(f"{option} {path}: {where} the input {inp}; choose a separate output folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {path}: exists and is not a folder")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            marker = _read_marker(out)
            legacy = LEGACY.get(kind)
            if marker is None and legacy and legacy[0] in entries and set(entries) <= legacy[1]:
                marker = {"kind": kind, "files": entries}
            if marker is None:
                raise UserError(f"{option} {path}: folder is not empty and was not written by unlearnkit "
                                f"(holds {entries[0]!r}); give a new or empty folder")
            if marker["kind"] != kind:
                raise UserError(f"{option} {path}: folder holds the output of `{marker['kind']}`, not `{kind}`; "
                                "give a new or empty folder")
            allowed = set(marker.get("files") or ()) | WORK_NAMES.get(kind, set()) | {MARKER}
            foreign = [e for e in entries if e not in allowed and not e.startswith(".unlearnkit-tmp-")]
            if foreign:
                raise UserError(f"{option} {path}: folder holds {foreign[0]!r}, which unlearnkit did not write; "
                                "move it away or give a new folder")
    _check_writable(out, option, path)
    return out


def _check_writable(out: Path, option: str, shown) -> None:
    base = _nearest_existing(out.absolute())
    if not base.is_dir():
        raise UserError(f"{option} {shown}: {base} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(dir=base, prefix=".unlearnkit-tmp-probe-")
        os.rmdir(probe)
    except OSError as e:
        raise UserError(f"{option} {shown}: cannot write in {base} ({e.strerror or e})") from e


def claim_out_dir(path, kind: str, files: Iterable[str] = ()) -> Path:
    """Create the folder (if needed) and write our marker; call after `check_out_dir`, when work starts."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    marker = _read_marker(out) or {}
    names = sorted(set(marker.get("files") or ()) | set(files)) if marker.get("kind") == kind else sorted(set(files))
    write_text_atomic(out / MARKER, json.dumps({"kind": kind, "files": names, "written": time.time()}))
    return out


def publish_dir(tmp, out, kind: str) -> Path:
    """Move a fully written temporary folder `tmp` to `out` (replacing a previous folder of ours), with our marker.

    The caller must have called `check_out_dir(out, kind)`; it is re-checked here, so a folder that changed in
    between is never deleted."""
    tmp, out = Path(tmp), Path(out)
    if out.is_symlink():
        out = out.resolve()  # replace the folder it points to, never move the user's link away
    files = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
    from .provenance import record  # command, versions, wall time: what `unlearnkit report` shows per run

    write_text_atomic(tmp / MARKER, json.dumps({"kind": kind, "files": files, "written": time.time(), **record()}))
    if out.exists():
        check_out_dir(out, kind)
        # A fresh name (not one derived from the pid): a leftover from a killed run must not block the rename.
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".unlearnkit-tmp-old-{out.name}-"))
        old.rmdir()
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    return out


def write_folder(out, kind: str, write) -> Path:
    """Run `write(tmp)` into a fresh temporary folder beside `out`, then publish it whole as `out`; on failure
    nothing is left behind. The caller has checked `out` with `check_out_dir(out, kind)` before any work."""
    tmp = temp_dir_beside(out)
    try:
        write(tmp)
        return publish_dir(tmp, out, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def temp_dir_beside(out) -> Path:
    """A fresh temporary folder next to `out` (same filesystem, so `publish_dir` is a rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".unlearnkit-tmp-{out.name}-"))


def _finite_json(obj):
    """JSON has no NaN/Infinity: non-finite floats become null (summaries say why)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def write_text_atomic(path, text: str) -> Path:
    """Write a text file whole or not at all (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".unlearnkit-tmp-{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path, obj, indent: int | None = 1) -> Path:
    """JSON file written atomically; non-finite numbers become null."""
    return write_text_atomic(path, json.dumps(_finite_json(obj), indent=indent, allow_nan=False, default=str))


def check_out_file(path, *, option: str = "--json", key: str | None = None) -> Path:
    """An output file: not a folder, in a writable place; an existing file is replaced only if it is a JSON
    object we wrote (it holds `key`)."""
    out = Path(path).expanduser()
    if out.is_dir() or str(path).endswith(("/", os.sep)):
        raise UserError(f"{option} {path}: is a folder; give a file path")
    if out.exists():
        try:
            old = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = None
        if not isinstance(old, dict) or (key is not None and key not in old):
            raise UserError(f"{option} {path}: file exists and was not written by unlearnkit; refusing to "
                            "overwrite it")
    _check_writable(out.parent, option, path)  # the file is written beside itself, then renamed
    return out
