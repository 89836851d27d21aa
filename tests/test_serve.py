"""The OpenAI-compatible server, started for real on 127.0.0.1 and called with httpx and the openai client."""
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from unlearnkit.eco.corrupt import CorruptionConfig
from unlearnkit.eco.guard import EcoGuard
from unlearnkit.serve import BackgroundServer, Generator, create_app

NAME = "tiny"


class KeywordClassifier:
    tau = 0.5

    def flags(self, prompts):
        return ["zorblax" in p.lower() for p in prompts]


@pytest.fixture(scope="module")
def server(make_tiny_model, tokenizer):
    model = make_tiny_model()
    guard = EcoGuard(model, tokenizer, KeywordClassifier(), CorruptionConfig(sigma=5.0), mode="all")
    gen = Generator(model, tokenizer, guard, NAME, max_tokens_limit=32, max_context=96)
    with BackgroundServer(create_app(gen, max_queue=64)) as srv:
        srv.gen = gen
        yield srv


def _chat(content, **extra):
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def test_models_health_and_chat(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/health").json()["status"] == "ok"
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [NAME]
        r = c.post("/v1/chat/completions", json=_chat("Who is Zorblax?"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["model"] == NAME
        assert isinstance(body["choices"][0]["message"]["content"], str)
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] <= 4
        assert body["eco"] == {"guard": True, "flagged": True}
        assert c.post("/v1/chat/completions", json=_chat("What is 2+2?")).json()["eco"]["flagged"] is False
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "Once upon a time", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["object"] == "text_completion"


def test_guard_is_applied_to_flagged_prompts_only(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        def answer(text):
            return c.post("/v1/chat/completions", json=_chat(text, max_tokens=6)).json()["choices"][0]["message"]
        plain_prompt = "Tell me about the painter Quentin."
        assert answer(plain_prompt) == answer(plain_prompt)
    # Same prompts straight through the model: unflagged equals the unguarded model, flagged uses the guard.
    gen = server.gen
    ids, _ = gen.chat_prompt(_chat(plain_prompt))
    params = gen.sampling({"max_tokens": 6})
    flagged_prompt = "Tell me about the painter Zorblax."
    fids, _ = gen.chat_prompt(_chat(flagged_prompt))
    saved, gen.guard = gen.guard, None
    try:
        unguarded = gen.generate(ids, plain_prompt, params)[0]
        unguarded_flagged = gen.generate(fids, flagged_prompt, params)[0]
    finally:
        gen.guard = saved
    assert gen.generate(ids, plain_prompt, params)[0] == unguarded
    text, _, _, flagged = gen.generate(fids, flagged_prompt, params)
    assert flagged and text != unguarded_flagged


def test_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [NAME]
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert isinstance(out.choices[0].message.content, str)
    comp = client.completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0.7, seed=1)
    assert isinstance(comp.choices[0].text, str)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=10_000)


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), 400, "'model' is required"),
    (json.dumps(_chat("x") | {"model": "other"}), 404, "does not exist"),
    (json.dumps({"model": NAME}), 400, "'messages'"),
    (json.dumps({"model": NAME, "messages": [{"role": "robot", "content": "x"}]}), 400, "role"),
    (json.dumps({"model": NAME, "messages": [{"role": "user", "content": 3}]}), 400, "content"),
    (json.dumps(_chat("x", max_tokens=0)), 400, "max_tokens"),
    (json.dumps(_chat("x", max_tokens="5")), 400, "max_tokens"),
    (json.dumps(_chat("x", temperature=5)), 400, "temperature"),
    (json.dumps(_chat("x", top_p=0)), 400, "top_p"),
    (json.dumps(_chat("x", n=2)), 400, "'n'"),
    (json.dumps(_chat("x", stream=True)), 400, "stream"),
    (json.dumps(_chat("x", stop=[1])), 400, "stop"),
    (json.dumps(_chat("word " * 200)), 400, "context length"),
])
def test_bad_requests_get_4xx_with_message(server, body, status, needle):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_bad_completion_prompt_and_huge_body(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": [1, 2, 3]}, timeout=60)
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "word " * 200}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (5 << 20), timeout=60)
    assert r.status_code == 413
    assert httpx.get(server.url + "/health", timeout=60).json()["status"] == "ok"


