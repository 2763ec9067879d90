"""`muse serve` end to end on loopback: the official openai client, concurrency, errors, disconnects, load."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import uvicorn

from muse_lm.errors import ConfigError
from muse_lm.serving import Engine, ServeLimits, create_app
from muse_lm.serving.cli import add_serve_parser, bind_socket

LIMITS = ServeLimits(max_batch_size=16, max_queue=64, max_prompt_tokens=64, max_tokens_cap=1000)
PROMPT = "def f1(x):"


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a thread (no signal handlers off the main thread)."""

    def __init__(self, app):
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the server did not shut down"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    engine = Engine(tiny_checkpoint.model, tiny_checkpoint.tokenizer, eos_token_id=tiny_checkpoint.eos, limits=LIMITS)
    with ServerThread(create_app(engine, model_name="tiny")) as server:
        server.engine = engine
        yield server
    assert not engine._thread.is_alive()


def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def stats(server: ServerThread) -> dict:
    with urllib.request.urlopen(f"{server.url}/stats", timeout=30) as response:
        return json.load(response)


def post(server: ServerThread, path: str, body: bytes, method: str = "POST") -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.url}{path}", data=body, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.02)


def test_completion_matches_generate_and_streams_the_same_text(served, tiny_checkpoint):
    tiny = tiny_checkpoint
    ids = tiny.tokenizer.encode(PROMPT, add_special_tokens=False).ids
    expected = tiny.model.generate(torch.tensor([ids]), 10, temperature=0.0)[0, len(ids):].tolist()
    c = client(served)
    out = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0,
                               extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == "tiny" and out.id.startswith("cmpl-")
    assert out.choices[0].text == tiny.tokenizer.decode(expected)
    assert out.choices[0].finish_reason == "length"
    usage = out.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(ids), 10, len(ids) + 10)
    chunks = list(c.completions.create(model="tiny", prompt=[PROMPT], max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == out.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and len({ch.id for ch in chunks}) == 1
    assert [m.id for m in c.models.list()] == ["tiny"]


def test_concurrent_clients_are_batched_together(served):
    def one(seed: int) -> str:
        return client(served).completions.create(model="tiny", prompt=PROMPT, max_tokens=48, seed=seed,
                                                 temperature=1.0, extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(one, range(4)))
    assert all(texts)
    assert stats(served)["max_batch_size"] > 1


def test_bad_requests_get_openai_errors(served):
    c = client(served)
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="tiny", prompt=PROMPT, n=2)
    assert err.value.status_code == 400 and err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError, match="max_tokens=1001 is more than this server's limit of 1000"):
        c.completions.create(model="tiny", prompt=PROMPT, max_tokens=1001)
    with pytest.raises(openai.NotFoundError, match="'tiny'"):
        c.completions.create(model="gpt-4", prompt=PROMPT)
    cases = [(b"{not json", 400, None), (json.dumps({"model": "tiny", "prompt": "x" * 500}).encode(), 400, "prompt"),
             (json.dumps({"model": "tiny", "prompt": 3}).encode(), 400, "prompt"),
             (json.dumps({"model": "tiny", "prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
             (json.dumps({"model": "tiny", "prompt": "x", "echo": True}).encode(), 400, "echo"),
             (json.dumps({"model": "tiny", "prompt": "x", "bogus": 1}).encode(), 400, "bogus")]
    for body, status, param in cases:
        code, payload = post(served, "/completions", body)
        assert code == status and set(payload["error"]) == {"message", "type", "param", "code"}, payload
        assert payload["error"]["param"] == param and payload["error"]["message"]
    code, payload = post(served, "/nowhere", b"{}")
    assert code == 404 and "error" in payload


def test_client_that_disconnects_mid_stream_frees_its_slot(served):
    before = stats(served)
    stream = client(served).completions.create(model="tiny", prompt=PROMPT, max_tokens=1000, stream=True,
                                               extra_body={"ignore_eos": True})
    chunks = iter(stream)
    pieces = [next(chunks).choices[0].text for _ in range(3)]
    assert len(pieces) == 3
    stream.close()
    wait_until(lambda: stats(served)["requests_cancelled"] == before["requests_cancelled"] + 1)
    after = stats(served)
    assert after["active"] == 0 and after["requests_served"] == before["requests_served"]
    assert after["tokens_generated"] - before["tokens_generated"] < 1000
    out = client(served).completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
    assert out.choices[0].finish_reason in ("length", "stop")


def test_client_that_gives_up_on_a_whole_completion_frees_its_slot(served):
    before = stats(served)
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    wait_until(lambda: stats(served)["active"] == 1)
    conn.close()
    wait_until(lambda: stats(served)["requests_cancelled"] == before["requests_cancelled"] + 1)
    assert stats(served)["active"] == 0 and stats(served)["requests_served"] == before["requests_served"]


def test_bounded_load_no_request_is_lost(served):
    """16 concurrent clients x 4 requests, half streamed: every answer is well formed and counted."""
    served_before = stats(served)["requests_served"]
    rng = random.Random(0)
    jobs = [(i, rng.randint(1, 12), i % 2 == 0) for i in range(64)]

    def run(job) -> tuple[int, str, str]:
        i, max_tokens, stream = job
        c = client(served)
        kwargs = dict(model="tiny", prompt=f"def f{i}(x):", max_tokens=max_tokens, temperature=0.8, seed=i)
        if not stream:
            out = c.completions.create(**kwargs)
            assert out.usage.completion_tokens <= max_tokens
            return i, out.choices[0].text, out.choices[0].finish_reason
        chunks = list(c.completions.create(**kwargs, stream=True))
        assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])
        return i, "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:  # client k sends jobs k, k + 16, ... one after another
        results = [r for rs in pool.map(lambda k: [run(job) for job in jobs[k::16]], range(16)) for r in rs]
    assert sorted(i for i, _, _ in results) == list(range(64))
    assert all(isinstance(text, str) and reason in ("stop", "length") for _, text, reason in results)
    final = stats(served)
    assert final["requests_served"] - served_before == 64
    assert final["active"] == final["queued"] == 0


def _chunked(body: bytes, size: int = 1 << 16):
    return iter([body[i:i + size] for i in range(0, len(body), size)])


def test_oversized_body_gets_413_before_parsing_and_the_server_keeps_serving(served):
    limit = LIMITS.max_request_bytes
    assert limit == 1 << 20  # the default
    before = stats(served)
    with pytest.raises(openai.APIStatusError, match="limit of 1048576 bytes") as err:
        client(served).completions.create(model="tiny", prompt="x" * limit, max_tokens=1)
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"
    small = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 2}).encode()
    exact = small[:-1] + b" " * (limit - len(small)) + b"}"  # padded with whitespace: still valid JSON
    assert len(exact) == limit
    # With Content-Length (refused before reading) and chunked (refused while reading), on one
    # keep-alive connection: the unread rest of a refused body must not break the next request.
    cases = [(exact, False, 200), (exact + b" ", False, 413), (exact, True, 200), (exact + b" " * limit, True, 413),
             (small, False, 200)]
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    try:
        for body, chunked, status in cases:
            conn.request("POST", "/v1/completions", body=_chunked(body) if chunked else body,
                         headers={"Content-Type": "application/json"}, encode_chunked=chunked)
            response = conn.getresponse()
            payload = json.load(response)
            assert response.status == status, payload
            if status == 413:
                error = payload["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["code"] == "request_too_large"
                assert "--max-request-bytes" in error["message"]
                # Content-Length: refused from the header, which gives the size; chunked: while reading.
                assert (f"is {len(body)} bytes" if not chunked else "is more than") in error["message"]
            else:
                assert payload["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        conn.close()
    assert stats(served)["requests_served"] - before["requests_served"] == 3


def test_max_request_bytes_is_validated():
    with pytest.raises(ConfigError, match="max_request_bytes=0"):
        ServeLimits(max_request_bytes=0)
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    assert parser.parse_args(["serve", "--checkpoint", "x"]).max_request_bytes == 1 << 20
    assert parser.parse_args(["serve", "--checkpoint", "x", "--max-request-bytes", "4096"]).max_request_bytes == 4096
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--checkpoint", "x", "--max-request-bytes", "0"])


def test_a_full_queue_answers_429(tiny_checkpoint):
    limits = ServeLimits(max_batch_size=1, max_queue=1, max_tokens_cap=1000)
    engine = Engine(tiny_checkpoint.model, tiny_checkpoint.tokenizer, limits=limits)
    with ServerThread(create_app(engine, model_name="tiny")) as server:
        c = client(server)
        long = dict(model="tiny", prompt=PROMPT, max_tokens=1000, stream=True, extra_body={"ignore_eos": True})
        running = c.completions.create(**long)
        next(iter(running))  # it holds the only batch slot
        waiting = threading.Thread(target=lambda: c.completions.create(model="tiny", prompt=PROMPT, max_tokens=20),
                                   daemon=True)
        waiting.start()
        wait_until(lambda: stats(server)["queued"] == 1)
        with pytest.raises(openai.RateLimitError, match="max_queue=1") as err:
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=1)
        assert err.value.status_code == 429 and err.value.body["code"] == "queue_full"
        running.close()
        waiting.join(60)
        assert not waiting.is_alive()


def test_port_in_use_is_a_config_error():
    sock = bind_socket("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match="pick another --port"):
            bind_socket("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()


SERVE_SCRIPT = """
import argparse, sys
from muse_lm.serving.cli import add_serve_parser
parser = argparse.ArgumentParser()
add_serve_parser(parser.add_subparsers())
args = parser.parse_args(["serve", *sys.argv[1:]])
sys.exit(args.func(args))
"""


def test_muse_serve_answers_and_exits_cleanly_on_sigint(tiny_checkpoint, cli_env):
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()  # the server binds it again (SO_REUSEADDR)
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, "--checkpoint", str(tiny_checkpoint.path),
                             "--port", str(port), "--threads", "1", "--device", "cpu"],
                            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_until(lambda: _answers(url) or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, proc.communicate()[1]
        out = openai.OpenAI(base_url=url, api_key="unused", max_retries=0).completions.create(
            model="muse", prompt=PROMPT, max_tokens=4)
        assert out.choices[0].text is not None
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr
    assert "Application shutdown complete" in stderr


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/stats", timeout=5):
            return True
    except OSError:
        return False
