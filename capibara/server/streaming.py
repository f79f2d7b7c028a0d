"""OpenAI response shapes: whole responses, streamed chunks and the SSE stream.

A streamed response is ``data: {chunk}\\n\\n`` events ending with ``data: [DONE]``:
completions chunks are ``text_completion`` objects with ``choices[0].text``; chat
chunks are ``chat.completion.chunk`` objects whose first delta carries the role. The
last chunk with a choice has its ``finish_reason``; with ``stream_options.
include_usage`` one more chunk has ``usage`` and no choices, as OpenAI sends.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable

from capibara.core.inference import Generation, StreamEvent
from capibara.server.errors import APIError

DONE = "data: [DONE]\n\n"


@dataclasses.dataclass(frozen=True)
class Call:
    """What every response of one request repeats."""

    chat: bool  # /v1/chat/completions (else /v1/completions)
    id: str  # "cmpl-..." or "chatcmpl-..."
    created: int  # unix seconds
    model: str


def finish_reason(generation: Generation) -> str:
    """OpenAI's reason: ``stop`` (a stop string or token) or ``length``."""
    return "length" if generation.finish_reason == "length" else "stop"


def usage(generation: Generation) -> dict[str, int]:
    prompt, completion = len(generation.prompt_token_ids), len(generation.token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def response_body(call: Call, generation: Generation) -> dict:
    """The whole (non-streamed) response."""
    reason = finish_reason(generation)
    if call.chat:
        message = {"role": "assistant", "content": generation.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": generation.text, "logprobs": None, "finish_reason": reason}
        kind = "text_completion"
    return {
        "id": call.id,
        "object": kind,
        "created": call.created,
        "model": call.model,
        "choices": [choice],
        "usage": usage(generation),
    }


def _chunk(call: Call, choices: list[dict], usage_: dict | None = None) -> str:
    body = {
        "id": call.id,
        "object": "chat.completion.chunk" if call.chat else "text_completion",
        "created": call.created,
        "model": call.model,
        "choices": choices,
    }
    if usage_ is not None:
        body["usage"] = usage_
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _choice(call: Call, text: str | None, reason: str | None, *, role: bool = False) -> dict:
    if call.chat:
        delta = {} if text is None else {"content": text}
        if role:
            delta = {"role": "assistant", **delta}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}


async def sse(
    call: Call,
    first: StreamEvent,
    events: AsyncIterator[StreamEvent],
    *,
    include_usage: bool,
    on_end: Callable[[Generation | None], None],
) -> AsyncIterator[str]:
    """The SSE events of one request, from its ``first`` event on.

    ``on_end(generation)`` runs when the stream ends, however it ends (``None`` when
    the client went away and the body was never completed). A request the engine
    fails mid-stream ends with an OpenAI error event, then ``[DONE]``.
    """
    generation = None
    try:
        if call.chat:  # the role comes first, alone, as OpenAI sends it
            yield _chunk(call, [_choice(call, "", None, role=True)])
        event = first
        while True:
            if event.generation is not None:
                generation = event.generation
                break
            if event.text:
                yield _chunk(call, [_choice(call, event.text, None)])
            event = await anext(events)
        if generation.finish_reason in ("error", "cancelled"):
            yield failure(generation).sse()
        else:
            # The held-back tail (a partial stop string that never completed) is the
            # last event's text; it goes out with the finish reason.
            text = event.text if event.text else (None if call.chat else "")
            yield _chunk(call, [_choice(call, text, finish_reason(generation))])
            if include_usage:
                yield _chunk(call, [], usage(generation))
        yield DONE
    finally:
        on_end(generation)


def failure(generation: Generation) -> APIError:
    """The error a failed or cancelled generation is answered with."""
    if generation.finish_reason == "cancelled":
        message = "the request was cancelled (the server is shutting down)"
        return APIError(503, message, type="server_error")
    return APIError(
        500,
        f"the engine failed this request: {generation.error}",
        type="server_error",
        code="engine_error",
    )
