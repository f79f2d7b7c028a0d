"""Load: 200 concurrent async requests, random lengths, random cancellations."""

from __future__ import annotations

import asyncio

import numpy as np
from engine_helpers import make_engine, reference_greedy

from capibara.core.inference import SamplingParams
from capibara.core.inference.metrics import WINDOW

N = 200


def test_200_concurrent_requests_with_cancellations(tiny_model):
    # A small pool (40 usable pages for 8 slots of up to 7 pages) adds preemptions.
    engine = make_engine(tiny_model, num_pages=41)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, N)
    max_tokens = rng.integers(1, 17, N)
    cancel_after = np.where(rng.random(N) < 0.3, rng.uniform(0.0, 0.5, N), np.inf)
    batch = [[int(t) for t in rng.integers(0, 256, n)] for n in lengths]

    async def main():
        tasks = [
            asyncio.create_task(
                engine.generate_async(p, SamplingParams(max_tokens=int(m), temperature=0.0))
            )
            for p, m in zip(batch, max_tokens, strict=True)
        ]

        async def cancel(task, delay):
            await asyncio.sleep(delay)
            task.cancel()

        cancellers = [
            asyncio.create_task(cancel(t, d))
            for t, d in zip(tasks, cancel_after, strict=True)
            if np.isfinite(d)
        ]
        results = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), timeout=300
        )
        await asyncio.gather(*cancellers)
        return results

    results = asyncio.run(main())
    done = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    cancelled = [i for i, r in enumerate(results) if isinstance(r, asyncio.CancelledError)]
    assert len(done) + len(cancelled) == N, [r for r in results if isinstance(r, Exception)]
    assert cancelled, "the random cancellations should hit some requests"
    for i in done:
        assert results[i].finish_reason == "length"
        assert len(results[i].token_ids) == max_tokens[i]
    for i in done[:8]:  # served under load, preemptions included: still the greedy tokens
        assert list(results[i].token_ids) == reference_greedy(tiny_model, batch[i], max_tokens[i])

    m = engine.metrics()
    assert sum(m.requests_finished.values()) == N
    assert m.requests_finished.get("length", 0) == len(done)
    assert m.queue_depth == 0 and m.running == 0
    assert m.e2e_latency.count == N and len(engine._metrics.e2e) <= WINDOW
    # No page leaked: everything not free is held by the prefix cache alone.
    engine._pool.check()
    engine.clear_prefix_cache()
    counts = engine.page_counts()
    assert counts["free"] == counts["capacity"]
    engine.close()
