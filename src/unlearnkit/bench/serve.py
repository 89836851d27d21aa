"""`unlearnkit bench serve`: bounded load on the OpenAI-compatible server, from a client on 127.0.0.1.

Starts the server in-process on a free 127.0.0.1 port, sends exactly --requests chat requests with at most
--concurrency in flight, then checks /health. Reports throughput, p50/p95 latency and the error count.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np

from . import add_json_arg, emit


def add_command(bsub) -> None:
    p = bsub.add_parser("serve", help="load test of `unlearnkit serve` (bounded; 127.0.0.1 only)")
    p.add_argument("--model", default=None, help="model (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--eco", default=None, help="ECO artifact to serve behind (default: none)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is steadier on a shared, busy machine)")
    p.add_argument("--max-tokens", type=int, default=8)
    add_json_arg(p)
    p.set_defaults(func=run)


async def _load(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int):
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies, errors = [], []

    async def one(client, prompt):
        async with sem:
            t = time.perf_counter()
            try:
                r = await client.post("/v1/chat/completions", json={
                    "model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]})
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:100]}")
            except Exception as e:  # noqa: BLE001 — counted, not raised: the run must finish and report
                errors.append(f"{type(e).__name__}: {e}")
            latencies.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, p) for p in prompts))
        wall = time.perf_counter() - t0
        health = (await client.get("/health")).json()
    return latencies, errors, wall, health


def run(args) -> int:
    from ..data import tofu
    from ..errors import UserError
    from ..serve import BackgroundServer, build_app

    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        raise UserError("--requests, --concurrency and --max-tokens must be >= 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    app, gen = build_app(args.model, args.eco, max_queue=max(64, args.concurrency))
    task = tofu.task("mini")
    pool = [r["question"] for r in task.forget] + [r["question"] for r in task.world_facts]
    prompts = [pool[i % len(pool)] for i in range(args.requests)]
    with BackgroundServer(app) as srv:
        latencies, errors, wall, health = asyncio.run(_load(srv.url, gen.model_name, prompts, args.concurrency,
                                                            args.max_tokens))
    lat = np.array(latencies) * 1000
    for e in errors[:5]:
        print(f"[bench serve] error: {e}")
    emit({"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
          "eco": bool(args.eco), "seconds": wall, "throughput_rps": args.requests / wall,
          "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
          "errors": len(errors), "healthy_after": health.get("status") == "ok"}, args.json, bench="serve")
    return 0
