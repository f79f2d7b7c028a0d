"""The app's error mapping in-process (``httpx.ASGITransport``, no server process):
``QueueFullError`` -> 429 with ``Retry-After`` through the real ``openai`` client, and
the error JSON of a field pydantic reports through a union."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from pydantic import ValidationError

from capibara.core.inference import ByteTokenizer, QueueFullError
from capibara.server import create_app
from capibara.server.errors import from_validation
from capibara.server.schemas import ChatCompletionRequest, CompletionRequest


class _FullEngine:
    """Just enough of ``CapibaraInference`` for the app: every submission finds the
    queue full."""

    tokenizer = ByteTokenizer()
    max_context = 64

    def open_stream(self, prompt, sampling):
        raise QueueFullError("1024 requests are waiting (EngineConfig.max_waiting=1024)")

    def metrics(self):  # read at scrapes only
        raise NotImplementedError

    def close(self):
        pass


def test_queue_full_is_a_429_with_retry_after():
    app = create_app(_FullEngine(), model_name="m", retry_after=3)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            raw = await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
            client = openai.AsyncOpenAI(
                base_url="http://t/v1", api_key="-", http_client=http, max_retries=0
            )
            with pytest.raises(openai.RateLimitError) as e:
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x"}]
                )
            return raw, e.value

    raw, error = asyncio.run(run())
    assert raw.status_code == 429 and raw.headers["retry-after"] == "3"
    assert raw.json()["error"]["type"] == "rate_limit_error"
    assert error.status_code == 429 and error.body["code"] == "queue_full"


@pytest.mark.parametrize(
    "schema,body,param",
    [
        (CompletionRequest, {"model": "m", "prompt": [1, "a"]}, "prompt"),
        (CompletionRequest, {"model": "m", "prompt": "x", "stop": [1]}, "stop"),
        (CompletionRequest, {"model": "m", "prompt": "x", "stream_options": {"x": 1}}, None),
        (
            ChatCompletionRequest,
            {"model": "m", "messages": [{"role": "user"}], "top_k": -2},
            "top_k",
        ),
        (ChatCompletionRequest, {"model": "m", "messages": "hi"}, "messages"),
    ],
    ids=["prompt-mixed-list", "stop-int", "unknown-nested-field-ignored", "top_k", "messages-str"],
)
def test_validation_errors_name_the_field(schema, body, param):
    if param is None:
        schema.model_validate(body)  # unknown fields are ignored, as vLLM does
        return
    with pytest.raises(ValidationError) as e:
        schema.model_validate(body)
    error = from_validation(e.value)
    assert error.status == 400 and error.param == param and error.message.startswith(param)


def test_sampling_defaults_and_overrides():
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", "top_k": -1})
    assert req.sampling(5).temperature == 1.0 and req.sampling(5).top_k == 0  # OpenAI's
    s = req.sampling(5, ("<|im_end|>",), {"temperature": 0.0, "top_p": 0.9})
    assert (s.temperature, s.top_p, s.stop, s.max_tokens) == (0.0, 0.9, ("<|im_end|>",), 5)
