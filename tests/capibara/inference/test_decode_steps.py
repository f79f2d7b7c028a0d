"""Multi-step decode (``EngineConfig.decode_steps``): the tokens of one step per
dispatch, bursts bounded by each request's limits and by the pool, and the compiled
loop updating the KV cache in place."""

from __future__ import annotations

import re

import pytest
from engine_helpers import CONFIG, make_engine, prompts, reference_greedy
from flax import nnx

from capibara.core.config import preset
from capibara.core.inference import EngineConfig, SamplingParams, runner
from capibara.core.inference.kv_cache import PagePool
from capibara.core.inference.scheduler import Request, Scheduler, pages_for
from capibara.core.model import CapibaraModel


def _mixed_params(stop_token: int) -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=11),
        SamplingParams(max_tokens=3),
        SamplingParams(max_tokens=13, temperature=0.8, top_k=40, seed=5),
        SamplingParams(max_tokens=12, stop_token_ids=[stop_token]),
        SamplingParams(max_tokens=7, temperature=1.2, top_p=0.9, seed=6),
        SamplingParams(max_tokens=9),
    ]


def test_bursts_give_the_tokens_of_single_steps(tiny_model):
    batch = prompts(6, lengths=(1, 30), seed=21)
    # A stop token the fourth request meets mid-burst: its later tokens are dropped.
    stop_token = reference_greedy(tiny_model, batch[3], 12)[5]
    params = _mixed_params(stop_token)
    results = {}
    for steps in (1, 3, 8):
        with make_engine(tiny_model, decode_steps=steps) as engine:
            gens = engine.generate_batch(batch, params)
            results[steps] = [(g.token_ids, g.finish_reason, g.text) for g in gens]
            counts = engine.page_counts()
            assert counts["free"] + counts["prefix_cache"] == counts["capacity"]
    assert results[3] == results[1] == results[8]
    ids, reason, _ = results[8][3]
    assert reason == "stop" and ids[-1] == stop_token and len(ids) <= 6
    assert [len(r[0]) for r in results[8]][:3] == [11, 3, 13]
    assert list(results[8][0][0]) == reference_greedy(tiny_model, batch[0], 11)


@pytest.mark.parametrize("steps", [1, 8])
def test_metrics_count_every_decode_step(tiny_model, steps):
    with make_engine(tiny_model, decode_steps=steps) as engine:
        engine.generate_batch([[5, 6, 7]], SamplingParams(max_tokens=9))
        # One prefill step (it samples the first token), then 8 decode steps.
        assert engine.metrics().steps == 9
        assert engine.metrics().generated_tokens == 9


def _scheduler(**overrides) -> Scheduler:
    fields = dict(
        max_slots=4,
        max_seq_len=40,
        page_size=4,
        num_pages=40,
        prefill_chunk=8,
        min_prefill_bucket=8,
        prefix_cache=False,
        decode_steps=8,
    )
    config = EngineConfig(**{**fields, **overrides})
    return Scheduler(config, PagePool(config.num_pages), None)


def _request(i: int, prompt_len: int, max_tokens: int) -> Request:
    return Request(
        id=i,
        prompt=[1] * prompt_len,
        params=SamplingParams(max_tokens=max_tokens),
        seed=0,
        stop_ids=frozenset(),
        sink=None,
    )


def _apply(plan) -> None:
    """What the engine records after a plan ran (every token sampled as 0)."""
    for r in plan.decode:
        r.num_cached += plan.steps
        r.output += [0] * plan.steps
    for r, chunk in plan.prefills:
        r.num_cached += chunk
        if r.uncached == 0:
            r.output.append(0)


