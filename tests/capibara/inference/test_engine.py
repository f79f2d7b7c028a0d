"""Greedy correctness of the engine against a no-cache reference, in every serving mode."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from engine_helpers import CONFIG, make_engine, prompts, reference_greedy
from flax import nnx

from capibara.core import CapibaraInference, EngineConfig, SamplingParams
from capibara.core.config import preset
from capibara.core.model import CapibaraModel

GREEDY = SamplingParams(max_tokens=8)


@pytest.fixture(scope="module")
def mixed_prompts():
    # 16 prompts of 1..40 tokens, and 4 sharing a 2-page prefix (prefix-cache hits).
    shared = prompts(1, lengths=(16, 17), seed=99)[0]
    return prompts(12, seed=1) + [shared + p for p in prompts(4, lengths=(1, 12), seed=2)]


@pytest.fixture(scope="module")
def expected(tiny_model, mixed_prompts):
    return [reference_greedy(tiny_model, p, GREEDY.max_tokens) for p in mixed_prompts]


def test_alone_equals_no_cache_reference(tiny_model, mixed_prompts, expected):
    with make_engine(tiny_model) as engine:
        for prompt, want in zip(mixed_prompts[:4], expected[:4], strict=True):
            [gen] = engine.generate_batch([prompt], GREEDY)
            assert list(gen.token_ids) == want
            assert gen.finish_reason == "length"


@pytest.mark.parametrize(
    "prefix_cache,prefill_rows",
    [(True, 1), (False, 1), (True, 3)],
    ids=["prefix-cache", "no-prefix-cache", "prefix-cache-3-prefill-rows"],
)
def test_batch_of_16_arriving_at_different_times(
    tiny_model, mixed_prompts, expected, prefix_cache, prefill_rows
):
    engine = make_engine(tiny_model, prefix_cache=prefix_cache, prefill_rows=prefill_rows)

    async def one(i, prompt):
        await asyncio.sleep(0.02 * (i % 5))  # staggered arrivals join a running batch
        return await engine.generate_async(prompt, GREEDY)

    async def main():
        return await asyncio.wait_for(
            asyncio.gather(*(one(i, p) for i, p in enumerate(mixed_prompts))), timeout=120
        )

    gens = asyncio.run(main())
    assert [list(g.token_ids) for g in gens] == expected
    m = engine.metrics()
    assert m.requests_finished == {"length": 16}
    assert (m.prefix_cache_hit_rate > 0) == prefix_cache
    # Mixed lengths and arrivals, yet only the bucketed shapes were compiled.
    assert engine.num_compilations <= 1 + len(CONFIG.prefill_buckets)
    engine.close()


def test_streamed_equals_reference(tiny_model, mixed_prompts, expected):
    engine = make_engine(tiny_model)

    async def collect(prompt):
        ids, text, final = [], "", None
        async for event in engine.stream(prompt, GREEDY):
            if event.token_id is not None:
                ids.append(event.token_id)
            text += event.text
            final = event.generation
        return ids, text, final

    async def main():
        return await asyncio.wait_for(
            asyncio.gather(*(collect(p) for p in mixed_prompts[4:10])), timeout=120
        )

    for (ids, text, final), want in zip(asyncio.run(main()), expected[4:10], strict=True):
        assert ids == want == list(final.token_ids)
        assert text == final.text == engine.tokenizer.decode(want)
    engine.close()


def test_compilations_of_a_mixed_workload(tiny_model):
    from capibara.core.inference.runner import _decode_steps, _step

    engine = make_engine(tiny_model)
    engine.generate_batch(prompts(6, lengths=(1, 60), seed=5), SamplingParams(max_tokens=4))
    before = _step._cache_size(), _decode_steps._cache_size()
    # Another mixed workload: new lengths, new batch sizes, bursts of other lengths --
    # nothing new to compile.
    engine.generate_batch(prompts(11, lengths=(1, 70), seed=6), SamplingParams(max_tokens=9))
    assert (_step._cache_size(), _decode_steps._cache_size()) == before
    assert engine.metrics().compilations == engine.num_compilations <= 3
    engine.close()


@pytest.mark.parametrize("prefill_rows", [1, 3], ids=lambda n: f"{n}-prefill-rows")
def test_preemption_when_out_of_pages_still_correct(tiny_model, prefill_rows):
    # 12 usable pages of 8 tokens; 6 requests of ~40 tokens need ~30: most get preempted.
    engine = make_engine(tiny_model, num_pages=13, max_slots=8, prefill_rows=prefill_rows)
    batch = prompts(6, lengths=(20, 33), seed=7)
    params = SamplingParams(max_tokens=12)
    gens = engine.generate_batch(batch, params)
    for prompt, gen in zip(batch, gens, strict=True):
        assert list(gen.token_ids) == reference_greedy(tiny_model, prompt, 12)
    assert engine.metrics().preemptions > 0
    assert sum(g.metrics.preemptions for g in gens) == engine.metrics().preemptions
    engine.clear_prefix_cache()
    assert engine.page_counts()["free"] == engine.page_counts()["capacity"]
    engine.close()


def test_moe_model_matches_reference_and_reports_expert_load():
    model = CapibaraModel(preset("tiny-moe", implementation="xla"), rngs=nnx.Rngs(1))
    engine = make_engine(model)
    batch = prompts(3, lengths=(3, 20), seed=8)
    gens = engine.generate_batch(batch, SamplingParams(max_tokens=5))
    for prompt, gen in zip(batch, gens, strict=True):
        assert list(gen.token_ids) == reference_greedy(model, prompt, 5)
    m = engine.metrics()
    load = np.asarray(m.expert_load)
    assert load.shape == (2, 4)
    # Every real token (prompt and generated, not the last one) is routed top-2 per layer.
    computed = sum(len(p) + 5 - 1 for p in batch)
    np.testing.assert_allclose(load.sum(axis=1), 2 * computed)
    assert m.expert_load_imbalance >= 1.0
    # prometheus-client writes the labels of a sample sorted by name.
    assert 'capibara_expert_tokens_total{expert="0",layer="0"}' in engine.metrics_text()
    engine.close()


def test_mixture_of_depths_is_refused():
    config = preset("tiny-moe", mod_layers=(1,), implementation="xla")
    model = CapibaraModel(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mod_layers"):
        CapibaraInference(model, EngineConfig())
