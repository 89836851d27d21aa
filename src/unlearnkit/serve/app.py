"""OpenAI-compatible HTTP server (FastAPI) for a model, optionally behind an ECO guard.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health.
Requests are validated by hand so every bad request gets a 4xx with a one-line message in OpenAI's error shape
({"error": {"message", "type", "param", "code"}}); so do unknown routes and wrong methods. Generation runs one
request at a time (a lock; the model is not thread-safe and a 2-core CPU gains nothing from interleaving); waiting
requests queue up to `max_queue`, beyond which the server answers 503 instead of piling up memory. A request whose
client hangs up is dropped: skipped while queued, stopped between decoding steps while generating. A failure inside
generation answers 500 and the server keeps serving.

With an ECO guard, chat prompts are rendered in the artifact's prompt format (the one its sigma was fitted with),
not with the template's default system prompt.
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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import StoppingCriteria, StoppingCriteriaList

MAX_STOP = 4
MAX_BODY_BYTES = 4 << 20  # a request body beyond this is refused (413) while it is read, before parsing
MAX_JSON_DEPTH = 32       # no valid request nests deeper; deeper input would only exhaust the parser's stack
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.manual_seed accepts
CLIENT_GONE = 499         # status recorded for a request dropped because its client hung up (nobody reads it)


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, status: int, param=None, code=None) -> dict:
    kind = "invalid_request_error" if status < 500 else ("server_busy" if status == 503 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status, headers=headers)


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object, or RequestError (400): malformed JSON, numbers Python refuses (ints of
    thousands of digits), nesting deeper than MAX_JSON_DEPTH, strings with unpaired surrogates (no tokenizer
    can encode them)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise RequestError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int too long to convert
        raise RequestError(400, f"request body is not valid JSON ({getattr(e, 'msg', None) or str(e)[:120]})") \
            from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    stack = [(body, 1)]
    while stack:  # iterative: the check itself must not recurse
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(400, "request body holds a string with an unpaired surrogate "
                                        f"({value[:40]!a})") from None
    return body


class CancelOnEvent(StoppingCriteria):
    """Stops generation at the next decoding step once `event` is set (the client hung up)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


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
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
            raise RequestError(400, f"'seed' must be an integer in [-2^63, 2^64 - 1], got {seed!r:.40}", "seed")
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
        try:
            if self.guard is not None:  # the guard's sigma was fitted on prompts in its own format
                ids = self.guard.encode_chat(clean)
            elif getattr(self.tokenizer, "chat_template", None):
                text = self.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:  # base model without a template: plain transcript
                text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in clean) + "Assistant:"
                ids = self.tokenizer(text)["input_ids"]
        except Exception as e:  # noqa: BLE001 — a template may refuse a conversation (e.g. roles must alternate)
            raise RequestError(400, f"messages: cannot be rendered with the chat template "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                               "messages") from None
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
    def generate(self, ids: list[int], classify_text: str, params: dict,
                 cancel: threading.Event | None = None) -> tuple[str, str, int, bool]:
        """Returns (text, finish_reason, completion_tokens, flagged). Setting `cancel` stops it after the current
        decoding step (the partial answer is returned)."""
        input_ids = torch.tensor([ids], device=self.device)
        attention = torch.ones_like(input_ids)
        kwargs = dict(max_new_tokens=params["max_tokens"], pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.tokenizer.eos_token_id)
        if cancel is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([CancelOnEvent(cancel)])
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


async def _watch_disconnect(request: Request, gone: asyncio.Event, cancel: threading.Event) -> None:
    """Sets both events when the client hangs up. Runs once the body has been read, so the only message left to
    receive is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            gone.set()
            return


async def _acquire_unless_gone(lock: asyncio.Lock, gone: asyncio.Event) -> bool:
    """Wait for the lock (FIFO) or the client's disconnect, whichever comes first. True: we hold the lock."""
    acquire = asyncio.ensure_future(lock.acquire())
    left = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({acquire, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
    if not acquire.done():
        acquire.cancel()  # asyncio.Lock hands the lock on to the next waiter if this one is cancelled
    try:
        await acquire
    except asyncio.CancelledError:
        return False
    if gone.is_set():  # got the lock just as the client left
        lock.release()
        return False
    return True


def create_app(generator: Generator, max_queue: int = 64, max_body_bytes: int = MAX_BODY_BYTES):
    app = FastAPI(title="unlearnkit", docs_url=None, redoc_url=None)
    lock = asyncio.Lock()
    state = {"waiting": 0, "served": 0, "errors": 0, "cancelled": 0}

    def err(e: RequestError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code)

    # Every error, including the framework's own (unknown route, wrong method), in OpenAI's shape.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"unknown route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                            str(exc.detail))
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        return error_response(400, f"invalid request: {first.get('msg', 'validation failed')}")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}")

    async def read_body(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise RequestError(400, f"invalid Content-Length header {length[:40]!r}")
            if int(length) > max_body_bytes:
                raise RequestError(413, f"request body larger than {max_body_bytes} bytes")
        # Read chunk by chunk and stop at the limit: a huge (chunked) body never sits in memory whole.
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise RequestError(413, f"request body larger than {max_body_bytes} bytes")
            chunks.append(chunk)
        return parse_body(b"".join(chunks))

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
        gone, cancel = asyncio.Event(), threading.Event()
        watcher = asyncio.ensure_future(_watch_disconnect(request, gone, cancel))
        try:
            if not await _acquire_unless_gone(lock, gone):  # one generation at a time, FIFO
                state["cancelled"] += 1
                return err(RequestError(CLIENT_GONE, "client disconnected while queued"))
            job = asyncio.ensure_future(run_in_threadpool(generator.generate, ids, classify_text, params, cancel))
            # The lock is free only when the model is: even if this handler is cancelled (shutdown), the thread
            # keeps running until the stopping criterion sees `cancel`.
            job.add_done_callback(lambda _: lock.release())
            try:
                text, finish, n_new, flagged = await asyncio.shield(job)
            except asyncio.CancelledError:
                cancel.set()
                raise
        except Exception as e:  # noqa: BLE001 — a failed generation must not take the server down
            state["errors"] += 1
            return err(RequestError(500, f"generation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        finally:
            watcher.cancel()
            state["waiting"] -= 1
        if cancel.is_set():
            state["cancelled"] += 1
            return err(RequestError(CLIENT_GONE, "client disconnected during generation"))
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
                "queued": state["waiting"], "served": state["served"], "errors": state["errors"],
                "cancelled": state["cancelled"]}

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
