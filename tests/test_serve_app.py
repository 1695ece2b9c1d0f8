"""The HTTP server: OpenAI-style completions and chat completions over a tiny ONNX export."""

import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from paced import Paced
from tiny_models import export_tiny_model

from lmpipe.chat import render
from lmpipe.errors import LmpipeError
from lmpipe.export import ExportConfig
from lmpipe.inference.engine import OrtEngine
from lmpipe.inference.sampling import GenerationParams
from lmpipe.serve import ServeConfig, create_app

LIMITS = ServeConfig(max_tokens_limit=32, max_batch=3)
"""The server's limits in these tests: the tiny model's block_size is 64, so max_prompt_tokens is 63."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(export directory, engine) of a tiny random GPT (block_size 64), exported to ONNX once per module."""
    root = tmp_path_factory.mktemp("serve")
    export_tiny_model(root, root / "onnx", ExportConfig(parity_decode_steps=2), variant_name="tiny")
    return root / "onnx", OrtEngine(root / "onnx", threads=1)


@pytest.fixture(scope="module")
def engine(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, LIMITS)) as client:
        yield client


def greedy(engine, prompt: str, max_tokens: int, chat: bool = False, stop=()):
    params = GenerationParams(max_new_tokens=max_tokens, stop=list(stop))
    return engine.generate([prompt], params, chat=chat)[0]


def sse(response) -> list[dict]:
    """The JSON chunks of an OpenAI-style event stream, checking its framing and closing [DONE]."""
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    text = response.text
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")[:-2]  # the [DONE] event, then "" after the last separator
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    return [json.loads(e.removeprefix("data: ")) for e in events]


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    return error


def tokens(engine, text: str) -> int:
    return len(engine.encode_prompt(text, chat=False))


# --- config and model loading -----------------------------------------------------------------------------


def test_create_app_rejects_a_prompt_limit_beyond_the_context(engine):
    with pytest.raises(LmpipeError, match=r"max_prompt_tokens=64: expected at most block_size - 1 = 63"):
        create_app(engine, ServeConfig(max_prompt_tokens=64))


# --- endpoints ----------------------------------------------------------------------------------------------


def test_health_and_models(client):
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "model": "tiny",
        "block_size": 64,
        "max_prompt_tokens": 63,
        "max_tokens_limit": 32,
        "running": 0,
        "waiting": 0,
        "max_running": 16,
        "max_queue": 64,
    }
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    [entry] = models["data"]
    assert (entry["id"], entry["object"], entry["owned_by"]) == ("tiny", "model", "lmpipe")


def test_completion_is_the_engines_raw_greedy_completion(client, engine):
    expected = greedy(engine, "In the beginning", 12)
    body = {"model": "tiny", "prompt": "In the beginning", "max_tokens": 12, "temperature": 0}
    out = client.post("/v1/completions", json=body).json()
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion" and out["model"] == "tiny"
    assert isinstance(out["created"], int)
    assert out["choices"] == [
        {"index": 0, "text": expected.text, "logprobs": None, "finish_reason": expected.finish_reason}
    ]
    n = tokens(engine, "In the beginning")
    c = expected.completion_tokens
    assert out["usage"] == {"prompt_tokens": n, "completion_tokens": c, "total_tokens": n + c}
    assert len(expected.text) > 10


def test_a_list_of_prompts_gets_one_choice_each_in_order(client, engine):
    prompts = ["God", "And the earth was", "Israel came"]
    body = {"prompt": prompts, "max_tokens": 8, "temperature": 0}
    out = client.post("/v1/completions", json=body).json()
    expected = [greedy(engine, p, 8) for p in prompts]
    assert [(c["index"], c["text"]) for c in out["choices"]] == [(i, e.text) for i, e in enumerate(expected)]
    assert out["usage"]["completion_tokens"] == sum(e.completion_tokens for e in expected)
    assert out["usage"]["prompt_tokens"] == sum(tokens(engine, p) for p in prompts)