def _payload(r):
    """What must not depend on other requests: the answer, why it ended, token counts, the guard's verdict."""
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    return (choice.get("message", {}).get("content", choice.get("text")), choice["finish_reason"], body["usage"],
            body["eco"])


def test_concurrent_replies_equal_the_same_request_served_alone(server):
    # Mixed requests: flagged and unflagged chat, completions, different lengths and stop strings (greedy).
    requests = []
    for i in range(24):
        if i % 3 == 2:
            requests.append(("/v1/completions", {"model": NAME, "prompt": f"Story {i} about Zorblax" * (1 + i % 2),
                                                 "max_tokens": 3 + i % 5}))
        else:
            text = f"Question {i} about Zorblax?" if i % 2 else f"Question {i} about the weather?"
            requests.append(("/v1/chat/completions", _chat(text, max_tokens=2 + i % 6,
                                                           **({"stop": ["e"]} if i % 4 == 0 else {}))))
    with httpx.Client(base_url=server.url, timeout=120) as c:
        alone = [_payload(c.post(path, json=body)) for path, body in requests]
        assert {p[3]["flagged"] for p in alone} == {True, False}
        served_before = c.get("/health").json()["served"]
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(lambda pb: _payload(c.post(pb[0], json=pb[1])), requests))
        assert together == alone
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["served"] == served_before + 24 and health["queued"] == 0


def test_generation_failure_is_500_and_server_survives(make_tiny_model, tokenizer):
    gen = Generator(make_tiny_model(), tokenizer, None, NAME, max_tokens_limit=8)
    started, release = threading.Event(), threading.Event()
    real = gen.generate

    def slow(*a):
        started.set()
        release.wait(30)
        return real(*a)

    with BackgroundServer(create_app(gen, max_queue=1)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        gen.generate = lambda *a: 1 / 0
        r = c.post("/v1/chat/completions", json=_chat("x"))
        assert r.status_code == 500 and "ZeroDivisionError" in r.json()["error"]["message"]
        gen.generate = slow  # first request holds the worker; the queue (max 1) is then full → 503
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/v1/chat/completions", json=_chat("x"))
            assert started.wait(30)
            busy = c.post("/v1/chat/completions", json=_chat("y"))
            release.set()
            assert first.result().status_code == 200
        assert busy.status_code == 503 and "busy" in busy.json()["error"]["message"]
        assert c.get("/health").json()["errors"] == 1


def test_serve_cli_subprocess(tiny_model_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "unlearnkit.cli", "serve", "--model", str(tiny_model_dir),
                             "--port", str(port), "--max-tokens-limit", "8"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "Hi"}]}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("argv, needle", [
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--model", "/nonexistent/model/dir"], "--model"),
    (["serve", "--eco", "/nonexistent/eco"], "--eco"),
    (["eco", "generate", "--eco", "/nonexistent/eco", "hi"], "--eco"),
    (["eco", "fit", "--out", "/tmp/x-eco-unused", "--target-fpr", "1.5"], "--target-fpr"),
    (["eco", "fit", "--out", "/tmp/x-eco-unused", "--forget", "/nonexistent.json", "--search", "none",
      "--sigma", "1"], "no such file"),
])
def test_cli_bad_input_one_line_exit_2(argv, needle, capsys):
    from unlearnkit.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


# -- every error in OpenAI's shape, with a 4xx for bad input --------------------------------------------------------

