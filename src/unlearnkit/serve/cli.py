"""`unlearnkit serve`: run the OpenAI-compatible server."""
from __future__ import annotations

import sys

from ..cli_common import add_model_args


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, "
                                     "/v1/models, /health), optionally behind an ECO guard")
    add_model_args(p)
    p.add_argument("--eco", default=None, help="ECO artifact folder (from `unlearnkit eco fit`)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-name", default=None, help="model id clients must send (default: model folder name)")
    p.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this get 503")
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from ..cli_common import check_model_args
    from ..errors import UserError
    from . import build_app

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port: must be in [0, 65535], got {args.port}")
    for name in ("max_tokens_limit", "max_queue"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    check_model_args(args)
    app, gen = build_app(args.model, args.eco, model_name=args.served_name, dtype=args.dtype, device=args.device,
                         max_tokens_limit=args.max_tokens_limit, max_queue=args.max_queue,
                         trust_remote_code=args.trust_remote_code)
    print(f"[serve] model {gen.model_name!r}{' with ECO guard' if gen.guard else ''} on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