def test_chat_completion_renders_the_chat_template(client, engine):
    expected = greedy(engine, "Who created the earth?", 10, chat=True)
    body = {
        "messages": [{"role": "user", "content": "Who created the earth?"}],
        "max_tokens": 10,
        "temperature": 0,
    }
    out = client.post("/v1/chat/completions", json=body).json()
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    [choice] = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == expected.finish_reason
    assert out["usage"]["prompt_tokens"] == expected.prompt_tokens
    # A conversation: the whole history through the template, then the assistant's turn.
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Who?"},
        {"role": "assistant", "content": "God."},
        {"role": "user", "content": "Where?"},
    ]
    text = render(messages, add_generation_prompt=True, template=engine.template)
    assert text.endswith("<|user|>Where?<|end|><|assistant|>")
    out = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 10, "temperature": 0})
    assert out.json()["choices"][0]["message"]["content"] == greedy(engine, text, 10).text


@pytest.mark.parametrize("stop", [None, "late"])
def test_streamed_completion_deltas_add_up_to_the_completion(client, engine, stop):
    full = greedy(engine, "And the earth", 30)
    stops = [full.text[12:15]] if stop else []
    body = {"prompt": "And the earth", "max_tokens": 30, "temperature": 0, "stop": stops}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    chunks = sse(client.post("/v1/completions", json={**body, "stream": True}))
    assert len(chunks) > 3
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["text"] for c in chunks]
    assert "".join(deltas) == whole["text"] == greedy(engine, "And the earth", 30, stop=stops).text
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "text": "",
        "logprobs": None,
        "finish_reason": whole["finish_reason"],
    }
    assert whole["finish_reason"] == ("stop" if stop else "length")


def test_streamed_chat_opens_with_the_role_and_closes_with_the_reason(client, engine):
    expected = greedy(engine, "Who created the earth?", 16, chat=True)
    body = {
        "messages": [{"role": "user", "content": "Who created the earth?"}],
        "max_tokens": 16,
        "temperature": 0,
    }
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reason == "length"


def test_streamed_prompt_list_sends_each_completion_under_its_index(client, engine):
    prompts = ["God", "Israel came"]
    chunks = sse(
        client.post(
            "/v1/completions", json={"prompt": prompts, "max_tokens": 6, "temperature": 0, "stream": True}
        )
    )
    for i, prompt in enumerate(prompts):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == greedy(engine, prompt, 6).text
        assert mine[-1]["finish_reason"] == "length"


def test_stop_sequences_and_max_tokens_set_the_finish_reason(client, engine):
    full = greedy(engine, "In the beginning", 30)
    stop = full.text[8:11]
    body = {"prompt": "In the beginning", "max_tokens": 30, "temperature": 0}
    for stops in (stop, ["zzzz", stop]):
        [choice] = client.post("/v1/completions", json={**body, "stop": stops}).json()["choices"]
        assert (choice["text"], choice["finish_reason"]) == (full.text[: full.text.index(stop)], "stop")
    out = client.post("/v1/completions", json={**body, "max_tokens": 5}).json()
    assert (out["choices"][0]["finish_reason"], out["usage"]["completion_tokens"]) == ("length", 5)


def test_sampling_parameters_reach_the_engine(client, engine):
    body = {"prompt": "God", "max_tokens": 16, "temperature": 1.0, "top_k": 40, "top_p": 0.9, "seed": 7}
    first = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    params = GenerationParams(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.9, seed=7)
    assert first == engine.generate(["God"], params, chat=False)[0].text
    other = client.post("/v1/completions", json={**body, "seed": 8}).json()["choices"][0]["text"]
    assert other != first


def test_max_tokens_left_out_fills_the_context_up_to_the_limit(client, engine):
    long_prompt = "In the beginning God created the heaven and the earth. " * 2
    n = tokens(engine, long_prompt)
    assert 0 < 64 - n < 32
    out = client.post("/v1/completions", json={"prompt": long_prompt, "temperature": 0}).json()
    assert out["usage"]["completion_tokens"] == greedy(engine, long_prompt, 64 - n).completion_tokens
    out = client.post("/v1/completions", json={"prompt": "God", "temperature": 0}).json()
    assert out["usage"]["completion_tokens"] == greedy(engine, "God", 32).completion_tokens


def test_the_context_boundary_is_exact(client, engine):
    prompt = "In the beginning God created the heaven and the earth. " * 2
    room = 64 - tokens(engine, prompt)
    assert room < LIMITS.max_tokens_limit  # so that room + 1 is refused for the context, not the limit
    ok = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": room, "temperature": 0})
    assert ok.status_code == 200
    too_long = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": room + 1})
    error = error_of(too_long, 400)
    n = 64 - room
    assert error["message"] == (
        f"prompt of {n} tokens + max_tokens={room + 1} = 65 tokens: more than the model's context of 64 "
        f"tokens (at most max_tokens={room})"
    )
    assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded")


