"""What produced an output folder: the command line, package versions and wall time, recorded in its marker
(files.publish_dir) so that `unlearnkit report` can show them for every kind of run.

The CLI calls `start(argv)` once per command; the Python API (no CLI) records no command and no wall time."""
from __future__ import annotations

import platform
import shlex
import time

_STATE: dict = {}
PACKAGES = ("torch", "transformers", "unlearnkit", "peft")


def start(argv: list[str]) -> None:
    """The command being run (as the user would retype it) and when it started."""
    _STATE.update(command="unlearnkit " + shlex.join(argv), t0=time.perf_counter())


def stop() -> None:
    _STATE.clear()


def versions() -> dict:
    """Python and package versions from the installed metadata (no heavy import: the report needs no torch)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass  # an odd install without metadata: versions are informative only
    return out


def record() -> dict:
    """{"command", "seconds" (since start), "versions"}; command and seconds only when run from the CLI."""
    out = {"versions": versions()}
    if "command" in _STATE:
        out.update(command=_STATE["command"], seconds=time.perf_counter() - _STATE["t0"])
    return out
