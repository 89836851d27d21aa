"""`unlearnkit-lm-eval` (= `python -m unlearnkit.eco.harness`): lm-evaluation-harness's own command line, with the
ECO model `unlearnkit-eco` registered (eco/lm_eval_adapter.py). lm_eval looks up `--model` names only among the
models imported before it parses its arguments, and it has no plug-in mechanism for models, so this is the one
step a plain `lm_eval` cannot do. Every lm_eval option works unchanged:

    unlearnkit-lm-eval --model unlearnkit-eco --model_args pretrained=DIR,eco=ARTIFACT --tasks wmdp_bio,mmlu
"""
from __future__ import annotations

import sys

from ..errors import UserError


def main(argv: list[str] | None = None) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("unlearnkit: error: lm_eval is not installed; pip install 'unlearnkit[lm-eval]'", file=sys.stderr)
        return 2
    from . import lm_eval_adapter  # noqa: F401 — registers unlearnkit-eco

    saved = sys.argv
    sys.argv = ["unlearnkit-lm-eval", *(saved[1:] if argv is None else argv)]  # lm_eval parses sys.argv itself
    try:
        cli_evaluate()
    except UserError as e:
        print(f"unlearnkit: error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