LONG = "In the beginning God created the heaven and the earth. " * 8


@pytest.mark.parametrize(
    "body, fragment, param",
    [
        ({}, "prompt: Field required", "prompt"),
        (
            {"prompt": "God", "max_tokens": 0},
            "max_tokens=0: Input should be greater than or equal to 1",
            "max_tokens",
        ),
        ({"prompt": "God", "max_tokens": -3}, "max_tokens=-3", "max_tokens"),
        (
            {"prompt": "God", "max_tokens": 33},
            "max_tokens=33: more than this server's limit of 32",
            "max_tokens",
        ),
        (
            {"prompt": "God", "max_tokens": "5"},
            "max_tokens='5': Input should be a valid integer",
            "max_tokens",
        ),
        ({"prompt": "God", "max_tokens": 2.5}, "max_tokens=2.5", "max_tokens"),
        (
            {"prompt": "God", "temperature": -0.1},
            "temperature=-0.1: Input should be greater than or equal to 0",
            "temperature",
        ),
        ({"prompt": "God", "temperature": True}, "temperature=True", "temperature"),
        ({"prompt": "God", "top_p": 0}, "top_p=0: Input should be greater than 0", "top_p"),
        ({"prompt": "God", "top_p": 1.5}, "top_p=1.5: Input should be less than or equal to 1", "top_p"),
        ({"prompt": "God", "top_k": -1}, "top_k=-1", "top_k"),
        ({"prompt": "God", "seed": -1}, "seed=-1", "seed"),
        ({"prompt": "God", "seed": 1.5}, "seed=1.5: Input should be a valid integer", "seed"),
        ({"prompt": "God", "seed": "7"}, "seed='7': Input should be a valid integer", "seed"),
        ({"prompt": "God", "seed": True}, "seed=True", "seed"),
        ({"prompt": "God", "seed": [1]}, "seed=[1]", "seed"),
        ({"prompt": "God", "stop": ["s"] * 500}, "500 stop sequences: expected at most 16", "stop"),
        (
            {"prompt": "God", "stop": "x" * 101},
            "a stop sequence of 101 characters: expected at most 100",
            "stop",
        ),
        ({"prompt": "God", "n": 2}, "n=2: only n=1 is supported", "n"),
        ({"prompt": "God", "stream": "yes"}, "stream='yes'", "stream"),
        ({"prompt": "God", "stop": 5}, "stop=5: expected a string or a list of strings", "stop"),
        ({"prompt": "God", "stop": [""]}, "stop=['']: expected a list of non-empty strings", None),
        ({"prompt": "God", "logprobs": 1}, "logprobs: unsupported parameter", "logprobs"),
        ({"prompt": ""}, "prompt is empty", "prompt"),
        ({"prompt": []}, "prompt is an empty list", "prompt"),
        ({"prompt": ["God", ""]}, "prompt[1] is empty", "prompt"),
        ({"prompt": 5}, "prompt=5: expected a string or a list of strings", "prompt"),
        ({"prompt": [1, 2]}, "expected a string or a list of strings", "prompt"),
        ({"prompt": ["a", "b", "c", "d"]}, "4 prompts: at most max_batch=3 per request", "prompt"),
        ({"prompt": LONG}, "tokens: more than max_prompt_tokens=63", "prompt"),
        ({"prompt": ["God", LONG]}, "prompt[1] has", "prompt"),
    ],
)
def test_bad_completion_requests_are_400_with_a_message(client, body, fragment, param):
    error = error_of(client.post("/v1/completions", json=body), 400)
    assert fragment in error["message"]
    assert error["param"] == param