def _assert_openai_error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "\n" not in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("body, needle", [
    (json.dumps(_chat("x", seed=2 ** 70, temperature=0.7)), "seed"),
    (json.dumps(_chat("x", seed=2 ** 70)), "seed"),
    (json.dumps(_chat("x", seed=-(2 ** 64))), "seed"),
    ("[" * 100_000 + "]" * 100_000, "nests deeper"),
    (json.dumps(_chat("x", user=json.loads("[" * 40 + "]" * 40))), "nests deeper"),
    ('{"model": "tiny", "max_tokens": ' + "9" * 5000 + "}", "not valid JSON"),
    (json.dumps(_chat("x")).replace('"x"', '"a\\ud800b"'), "surrogate"),
    (b"\xff\xfe{", "not valid JSON"),
])
def test_hostile_bodies_get_openai_shaped_4xx(server, body, needle):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60,
                   headers={"content-type": "application/json"})
    assert needle in _assert_openai_error(r, 400)["message"]
    assert httpx.get(server.url + "/health", timeout=60).json()["status"] == "ok"


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/nope", 404),
    ("POST", "/", 404),
    ("GET", "/v1/chat/completions", 405),
    ("PUT", "/v1/completions", 405),
    ("POST", "/v1/models", 405),
    ("DELETE", "/health", 405),
])
def test_unknown_routes_and_methods_get_openai_shape(server, method, path, status):
    r = httpx.request(method, server.url + path, timeout=60)
    error = _assert_openai_error(r, status)
    assert path in error["message"]
    if status == 405:
        assert r.headers.get("allow")


def test_body_limit_enforced_while_reading(server):
    """A huge chunked body (no Content-Length) is refused after the limit, not buffered whole first."""
    from unlearnkit.serve.app import MAX_BODY_BYTES

    taken = [0]
    app = create_app(server.gen)

    async def counting_app(scope, receive, send):  # counts the body bytes the app pulls from the server
        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                taken[0] += len(message.get("body", b""))
            return message
        await app(scope, counted, send)

    def chunks():
        for _ in range(64):
            yield b" " * (1 << 20)

    with BackgroundServer(counting_app) as srv:
        r = httpx.post(srv.url + "/v1/completions", content=chunks(), timeout=120)
        assert "larger than" in _assert_openai_error(r, 413)["message"]
        assert MAX_BODY_BYTES < taken[0] <= MAX_BODY_BYTES + (1 << 20), taken[0]
        assert httpx.get(srv.url + "/health", timeout=60).json()["status"] == "ok"


# -- abandoned requests ------------------------------------------------------------------------------------------

