"""100 concurrent streaming clients against one ``capibara serve`` process, some of
which disconnect mid-stream or time out: every finished stream is complete and
well-formed, the KV page pool is full again, no request or task is left behind, the
server still answers, and ``/metrics`` (parsed by ``prometheus_client``) counts it."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import start_server

MODEL = "capibara-tiny"
CLIENTS = 100


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of a scrape."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _get(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def _client_run(client, i: int, rng: random.Random) -> dict:
    """One client: a stream it reads to the end, leaves after a few chunks, or gives up
    on with a short timeout."""
    kind = rng.choices(["complete", "disconnect", "timeout"], weights=[6, 2, 2])[0]
    max_tokens = rng.randint(4, 24)
    prompt = "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(1, 60)))
    if kind == "timeout":
        client = client.with_options(timeout=rng.uniform(0.01, 0.3))
    out = {"kind": kind, "max_tokens": max_tokens, "chunks": 0, "text": "", "ttft": None}
    start = time.perf_counter()
    try:
        stream = await client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=rng.choice([0.0, 0.7]),
            stream=True,
            stream_options={"include_usage": True},
        )
        leave_after = rng.randint(1, 4) if kind == "disconnect" else None
        async for chunk in stream:
            out["chunks"] += 1
            out["ttft"] = out["ttft"] or time.perf_counter() - start
            if chunk.usage is not None:
                out["usage"] = chunk.usage
            for choice in chunk.choices:
                out["text"] += choice.text
                if choice.finish_reason is not None:
                    out["finish_reason"] = choice.finish_reason
            if leave_after is not None and out["chunks"] >= leave_after:
                await stream.close()  # the connection goes away mid-stream
                out["left"] = True
                break
    except openai.APITimeoutError:
        out["timed_out"] = True
    out["seconds"] = time.perf_counter() - start
    return out


def test_100_streaming_clients_with_disconnects_and_timeouts(server):
    before = _samples(server.metrics_text())
    idle = server.health()

    async def run():
        client = openai.AsyncOpenAI(
            base_url=server.base_url, api_key="none", max_retries=0, timeout=120
        )
        rng = random.Random(0)
        async with client:
            jobs = [_client_run(client, i, random.Random(rng.random())) for i in range(CLIENTS)]
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=150)

    start = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - start

    aborted = [r for r in results if r.get("left") or r.get("timed_out")]
    finished = [r for r in results if r not in aborted]  # read to the end of the stream
    assert len(finished) + len(aborted) == CLIENTS
    assert len(finished) >= 50  # the "complete" clients, and some that left too late
    for r in finished:  # complete and well-formed: a finish reason, then usage
        assert r.get("finish_reason") == "length", r
        assert r["usage"].completion_tokens == r["max_tokens"]
        assert len(r["text"]) <= r["max_tokens"]

    # Every request is done, every page back, no HTTP request or task left behind.
    deadline = time.monotonic() + 20
    while True:
        health = server.health()
        pages = health["pages"]
        settled = (
            health["running"] == 0
            and health["waiting"] == 0
            and health["active_http_requests"] == 0
            and pages["free"] + pages["prefix_cache"] == pages["capacity"]
            and health["asyncio_tasks"] <= idle["asyncio_tasks"]
        )
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert settled, health

    # /metrics counts what happened.
    after = _samples(server.metrics_text())

    def delta(name, **labels):
        return _get(after, name, **labels) - _get(before, name, **labels)

    reasons = ("length", "stop", "cancelled", "error")
    engine_done = {r: delta("capibara_requests_finished_total", reason=r) for r in reasons}
    submitted = sum(engine_done.values())
    timed_out = sum(bool(r.get("timed_out")) for r in results)
    # A client that timed out before its request was sent never reached the server.
    assert CLIENTS - timed_out <= submitted <= CLIENTS and engine_done["error"] == 0
    assert engine_done["length"] >= len(finished)
    cancelled = engine_done["cancelled"]
    assert 0 < cancelled <= len(aborted)
    # A client can also leave after its request finished in the engine, before the
    # end of the response reached it: a disconnect, not a cancellation.
    disconnects = delta("capibara_http_client_disconnects_total", endpoint="completions")
    assert cancelled <= disconnects <= len(aborted)
    http = sum(
        delta("capibara_http_requests_total", endpoint="/v1/completions", status=s)
        for s in ("200", "499")
    )
    assert http == submitted
    tokens = sum(r["usage"].completion_tokens for r in finished)
    assert delta("capibara_generated_tokens_total") >= tokens
    assert (
        delta("capibara_http_request_duration_seconds_count", endpoint="completions") == submitted
    )
    assert _get(after, "capibara_kv_pages", state="capacity") == pages["capacity"]

    # ... and the server still answers.
    r = httpx.post(
        f"{server.base_url}/completions",
        json={"model": MODEL, "prompt": "still there?", "max_tokens": 3, "temperature": 0},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3

    ttfts = sorted(r["ttft"] for r in finished)
    left = sum(bool(r.get("left")) for r in results)
    print(
        f"\n{CLIENTS} streams in {wall:.2f}s: {len(finished)} complete, {left} left "
        f"mid-stream, {timed_out} timed out, {cancelled:.0f} cancelled in the engine, "
        f"{disconnects:.0f} disconnects counted, "
        f"{CLIENTS - submitted:.0f} never sent; {tokens} tokens streamed to completion "
        f"({tokens / wall:.0f} tokens/s); "
        f"TTFT p50 {ttfts[len(ttfts) // 2] * 1e3:.0f} ms p99 "
        f"{ttfts[int(len(ttfts) * 0.99)] * 1e3:.0f} ms; pages leaked 0"
    )