@pytest.mark.parametrize(
    "body, fragment, param",
    [
        ({}, "messages: Field required", "messages"),
        ({"messages": []}, "messages is empty", "messages"),
        ({"messages": "hi"}, "messages='hi': Input should be a valid list", "messages"),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            "messages.0.role='tool': Input should be 'system', 'user' or 'assistant'",
            "messages",
        ),
        ({"messages": [{"role": "user"}]}, "messages.0.content: Field required", "messages"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content=3", "messages"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "max_completion_tokens": 5},
            "disagree",
            "max_completion_tokens",
        ),
        ({"messages": [{"role": "user", "content": LONG}]}, "messages has", "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 2}, "top_p=2", "top_p"),
    ],
)
def test_bad_chat_requests_are_400_with_a_message(client, body, fragment, param):
    error = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert fragment in error["message"]
    assert error["param"] == param


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"{not json", "invalid JSON: Expecting property name enclosed in double quotes at character 1"),
        (b'{"prompt": "God",}', "invalid JSON: "),
        (b'{"prompt": "God", "temperature": NaN}', "temperature=nan: Input should be a finite number"),
        (b"", "request body: expected a JSON object"),
        (b"[1, 2]", "request body: expected a JSON object"),
    ],
)
def test_malformed_json_is_400(client, raw, message):
    response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    error = error_of(response, 400)
    assert error["message"].startswith(message)


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/v1/completions", {"prompt": "ab\udcff"}, "prompt='ab\\udcff': expected valid Unicode text"),
        ("/v1/completions", {"prompt": ["God", "\ud800x"]}, "prompt=['God', '\\ud800x']: expected"),
        ("/v1/completions", {"prompt": "God", "stop": ["a", "\ud800"]}, "stop=['a', '\\ud800']: expected"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "\ud83d"}]},
            "messages.0.content=",
        ),
    ],
)
def test_text_with_lone_surrogates_is_400(client, path, body, message):
    """JSON's escapes spell UTF-16 halves that are no text ("\\ud800"): no tokenizer takes them."""
    raw = json.dumps(body)  # ASCII, the surrogates escaped
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    error = error_of(response, 400)
    assert error["message"].startswith(message)
    assert "(a lone surrogate at character " in error["message"]


def test_a_body_that_is_not_utf8_is_400(client):
    raw = '{"prompt": "caf\u00e9 '.encode("latin-1") + b'\xff"}'
    response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    error = error_of(response, 400)
    assert error["message"] == "request body: invalid UTF-8 at byte 15: expected JSON in UTF-8"
    assert error["code"] == "invalid_utf8"


def test_a_body_over_the_size_limit_is_413_declared_or_streamed(engine):
    cfg = ServeConfig(max_tokens_limit=32, max_body_bytes=2000)
    small = json.dumps({"prompt": "God", "max_tokens": 2}).encode() + b" " * 1900  # JSON may end in spaces
    large = json.dumps({"prompt": "God " * 600, "max_tokens": 2}).encode()
    assert len(small) < 2000 < len(large)
    headers = {"content-type": "application/json"}
    with TestClient(create_app(engine, cfg)) as client:
        assert client.post("/v1/completions", content=small, headers=headers).status_code == 200
        declared = client.post("/v1/completions", content=large, headers=headers)
        chunked = client.post("/v1/completions", content=iter([large[:1500], large[1500:]]), headers=headers)
        assert client.get("/health").status_code == 200
    assert error_of(declared, 413)["message"] == (
        f"request body of {len(large)} bytes: more than this server's limit of 2000 bytes"
    )
    assert "transfer-encoding" not in declared.request.headers
    assert chunked.request.headers["transfer-encoding"] == "chunked"
    assert error_of(chunked, 413)["message"] == (
        "request body of more than 2000 bytes: more than this server's limit of 2000 bytes"
    )
    assert declared.json()["error"]["code"] == "request_too_large"


def test_unknown_model_is_404(client):
    for path, body in (
        ("/v1/completions", {"prompt": "God", "model": "gpt-4"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}),
    ):
        error = error_of(client.post(path, json=body), 404)
        assert error["message"] == "model 'gpt-4' not found: this server serves 'tiny'"
        assert (error["param"], error["code"]) == ("model", "model_not_found")


def test_unknown_routes_and_methods_get_openai_error_bodies(client):
    assert error_of(client.get("/v1/nope"), 404)["code"] == "not_found"
    assert error_of(client.get("/v1/completions"), 405)["code"] == "method_not_allowed"