def _open_request(url, body: dict):
    """Send a chat request on a raw socket and leave it open (the caller hangs up by closing it)."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    raw = json.dumps(body).encode()
    sock = socket.create_connection((u.hostname, u.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return sock


def _wait_health(c, cond, what):
    deadline = time.monotonic() + 60  # a safety net only: each wait ends as soon as the server reports the state
    while not cond(h := c.get("/health").json()):
        assert time.monotonic() < deadline, f"server never reached: {what} ({h})"
        time.sleep(0.05)
    return h


def test_queued_request_of_a_client_that_hung_up_is_skipped(make_tiny_model, tokenizer):
    gen = Generator(make_tiny_model(), tokenizer, None, NAME, max_tokens_limit=8)
    started, release, calls = threading.Event(), threading.Event(), []
    real = gen.generate

    def spy(ids, text, params, *rest):
        calls.append(text)
        if text == "first":
            started.set()
            release.wait(60)
        return real(ids, text, params, *rest)

    gen.generate = spy
    with BackgroundServer(create_app(gen)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/v1/chat/completions", json=_chat("first"))
            assert started.wait(60)
            sock = _open_request(srv.url, _chat("abandoned"))
            _wait_health(c, lambda h: h["queued"] == 2, "second request queued")
            sock.close()  # the client hangs up while its request waits
            h = _wait_health(c, lambda h: h["queued"] == 1, "abandoned request dropped from the queue")
            assert h.get("cancelled") == 1
            release.set()
            assert first.result().status_code == 200
        assert c.post("/v1/chat/completions", json=_chat("third")).status_code == 200
        assert calls == ["first", "third"]  # the abandoned request never reached the model
        assert c.get("/health").json()["served"] == 2


def test_running_generation_stops_when_its_client_hangs_up(make_tiny_model, tokenizer):
    model = make_tiny_model()
    gen = Generator(model, tokenizer, None, NAME, max_tokens_limit=32)
    ids, _ = gen.chat_prompt(_chat("Tell me a long story."))
    params = gen.sampling({"max_tokens": 32})
    assert gen.generate(ids, "x", params)[2] == 32  # unstopped, this prompt runs to the limit
    cancels, results, reached = [], [], threading.Event()
    real = gen.generate

    def spy(ids, text, params, cancel=None):
        cancels.append(cancel)
        results.append(real(ids, text, params, cancel))
        return results[-1]

    calls = [0]

    def hold_at_third_step(module, inputs, output):
        calls[0] += 1
        if calls[0] == 3:  # prefill + 2 decoding steps done: now the client hangs up
            reached.set()
            assert cancels[-1] is not None and cancels[-1].wait(60), "disconnect never reached the generation"

    gen.generate = spy
    handle = model.get_input_embeddings().register_forward_hook(hold_at_third_step)
    try:
        with BackgroundServer(create_app(gen)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            sock = _open_request(srv.url, _chat("Tell me a long story.", max_tokens=32))
            assert reached.wait(60)
            sock.close()
            h = _wait_health(c, lambda h: h["queued"] == 0, "generation finished")
            assert h.get("cancelled") == 1 and h["served"] == 0
            assert 2 <= results[-1][2] < 32  # stopped a step after the hang-up, not run to max_tokens
            r = c.post("/v1/chat/completions", json=_chat("Tell me a long story.", max_tokens=32))
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 32  # next client unaffected
    finally:
        handle.remove()


# -- the guarded server renders prompts in the artifact's format ----------------------------------------------------

def test_guarded_server_feeds_the_prompt_format_sigma_was_fitted_with(server, tokenizer):
    from unlearnkit.data.format import encode_prompt

    fed = []
    handle = server.gen.model.get_input_embeddings().register_forward_hook(
        lambda m, i, o: fed.append(i[0][0].tolist()) if i[0].shape[1] > 1 else None)  # prefill only
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for q in ("Who is Zorblax Quentin?", "What is 2+2?"):
                fed.clear()
                assert c.post("/v1/chat/completions", json=_chat(q, max_tokens=2)).status_code == 200
                assert fed == [encode_prompt(tokenizer, q, server.gen.guard.fmt)]
                assert "You are a helpful" not in tokenizer.decode(fed[0])
    finally:
        handle.remove()


def test_guarded_chat_rendering_per_prompt_format(make_tiny_model, tokenizer):
    from unlearnkit.data.format import PromptFormat, encode_prompt, prompt_text

    model = make_tiny_model()
    q = "Who is Zorblax Quentin?"
    for fmt in (PromptFormat(), PromptFormat("chat", "Answer briefly."), PromptFormat("plain")):
        guard = EcoGuard(model, tokenizer, KeywordClassifier(), CorruptionConfig(sigma=5.0), mode="all", fmt=fmt)
        gen = Generator(model, tokenizer, guard, NAME)
        assert gen.chat_prompt(_chat(q))[0] == encode_prompt(tokenizer, q, fmt)
    guard = EcoGuard(model, tokenizer, KeywordClassifier(), CorruptionConfig(sigma=5.0), mode="all")
    gen = Generator(model, tokenizer, guard, NAME)
    # A request's own system message counts.
    own = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": q}]
    text = tokenizer.apply_chat_template(own, tokenize=False, add_generation_prompt=True)
    assert gen.chat_prompt({"messages": own})[0] == tokenizer(text)["input_ids"]
    # A conversation without one gets no default system prompt either.
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": q}]
    ids, classify_text = gen.chat_prompt({"messages": turns})
    rendered = tokenizer.decode(ids)
    assert "You are a helpful" not in rendered and rendered.startswith("<|im_start|>user\nHi")
    assert rendered.endswith(prompt_text(tokenizer, q))
    assert classify_text == "Hi\n" + q
    # Without a guard the server keeps the model's own template (default system prompt included).
    plain = Generator(model, tokenizer, None, NAME)
    assert "You are a helpful" in tokenizer.decode(plain.chat_prompt(_chat(q))[0])
