"""OpenAI-compatible HTTP server (FastAPI) for a model, optionally behind an ECO guard.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health.
Requests are validated by hand so every bad request gets a 4xx with a one-line message in OpenAI's error shape
({"error": {"message", "type", "param", "code"}}). Generation runs one request at a time (a lock; the model is not
thread-safe and a 2-core CPU gains nothing from interleaving); waiting requests queue up to `max_queue`, beyond
which the server answers 503 instead of piling up memory. A failure inside generation answers 500 and the server
keeps serving.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid

import torch
from fastapi import FastAPI, Request  # module level: FastAPI resolves the (string) annotations here
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

MAX_STOP = 4
MAX_BODY_BYTES = 4 << 20  # a request body beyond this is refused (413) before parsing


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(message: str, status: int, param=None, code=None) -> dict:
    kind = "invalid_request_error" if status < 500 else ("server_busy" if status == 503 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _number(body: dict, name: str, default, lo, hi, integer=False, lo_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise RequestError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r:.40}", name)
    if value != value or value > hi or value < lo or (lo_open and value == lo):
        raise RequestError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}", name)
    return value


class Generator:
    """Holds model, tokenizer and guard; turns validated requests into text. Not thread-safe: callers serialise."""

    def __init__(self, model, tokenizer, guard=None, model_name: str = "unlearnkit", max_tokens_limit: int = 512,
                 max_context: int | None = None):
        self.model, self.tokenizer, self.guard, self.model_name = model, tokenizer, guard, model_name
        self.max_tokens_limit = max_tokens_limit
        ctx = max_context or getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_context = int(ctx)
        self.device = next(model.parameters()).device

    def sampling(self, body: dict) -> dict:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 64, 1, self.max_tokens_limit, integer=True)
        temperature = _number(body, "temperature", 0.0, 0.0, 2.0)  # greedy unless asked: reproducible answers
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
        n = _number(body, "n", 1, 1, 1, integer=True)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(400, f"'seed' must be an integer, got {seed!r:.40}", "seed")
        if body.get("stream"):
            raise RequestError(400, "'stream': streaming is not supported; send stream=false", "stream")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
        return {"max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p), "n": n,
                "seed": seed, "stop": stop}

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise RequestError(400, "'model' is required (a string); see GET /v1/models", "model")
        if name != self.model_name:
            raise RequestError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                               "model", "model_not_found")

    def chat_prompt(self, body: dict) -> tuple[list[int], str]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(400, f"messages[{i}]: 'role' must be system, user or assistant", "messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}] parts
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise RequestError(400, f"messages[{i}]: only text content parts are supported", "messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise RequestError(400, f"messages[{i}]: 'content' must be a string", "messages")
            clean.append({"role": m["role"], "content": content})
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:  # base model without a template: plain transcript
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in clean) + "Assistant:"
            ids = self.tokenizer(text)["input_ids"]
        # The classifier sees what the user asked (all user turns), not the template around it.
        user_text = "\n".join(m["content"] for m in clean if m["role"] == "user") or clean[-1]["content"]
        return ids, user_text

    def completion_prompt(self, body: dict) -> tuple[list[int], str]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "'prompt' must be a non-empty string (or a list of exactly one string)", "prompt")
        return self.tokenizer(prompt)["input_ids"], prompt

    def check_length(self, ids: list[int], max_tokens: int, param: str) -> None:
        if len(ids) + max_tokens > self.max_context:
            raise RequestError(400, f"prompt has {len(ids)} tokens; with max_tokens {max_tokens} that exceeds the "
                               f"context length {self.max_context}", param, "context_length_exceeded")

    @torch.no_grad()
    def generate(self, ids: list[int], classify_text: str, params: dict) -> tuple[str, str, int, bool]:
        """Returns (text, finish_reason, completion_tokens, flagged)."""
        input_ids = torch.tensor([ids], device=self.device)
        attention = torch.ones_like(input_ids)
        kwargs = dict(max_new_tokens=params["max_tokens"], pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.tokenizer.eos_token_id)
        if params["temperature"] > 0:
            kwargs.update(do_sample=True, temperature=params["temperature"], top_p=params["top_p"], top_k=None)
            if params["seed"] is not None:
                torch.manual_seed(params["seed"])
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        arm = (self.guard.arm(input_ids, attention.bool(), [classify_text]) if self.guard is not None
               else contextlib.nullcontext(None))
        with arm as state:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new = out[0, input_ids.shape[1]:].tolist()
        hit_eos = bool(new) and new[-1] == self.tokenizer.eos_token_id
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        finish = "stop" if hit_eos or len(new) < params["max_tokens"] else "length"
        for s in params["stop"]:
            if s in text:
                text, finish = text[:text.index(s)], "stop"
        return text, finish, len(new), bool(state.flags[0]) if state is not None else False


def create_app(generator: Generator, max_queue: int = 64):
    app = FastAPI(title="unlearnkit", docs_url=None, redoc_url=None)
    lock = asyncio.Lock()
    state = {"waiting": 0, "served": 0, "errors": 0}

    def err(e: RequestError) -> JSONResponse:
        return JSONResponse(_error_body(e.message, e.status, e.param, e.code), status_code=e.status)

    async def read_body(request: Request) -> dict:
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise RequestError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"request body is not valid JSON ({getattr(e, 'msg', e)})")
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        return body

    async def run(request: Request, kind: str):
        try:
            body = await read_body(request)
            generator.check_model(body)
            params = generator.sampling(body)
            ids, classify_text = (generator.chat_prompt(body) if kind == "chat" else generator.completion_prompt(body))
            generator.check_length(ids, params["max_tokens"], "messages" if kind == "chat" else "prompt")
        except RequestError as e:
            return err(e)
        if state["waiting"] >= max_queue:
            return err(RequestError(503, f"server busy: {state['waiting']} requests queued; retry later"))
        state["waiting"] += 1
        try:
            async with lock:  # one generation at a time; asyncio.Lock wakes waiters in FIFO order
                text, finish, n_new, flagged = await run_in_threadpool(generator.generate, ids, classify_text,
                                                                       params)
        except Exception as e:  # noqa: BLE001 — a failed generation must not take the server down
            state["errors"] += 1
            return err(RequestError(500, f"generation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        finally:
            state["waiting"] -= 1
        state["served"] += 1
        created = int(time.time())
        usage = {"prompt_tokens": len(ids), "completion_tokens": n_new, "total_tokens": len(ids) + n_new}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
            obj, prefix = "chat.completion", "chatcmpl"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj, prefix = "text_completion", "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": obj, "created": created,
                "model": generator.model_name, "choices": [choice], "usage": usage,
                "eco": {"guard": generator.guard is not None, "flagged": flagged}}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await run(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, "completion")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": generator.model_name, "object": "model", "created": 0,
                                            "owned_by": "unlearnkit"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": generator.model_name, "eco": generator.guard is not None,
                "queued": state["waiting"], "served": state["served"], "errors": state["errors"]}

    return app


class BackgroundServer:
    """uvicorn in a thread on 127.0.0.1 (for tests and `bench serve`): binds a free port itself, no race."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
