"""``capibara serve`` through the real ``openai`` client: completions and chat,
streamed and not, equal to the in-process engine's greedy (and seeded) text, with the
right ``usage``, stop strings, the API key, a table of malformed bodies (each a 4xx
in OpenAI's error JSON naming the field, the server serving on) and an engine fault
that fails its own request only."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server_helpers import API_KEY, FAULT, MAX_SEQ_LEN, reference_engine, start_server

from capibara.core.inference import SamplingParams
from capibara.server.chat import render

MODEL = "capibara-tiny"
PROMPTS = ["Hello", "The capybara is", "a", "Once upon a time, in a land far away"]
MESSAGES = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(
        tmp_path_factory.mktemp("serve"),
        "--api-key",
        API_KEY,
        env={"CAPIBARA_SERVE_FAULT_PROMPT": FAULT},
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def engine():
    e = reference_engine()
    yield e
    e.close()


@pytest.fixture(scope="module")
def client(server):
    # No retries: a 429/500 must reach the test, not be retried away.
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


def _greedy(engine, prompts, max_tokens, **kw):
    return engine.generate_batch(prompts, SamplingParams(max_tokens=max_tokens, **kw))


def _stream_text(stream) -> tuple[str, str | None, object]:
    """(text, finish_reason, usage) of a streamed completion or chat completion."""
    text, reason, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text += piece or ""
            reason = choice.finish_reason or reason
    return text, reason, usage


def test_models_and_health(client, server):
    [card] = client.models.list().data
    assert card.id == MODEL
    health = server.health()
    assert health["status"] == "ok" and health["compilations"] == 3


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completions_equal_the_engine_greedy_text(client, engine, stream):
    want = _greedy(engine, PROMPTS, 12)
    for prompt, gen in zip(PROMPTS, want, strict=True):
        args = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        if stream:
            s = client.completions.create(
                **args, stream=True, stream_options={"include_usage": True}
            )
            text, reason, usage = _stream_text(s)
        else:
            r = client.completions.create(**args)
            text, reason, usage = r.choices[0].text, r.choices[0].finish_reason, r.usage
        assert text == gen.text and reason == "length"
        assert usage.prompt_tokens == len(prompt.encode()) == len(gen.prompt_token_ids)
        assert usage.completion_tokens == 12 and usage.total_tokens == usage.prompt_tokens + 12


def test_token_id_prompts_and_seeded_sampling(client, engine):
    ids = [7, 100, 42, 9]
    [gen] = _greedy(engine, [ids], 8)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == gen.text and r.usage.prompt_tokens == 4
    [sampled] = _greedy(engine, ["Hello"], 10, temperature=0.8, top_k=50, seed=7)
    kw = dict(temperature=0.8, seed=7, extra_body={"top_k": 50})
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=10, **kw)
    assert r.choices[0].text == sampled.text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_equals_the_engine_on_the_chat_template(client, engine, stream):
    for messages in MESSAGES:
        prompt, stop = render(engine.tokenizer, messages)
        [gen] = _greedy(engine, [prompt], 10, stop=stop)
        args = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0)
        if stream:
            s = client.chat.completions.create(
                **args, stream=True, stream_options={"include_usage": True}
            )
            text, reason, usage = _stream_text(s)
        else:
            r = client.chat.completions.create(**args)
            text, reason, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
            assert r.choices[0].message.role == "assistant"
        assert text == gen.text
        assert reason == ("length" if gen.finish_reason == "length" else "stop")
        assert usage.prompt_tokens == len(gen.prompt_token_ids)
        assert usage.completion_tokens == len(gen.token_ids)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_strings_end_the_text(client, engine, stream):
    for prompt, gen in zip(PROMPTS, _greedy(engine, PROMPTS, 16), strict=True):
        # A character of the greedy text, past its start: the text must end before it.
        stop = next((c for c in gen.text[2:] if c != "\ufffd" and c.isprintable()), None)
        if stop is None:
            continue
        want = gen.text[: gen.text.index(stop)]
        args = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
        if stream:
            text, reason, _ = _stream_text(client.completions.create(**args, stream=True))
        else:
            r = client.completions.create(**args)
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (text, reason) == (want, "stop")


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{server.base_url}/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key for health/metrics


def _body(**fields) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "x", **fields}).encode()


def _chat(**fields) -> str:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], **fields})


COMPLETIONS, CHAT = "/completions", "/chat/completions"
# (case id, path, raw body, status, the param the error names)
MALFORMED = [
    ("not-json", COMPLETIONS, b"{bad", 400, None),
    ("invalid-utf8", COMPLETIONS, b'{"model": "capibara-tiny", "prompt": "\xff\xfe"}', 400, None),
    ("json-array", COMPLETIONS, b"[1, 2]", 400, None),
    ("max_tokens-str", COMPLETIONS, _body(max_tokens="5"), 400, "max_tokens"),
    ("max_tokens-negative", COMPLETIONS, _body(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens-float", COMPLETIONS, _body(max_tokens=1.5), 400, "max_tokens"),
    ("temperature-negative", COMPLETIONS, _body(temperature=-0.5), 400, "temperature"),
    ("temperature-str", COMPLETIONS, _body(temperature="hot"), 400, "temperature"),
    ("top_p-zero", COMPLETIONS, _body(top_p=0), 400, "top_p"),
    ("seed-negative", COMPLETIONS, _body(seed=-1), 400, "seed"),
    ("n-2", COMPLETIONS, _body(n=2), 400, "n"),
    ("stream-str", COMPLETIONS, _body(stream="yes"), 400, "stream"),
    ("stop-empty", COMPLETIONS, _body(stop=[""]), 400, "stop"),
    ("prompt-int", COMPLETIONS, _body(prompt=5), 400, "prompt"),
    ("prompt-missing", COMPLETIONS, json.dumps({"model": MODEL}).encode(), 400, "prompt"),
    ("prompt-empty", COMPLETIONS, _body(prompt=""), 400, "prompt"),
    ("prompt-ids-outside-vocab", COMPLETIONS, _body(prompt=[1, 99999]), 400, "prompt"),
    ("prompt-past-context", COMPLETIONS, _body(prompt="x" * MAX_SEQ_LEN), 400, "prompt"),
    ("max_tokens-past-context", COMPLETIONS, _body(max_tokens=MAX_SEQ_LEN), 400, "prompt"),
    ("model-missing", COMPLETIONS, json.dumps({"prompt": "x"}).encode(), 400, "model"),
    ("model-unknown", COMPLETIONS, _body(model="gpt-5"), 404, "model"),
    ("body-10MB", COMPLETIONS, _body(prompt="x" * 10_000_000), 413, None),
    ("messages-empty", CHAT, json.dumps({"model": MODEL, "messages": []}), 400, "messages"),
    ("messages-role", CHAT, _chat(messages=[{"role": "bot", "content": "x"}]), 400,
     "messages[0].role"),
    ("messages-content-int", CHAT, _chat(messages=[{"role": "user", "content": 5}]), 400,
     "messages[0].content"),
    ("chat-top_p-str", CHAT, _chat(top_p="all"), 400, "top_p"),
]  # fmt: skip


@pytest.mark.parametrize(
    "path,body,status,param", [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_bodies_get_a_4xx_naming_the_field(server, client, path, body, status, param):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server.base_url}{path}", content=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    if param is not None:
        assert param in error["message"] or error["code"] in ("model_not_found",)
    # ... and the server goes on serving.
    ok = client.completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


def test_unknown_route_is_an_openai_404(server):
    r = httpx.get(f"{server.base_url}/nope", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and "error" in r.json()


def test_an_engine_fault_fails_only_its_own_request(server, engine):
    """Five concurrent requests, one of whose prompt trips the fault hook inside the
    engine thread: that one gets a 500 (whole or streamed), the others their text."""
    want = {p: g.text for p, g in zip(PROMPTS, _greedy(engine, PROMPTS, 12), strict=True)}

    async def one(aclient, prompt, stream):
        args = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        if not stream:
            return (await aclient.completions.create(**args)).choices[0].text
        text = ""
        async for chunk in await aclient.completions.create(**args, stream=True):
            text += chunk.choices[0].text if chunk.choices else ""
        return text

    async def run(stream):
        # A client per event loop: its connection pool belongs to the loop.
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
        async with aclient:
            prompts = [*PROMPTS, f"boom {FAULT}"]
            jobs = [one(aclient, p, stream) for p in prompts]
            return await asyncio.gather(*jobs, return_exceptions=True)

    for stream in (False, True):
        *texts, failed = asyncio.run(run(stream))
        assert texts == [want[p] for p in PROMPTS]
        assert isinstance(failed, openai.InternalServerError), failed
        assert failed.status_code == 500 and "fault injected" in failed.body["message"]
    health = server.health()
    assert health["running"] == 0 and health["active_http_requests"] == 0


def test_a_fault_mid_stream_ends_that_stream_with_an_error_event(client, server):
    """``MARKER:3`` fails the request at its third token: the first tokens have been
    streamed, then the SSE error event makes the client raise; the server serves on."""
    stream = client.completions.create(
        model=MODEL, prompt=f"boom {FAULT}:3", max_tokens=12, temperature=0, stream=True
    )
    chunks = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            chunks.append(chunk)
    assert "fault injected" in e.value.message and "at token 3" in e.value.message
    assert len(chunks) >= 1 and all(c.choices[0].finish_reason is None for c in chunks)
    ok = client.completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2
    assert server.health()["active_http_requests"] == 0