def test_a_failing_decode_step_is_a_500_and_the_server_goes_on(engine):
    class Failing:
        failed = False

        def __getattr__(self, name):
            return getattr(engine, name)

        def forward(self, ids, positions, mask, past=None):
            if past is not None and not self.failed:
                self.failed = True
                raise RuntimeError("boom")
            return engine.forward(ids, positions, mask, past)

    body = {"prompt": "God", "max_tokens": 8, "temperature": 0}
    with TestClient(create_app(Failing(), LIMITS)) as client:
        failed = client.post("/v1/completions", json=body)
        after = client.post("/v1/completions", json=body)
    assert failed.status_code == 500
    assert failed.json()["error"] == {
        "message": "generation failed: RuntimeError: boom",
        "type": "server_error",
        "param": None,
        "code": "generation_failed",
    }
    assert after.json()["choices"][0]["text"] == greedy(engine, "God", 8).text


def test_valid_requests_never_fail(client):
    """A seeded fuzz over valid parameter combinations, both endpoints, streamed or not: all 200."""
    rng = random.Random(0)
    prompts = ["God", "In the beginning", "And the earth was without form", "é", " ", "\n\n", "<|end|>"]
    options = {
        "max_tokens": [1, 2, 7, 16, 32],
        "temperature": [0, 0.01, 0.7, 1, 2.5, 100],
        "top_p": [1e-9, 0.1, 0.5, 1],
        "top_k": [0, 1, 5, 299, 5000],
        "stop": ["e", [" ", "th"], [], None, "\ufffd", "a" * 40],
        "seed": [None, 0, 2**70],
        "stream": [False, True],
        "model": ["tiny", None],
    }
    for i in range(24):
        body = {key: rng.choice(values) for key, values in options.items() if rng.random() < 0.7}
        if i % 2:
            chosen = rng.sample(prompts, rng.randint(1, 3))
            body["prompt"] = chosen[0] if len(chosen) == 1 else chosen
            path = "/v1/completions"
        else:
            body["messages"] = [{"role": "user", "content": rng.choice(prompts)}]
            path = "/v1/chat/completions"
        response = client.post(path, json=body)
        assert response.status_code == 200, (body, response.text)
        if body.get("stream"):
            chunks = sse(response)
            assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            out = response.json()
            assert all(c["finish_reason"] in ("stop", "length") for c in out["choices"])
            assert out["usage"]["completion_tokens"] <= body.get("max_tokens", 32) * len(out["choices"])


def wait_for_health(client, **expected) -> dict:
    """/health once its fields have the expected values (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        health = client.get("/health").json()
        if all(health[k] == v for k, v in expected.items()) or time.monotonic() > deadline:
            assert {k: health[k] for k in expected} == expected
            return health
        time.sleep(0.005)


def test_requests_share_decode_steps_while_health_answers(engine):
    """Three requests, max_running=2: two decode together, the third waits; /health answers while a forward
    blocks and counts them; every answer is the request's own greedy completion."""
    paced = Paced(engine)
    prompts = ["God", "And the earth was", "Israel came"]
    results = {}

    def post(prompt):
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
        results[prompt] = client.post("/v1/completions", json=body)

    threads = [threading.Thread(target=post, args=(p,), daemon=True) for p in prompts]
    cfg = ServeConfig(max_tokens_limit=32, max_running=2)
    with TestClient(create_app(paced, cfg)) as client:
        try:
            threads[0].start()
            paced.wait_calls(1)  # the first prompt's prefill, blocked
            started = time.perf_counter()
            wait_for_health(client, running=1, waiting=0)
            health_seconds = time.perf_counter() - started
            for t in threads[1:]:
                t.start()
            wait_for_health(client, running=1, waiting=2)
            for _ in range(10):  # step by step, until the second has joined and the third waits for a slot
                paced.allow(1)
                if client.get("/health").json()["running"] == 2:
                    break
            wait_for_health(client, running=2, waiting=1)
        finally:  # let the generations finish before the client closes, whatever happened
            paced.allow(10_000)
            for t in threads:
                if t.ident is not None:
                    t.join(30)
        wait_for_health(client, running=0, waiting=0)
    assert health_seconds < 5
    for prompt in prompts:
        assert results[prompt].json()["choices"][0]["text"] == greedy(engine, prompt, 12).text
    assert max(rows for rows, cached, _ in paced.calls if cached) == 2


def busy_server(engine, **cfg):
    """(paced engine, app) with max_running=1: the first request holds the only slot until `allow`."""
    paced = Paced(engine)
    return paced, create_app(paced, ServeConfig(max_tokens_limit=32, max_running=1, **cfg))


