"""``capibara bench-serve --url``: an HTTP load generator for an OpenAI-compatible server.

In the style of vLLM's ``benchmark_serving``: N requests, at most ``concurrency`` at a
time, arriving as a Poisson process of ``request_rate`` per second (``inf``: all at
once), prompts of L/2..L characters and outputs of M/2..M tokens (``ignore_eos``, so
each runs its full length), every one streamed through the real ``openai`` client.
Prints TTFT and time per output token (TPOT, after the first) p50/p99, end-to-end
latency, throughput and errors. One request runs first, alone and not counted; its
time is printed on its own line (the server's own warm-up compiles at startup).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time

import numpy as np


@dataclasses.dataclass
class _Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float = 0.0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def _one(client, model: str, prompt: str, max_tokens: int) -> _Result:
    start = time.perf_counter()
    result = _Result(ok=False)
    try:
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and result.ttft is None:
                result.ttft = time.perf_counter() - start
            if chunk.usage is not None:
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.output_tokens = chunk.usage.completion_tokens
        result.ok = result.output_tokens > 0
    except Exception as e:  # counted and reported, the run goes on
        result.error = f"{type(e).__name__}: {e}"
    result.e2e = time.perf_counter() - start
    return result


def _ms(values, q) -> float:
    return float(np.quantile(values, q)) * 1e3 if values else float("nan")


async def _run(args) -> int:
    import openai

    base = args.url.rstrip("/")
    base = base if base.endswith("/v1") else f"{base}/v1"
    client = openai.AsyncOpenAI(
        base_url=base, api_key=args.api_key or "none", max_retries=0, timeout=600
    )
    async with client:
        model = args.model or (await client.models.list()).data[0].id
        rng = random.Random(args.seed)
        letters = "abcdefghijklmnopqrstuvwxyz    "

        def prompt() -> str:
            n = rng.randint(max(1, args.prompt_len // 2), args.prompt_len)
            return "".join(rng.choice(letters) for _ in range(n))

        def outputs() -> int:
            return rng.randint(max(1, args.max_tokens // 2), args.max_tokens)

        first = await _one(client, model, prompt(), 2)
        status = "ok" if first.ok else first.error
        print(f"warm-up request: {first.e2e * 1e3:.0f} ms ({status}; not counted below)")

        limit = asyncio.Semaphore(args.concurrency or args.requests)

        async def limited(p, m):
            async with limit:
                return await _one(client, model, p, m)

        tasks = []
        start = time.perf_counter()
        for _ in range(args.requests):
            tasks.append(asyncio.create_task(limited(prompt(), outputs())))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start

    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    e2e = [r.e2e for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    rows = [
        ("Successful requests", f"{len(ok)}"),
        ("Failed requests", f"{len(errors)}"),
        (
            "Concurrency / request rate",
            f"{args.concurrency or args.requests} / {args.request_rate}",
        ),
        ("Benchmark duration (s)", f"{wall:.2f}"),
        ("Total input tokens", f"{sum(r.prompt_tokens for r in ok)}"),
        ("Total generated tokens", f"{out_tokens}"),
        ("Request throughput (req/s)", f"{len(ok) / wall:.2f}"),
        ("Output token throughput (tok/s)", f"{out_tokens / wall:.1f}"),
        ("TTFT p50 / p99 (ms)", f"{_ms(ttft, 0.5):.1f} / {_ms(ttft, 0.99):.1f}"),
        ("TPOT p50 / p99 (ms)", f"{_ms(tpot, 0.5):.2f} / {_ms(tpot, 0.99):.2f}"),
        ("E2E latency p50 / p99 (ms)", f"{_ms(e2e, 0.5):.0f} / {_ms(e2e, 0.99):.0f}"),
    ]
    print(f"{' Serving Benchmark Result (' + model + ') ':=^56}")
    for name, value in rows:
        print(f"{name + ':':<40}{value:>16}")
    for r in errors[:5]:
        print(f"error: {r.error}")
    return 0 if not errors else 1


def http_bench(args) -> int:
    """``capibara bench-serve --url URL``: see the module docstring."""
    return asyncio.run(_run(args))