def test_burst_ends_with_the_first_request_due_to_finish():
    s = _scheduler()
    long, short, near_end = _request(0, 6, 20), _request(1, 6, 5), _request(2, 33, 30)
    for r in (long, short):
        s.add(r)
    plan = s.schedule()
    assert [r for r, _ in plan.prefills] == [long] and plan.steps == 1
    _apply(plan)
    plan = s.schedule()  # long decodes while short prefills: one step
    assert plan.decode == [long] and plan.prefills and plan.steps == 1
    _apply(plan)
    plan = s.schedule()  # both decode: short may make 4 more tokens
    assert plan.decode == [long, short] and not plan.prefills and plan.steps == 4
    for r in plan.decode:  # each row holds the pages of every step of the burst
        assert len(r.pages) == pages_for(r.num_cached + 4, 4)
    _apply(plan)
    assert len(short.output) == 5
    s.remove(short)
    s.add(near_end)  # 33 prompt tokens of max_seq_len 40: at most 7 tokens
    while near_end.uncached > 1:  # its prefill chunks, long decoding beside them
        _apply(s.schedule())
    # Its last prompt token decodes with long (which may make 9 more tokens): 7 left.
    plan = s.schedule()
    assert plan.decode == [long, near_end] and plan.steps == 40 - len(near_end.tokens) == 7


def test_one_step_when_the_pool_cannot_hold_the_burst():
    # 6 usable pages of 4 tokens: two 7-token requests, prefilled together, hold 2
    # pages each; a burst of 8 would need 2 more each, and 2 are free.
    s = _scheduler(num_pages=7, prefill_rows=2)
    rows = [_request(i, 7, 20) for i in range(2)]
    for r in rows:
        s.add(r)
    _apply(s.schedule())
    plan = s.schedule()
    assert plan.decode == rows and plan.steps == 1
    assert [len(r.pages) for r in rows] == [2, 2] and s.pool.num_free == 2


def _hlo_of_decode_programs(model) -> dict[str, str]:
    """Compiled HLO text of the engine's decode-only program and its prefill step."""
    captured = {}
    programs = {"decode_steps": runner._decode_steps, "step": runner._step}

    def spy(name):
        def call(*args):
            captured.setdefault(name, args)
            return programs[name](*args)

        return call

    engine = make_engine(model, prefix_cache=False)
    original = dict(programs)
    try:
        runner._decode_steps, runner._step = spy("decode_steps"), spy("step")
        engine.generate_batch(prompts(2, lengths=(3, 9), seed=3), SamplingParams(max_tokens=5))
    finally:
        runner._decode_steps, runner._step = original["decode_steps"], original["step"]
    cache = engine._runner.cache  # live buffers (the captured ones were donated)
    texts = {}
    for name, args in captured.items():
        at = 4 if name == "decode_steps" else 2
        args = (*args[:at], cache, *args[at + 1 :])
        texts[name] = original[name].lower(*args).compile().as_text()
    engine.close()
    return texts


@pytest.mark.parametrize("implementation", [None, "xla"], ids=["default", "xla"])
def test_compiled_programs_update_the_cache_in_place(implementation):
    config = preset(
        "tiny", param_dtype="bfloat16", compute_dtype="bfloat16", implementation=implementation
    )
    model = CapibaraModel(config, rngs=nnx.Rngs(0))
    hlo = _hlo_of_decode_programs(model)
    assert set(hlo) == {"decode_steps", "step"}
    hd = config.resolved_head_dim
    pool = rf"u16\[{config.num_kv_heads},{CONFIG.num_pages},{CONFIG.page_size},{hd}\]"
    vocab_rows = rf"\[{config.vocab_size},{config.hidden_size}\]"
    for name, text in hlo.items():
        ops = _unfused_instructions(text)
        # No whole pool copied, and no whole-table work (a loop hoisting the embedding
        # gather's conversion out of its body made one per call; fused into the
        # gather, the conversion touches the gathered rows only).
        copies = [op for op in ops if re.search(rf"= {pool}\{{[\d,]+\}} copy\(", op)]
        assert not copies, (name, copies)
        table_ops = [
            op
            for op in ops
            if re.search(rf"= \w+{vocab_rows}", op)
            and not re.search(r"parameter\(|get-tuple-element\(|bitcast\(", op)
        ]
        assert not table_ops, (name, table_ops[:3])


def _unfused_instructions(hlo: str) -> list[str]:
    """The instructions of an HLO module's computations other than fusion bodies."""
    fused = set(re.findall(r"fusion\(.*?calls=(%[\w.\-]+)", hlo))
    ops, keep = [], True
    for line in hlo.splitlines():
        if line and not line.startswith(" "):  # a computation's header (or "}")
            keep = line.removeprefix("ENTRY ").split(" ", 1)[0] not in fused
        elif keep:
            ops.append(line)
    return ops