def test_a_full_queue_is_a_503_with_retry_after(engine):
    paced, app = busy_server(engine, max_queue=1)
    body = {"prompt": "God", "max_tokens": 4, "temperature": 0}
    with TestClient(app) as client:
        threads = [threading.Thread(target=client.post, args=("/v1/completions",), kwargs={"json": body})]
        threads.append(threading.Thread(target=client.post, args=("/v1/completions",), kwargs={"json": body}))
        try:
            threads[0].start()
            paced.wait_calls(1)
            threads[1].start()
            wait_for_health(client, running=1, waiting=1)
            full = client.post("/v1/completions", json={**body, "stream": True})
        finally:
            paced.allow(10_000)
            for t in threads:
                t.join(30)
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    error = full.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "queue_full")
    assert error["message"] == "1 requests already wait to be served (max_queue=1): retry in 1 s"


@pytest.mark.parametrize("stream", [False, True])
def test_waiting_longer_than_request_timeout_is_a_503(engine, stream):
    paced, app = busy_server(engine, request_timeout=0.3)
    body = {"prompt": "God", "max_tokens": 4, "temperature": 0}
    with TestClient(app) as client:
        first = threading.Thread(target=client.post, args=("/v1/completions",), kwargs={"json": body})
        try:
            first.start()
            paced.wait_calls(1)
            started = time.perf_counter()
            late = client.post("/v1/completions", json={**body, "stream": stream})
            waited = time.perf_counter() - started
            health = client.get("/health").json()
        finally:
            paced.allow(10_000)
            first.join(30)
    assert late.status_code == 503 and 0.3 <= waited < 5
    error = late.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "timeout")
    assert error["message"].startswith("waited 0.3 s to be served (request_timeout=0.3)")
    assert health["waiting"] == 0  # the request that timed out left the queue


def test_with_an_api_key_only_that_key_gets_in(engine):
    body = {"prompt": "God", "max_tokens": 4, "temperature": 0}
    with TestClient(create_app(engine, ServeConfig(max_tokens_limit=32, api_key="sk-right"))) as client:
        missing = client.post("/v1/completions", json=body)
        wrong = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-wrong"})
        basic = client.get("/v1/models", headers={"Authorization": "Basic sk-right"})
        right = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-right"})
        health = client.get("/health")
    for refused in (missing, wrong, basic):
        error = error_of(refused, 401)
        assert error["code"] == "invalid_api_key" and refused.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in missing.json()["error"]["message"]
    assert "incorrect API key" in wrong.json()["error"]["message"]
    assert right.status_code == 200 and health.status_code == 200  # /health stays open to load balancers


def test_without_an_api_key_any_key_is_accepted(client):
    for headers in ({"Authorization": "Bearer sk-anything"}, {"Authorization": "junk"}, {}):
        response = client.post("/v1/completions", json={"prompt": "God", "max_tokens": 2}, headers=headers)
        assert response.status_code == 200


