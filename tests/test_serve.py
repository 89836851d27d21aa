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


def test_concurrent_requests_all_served(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        served_before = c.get("/health").json()["served"]
        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(lambda i: c.post("/v1/chat/completions", json=_chat(f"Question {i}?")).status_code,
                                  range(24)))
        assert codes == [200] * 24
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
