"""Small helpers several test files share (importable because pytest puts tests/ on sys.path)."""
from __future__ import annotations

from unlearnkit.cli import main


def cli_error(args, capsys) -> str:
    """Run the CLI in-process; assert it failed with exit 2 and ONE line on stderr; return that line."""
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("unlearnkit: error:") and "\n" not in err, (code, err)
    return err
