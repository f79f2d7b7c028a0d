"""Compile every step shape of an engine before it serves (or is measured).

The engine compiles one decode program and one step per prefill bucket, each the
first time a step of that shape runs (``runner.py``). Unwarmed, the first requests
pay those compilations in their latency: a new user's first ``bench-serve`` reported
89 tokens/s and a TTFT of 4,178 ms where the same run, warm, gave 6,960 tokens/s and
22 ms. ``warm_up`` runs one short request per bucket, one at a time, so that each
compiles its own shape (requests prefilled together share the largest bucket).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from capibara.core.inference.params import SamplingParams


@dataclasses.dataclass(frozen=True)
class WarmUp:
    """What ``warm_up`` did: wall seconds and the step shapes compiled by then."""

    seconds: float
    shapes: int
    buckets: tuple[int, ...]


def warm_up(engine, *, reset_metrics: bool = True) -> WarmUp:
    """Runs a 2-token request per prefill bucket of ``engine`` (prompt length = the
    bucket, capped to the context), then clears the prefix cache and, unless told
    otherwise, the metrics, so that nothing served later counts the warm-up.

    Returns a ``WarmUp`` (its ``seconds`` is mostly XLA compilation on a fresh process;
    shapes another engine of the same sizes compiled already are found in jit's cache).
    """
    rng = np.random.default_rng(0)
    vocab = engine.model.config.vocab_size
    # 2 new tokens: the prefill step samples the first, a decode program the second.
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    longest = engine.max_context - params.max_tokens
    buckets = engine.config.prefill_buckets
    start = time.perf_counter()
    for bucket in buckets:
        n = max(1, min(bucket, longest))
        engine.generate_batch([[int(t) for t in rng.integers(0, vocab, n)]], params)
    seconds = time.perf_counter() - start
    engine.clear_prefix_cache()
    if reset_metrics:
        engine.reset_metrics()
    return WarmUp(seconds=seconds, shapes=engine.num_compilations, buckets=buckets)