# --- a real server ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def threaded_server(app, cfg: ServeConfig):
    """The app behind uvicorn as `lmpipe serve` runs it, in a thread of this process so that the test can pace
    its engine: yields (server, its thread, base URL); stops it on the way out."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=free_port(),
        log_level="warning",
        timeout_graceful_shutdown=cfg.shutdown_timeout,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield server, thread, f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(20)


def test_a_hundred_streams_that_disconnect_at_once_free_every_slot(engine):
    """8 run, 92 wait; all clients leave together: the waiting ones leave the queue without being prefilled,
    the running ones leave the batch at the next step, and the server serves the next client as before."""
    paced = Paced(engine)
    cfg = ServeConfig(max_tokens_limit=32, max_running=8, max_queue=128)
    body = {"prompt": "In the beginning", "max_tokens": 32, "temperature": 0, "stream": True}

    async def clients(base: str) -> None:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

            async def stream() -> None:
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    await response.aread()

            streams = [asyncio.ensure_future(stream()) for _ in range(100)]
            deadline = time.monotonic() + 20
            while (health := (await client.get("/health")).json())["running"] < 8 or health["waiting"] < 92:
                assert time.monotonic() < deadline, health
                paced.allow(1)  # prefill whoever has arrived, a step at a time
                await asyncio.sleep(0.02)
            assert (health["running"], health["waiting"]) == (8, 92), health
            for task in streams:
                task.cancel()  # every connection closes at once
            await asyncio.gather(*streams, return_exceptions=True)

    with threaded_server(create_app(paced, cfg), cfg) as (_, _, base):
        asyncio.run(clients(base))
        prefills_before = sum(1 for _, cached, _ in paced.calls if cached == 0)
        steps = 0  # a permit at a time: the 8 running rows need 32 steps to finish of themselves
        while (health := httpx.get(f"{base}/health").json())["running"] or health["waiting"]:
            assert steps < 5, health
            paced.allow(1)
            steps += 1
            time.sleep(0.1)
        paced.allow(100_000)
        after = httpx.post(f"{base}/v1/completions", json={**body, "stream": False}, timeout=30).json()
    assert sum(1 for _, cached, _ in paced.calls if cached == 0) == prefills_before + 1  # only the last one
    assert after["choices"][0]["text"] == greedy(engine, "In the beginning", 32).text


def stream_in_thread(base: str, body: dict) -> tuple[threading.Thread, list[str]]:
    """A streaming request read to its end in a thread: the thread, and the lines (or the error) it got."""
    lines: list[str] = []

    def read():
        try:
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as response:
                lines.extend(line for line in response.iter_lines() if line)
        except httpx.HTTPError as exc:
            lines.append(f"error: {type(exc).__name__}")

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, lines


SIGTERM_BODY = {"prompt": "In the beginning", "max_tokens": 20, "temperature": 0, "stream": True}


@contextmanager
def sigterm_mid_stream(engine, shutdown_timeout: float):
    """A server streaming SIGTERM_BODY, two steps in (its next forward waits for a permit), when SIGTERM comes:
    yields (paced engine, base URL, the stream's lines so far); on the way out the engine is let go and the
    server must have stopped."""
    paced = Paced(engine)
    cfg = ServeConfig(max_tokens_limit=32, shutdown_timeout=shutdown_timeout)
    with threaded_server(create_app(paced, cfg), cfg) as (server, thread, base):
        reader, lines = stream_in_thread(base, SIGTERM_BODY)
        paced.allow(2)
        paced.wait_calls(3)
        server.handle_exit(signal.SIGTERM, None)
        try:
            yield paced, base, reader, lines
        finally:
            paced.allow(100_000)
            reader.join(30)
            thread.join(20)
        assert not thread.is_alive()


def test_sigterm_stops_accepting_and_lets_running_requests_finish(engine):
    with sigterm_mid_stream(engine, shutdown_timeout=10) as (paced, base, reader, lines):
        deadline = time.monotonic() + 5
        while True:  # the listening socket closes at once
            try:
                httpx.get(f"{base}/health", timeout=1)
            except httpx.TransportError:  # refused, or closed unanswered (accepted just before the close)
                break
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.05)
        paced.allow(100_000)
        reader.join(30)
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line.removeprefix("data: "))["choices"][0]["text"] for line in lines[:-1])
    assert text == greedy(engine, "In the beginning", 20).text


def test_sigterm_cancels_what_is_still_running_after_the_shutdown_timeout(engine):
    started = time.monotonic()
    with sigterm_mid_stream(engine, shutdown_timeout=0.5) as (_, _, reader, lines):
        reader.join(10)  # the stuck step's forward gets no permit: the request is cancelled
        cut_after = time.monotonic() - started
    assert 0.5 <= cut_after < 5
    assert "data: [DONE]" not in lines  # cut short: the client sees the stream end early


def test_lmpipe_serve_runs_a_real_server(tiny, tmp_path):
    export_dir, engine = tiny
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    command = [
        sys.executable,
        "-m",
        "lmpipe.cli",
        "serve",
        "--model",
        str(export_dir),
        "--port",
        str(port),
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up within 60 s"
            time.sleep(0.1)
        expected = greedy(engine, "In the beginning", 12)
        body = {"prompt": "In the beginning", "max_tokens": 12, "temperature": 0}
        out = httpx.post(f"{base}/v1/completions", json=body, timeout=30).json()
        assert out["choices"][0]["text"] == expected.text
        deltas = []
        with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        deltas = [json.loads(line.removeprefix("data: "))["choices"][0]["text"] for line in lines[:-1]]
        assert "".join(deltas) == expected.text
    finally:
        proc.terminate()  # SIGTERM to this PID: a graceful shutdown
        try:
            returncode = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert returncode == 0, text  # a stop asked for with SIGTERM is a clean exit
    assert "Uvicorn running on" in text and "Finished server process" in text
