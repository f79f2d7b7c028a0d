"""Serving the ``small`` config (~125M): greedy generation of 64 tokens after a 32-token
prompt at batch 1, 8 and 32, f32 and bf16 weights.

Rows per (batch, dtype), in one process on the same random weights: transformers'
``generate(do_sample=False)`` (the baseline; PyTorch ``LlamaForCausalLM`` with its
KV cache) and ``CapibaraInference`` (paged KV cache, continuous batching, one jitted
step; ``max_slots`` = ``prefill_rows`` = the batch, so the batch's prompts are prefilled
in one step, as ``generate`` does; the default ``decode_steps``, so the decode steps
run in bursts of up to 8 per dispatch). The timed call generates the whole batch; the note
gives decode tokens/s (``B·63`` tokens after the first / the time after TTFT) and
TTFT (first token of the batch: transformers' ``max_new_tokens=1`` call; the
engine's mean TTFT over the batch's requests). Before timing, each row's first 4
tokens are checked against greedy decoding with Capibara's plain full forward in f32.
FLOPs: 2 per weight per generated token (attention over <100 positions is noise).

Rounds are few (the module must stay under ~8 minutes on 2 CPU cores): alone on the
2-core machine ``make bench K=inference`` took 188-190 s with 3 rounds a row, 12 rows
(133-143 s with one round). Its rows are the slowest to
share the machine: a 27-minute run, alongside other benchmarks, timed transformers'
f32 batch-8 ``generate`` at 97 s (3.3 s alone).

On XLA:CPU the bf16 rows depend on ``capibara.kernels.decode_matmul``'s native kernel (the
decode steps' linears and vocab head; it needs a C++ compiler and an AVX512-BF16
CPU, else XLA's bf16 dot runs: about f32 speed) and on the engine's ``[out, in]``
weight copy (``EngineConfig.out_in_weights``, default on CPU). Every row's attention
runs ``capibara.kernels.paged_attention``'s native kernel, and its RoPE and KV writes
``capibara.kernels.rope_kv_write``'s, where a C++ compiler is on PATH (else the xla paths).
No XLA flag is set.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.torch_peer import llama_with_weights_of
from capibara.core.config import preset
from capibara.core.inference import CapibaraInference, EngineConfig, SamplingParams
from capibara.core.model import CapibaraModel
from capibara.kernels.decode_matmul import native
from capibara.kernels.paged_attention import native as paged_native
from capibara.kernels.rope_kv_write import native as rope_native

PROMPT, NEW = 32, 64
BATCHES = [1, 8, 32]
DTYPES = ["float32", "bfloat16"]
CHECKED = 4  # leading tokens checked against the f32 no-cache reference
ROUNDS = {1: 3, 8: 3, 32: 3}  # medians of 3: one round swung the ratios by +-20 %


@functools.cache
def _model(dtype: str):
    config = preset("small", param_dtype=dtype, compute_dtype=dtype)
    f32 = _f32_model() if dtype != "float32" else None
    model = CapibaraModel(config, rngs=nnx.Rngs(0))
    if f32 is not None:  # the same weights, rounded to bf16
        _, f32_state = nnx.split(f32)
        graphdef, _ = nnx.split(model)
        state = jax.tree.map(lambda x: x.astype(dtype), f32_state)
        model = nnx.merge(graphdef, state)
    return model


def _f32_model():
    return _model("float32")


@functools.cache
def _prompts(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).integers(0, 32000, (batch, PROMPT)).astype(np.int32)


@functools.cache
def _expected(batch: int) -> np.ndarray:
    """int ``[B, CHECKED]``: greedy tokens of the f32 model's full forward (no cache)."""
    model = _f32_model()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t)[0][:, -1].argmax(-1))
    tokens = jnp.asarray(_prompts(batch))
    for _ in range(CHECKED):
        tokens = jnp.concatenate([tokens, forward(state, tokens)[:, None]], axis=1)
    return np.asarray(tokens[:, PROMPT:])


@functools.cache
def _torch_model(dtype: str):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    hf = llama_with_weights_of(_f32_model(), max_positions=256, dtype=dtype)
    hf.generation_config.eos_token_id = None  # always NEW tokens
    hf.generation_config.pad_token_id = None
    return hf


def _row(measure, benchmark, fn, batch, dtype, impl, ttft_fn, **kw):
    measure(
        fn,
        op="serve greedy 32+64",
        shape=f"small(125M) batch {batch}",
        dtype=dtype,
        impl=impl,
        flops=2.0 * _f32_model().config.num_parameters() * batch * NEW,
        expected=_expected(batch),
        tol_dtype=jnp.float32,  # token ids: exact
        rounds=ROUNDS[batch],
        **kw,
    )
    total = benchmark.stats.stats.median
    ttft = ttft_fn()
    decode = batch * (NEW - 1) / max(total - ttft, 1e-9)
    note = benchmark.extra_info.get("note", "")
    benchmark.extra_info["note"] = f"decode {decode:,.0f} tok/s, TTFT {ttft * 1e3:,.0f} ms" + (
        f"; {note}" if note else ""
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
def bench_transformers(measure, benchmark, batch, dtype):
    import torch

    hf = _torch_model(dtype)
    ids = torch.from_numpy(_prompts(batch).astype(np.int64))
    mask = torch.ones_like(ids)

    def generate(new_tokens=NEW):
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens)
        return out[:, PROMPT : PROMPT + CHECKED].numpy()

    def ttft():
        start = time.perf_counter()
        generate(1)
        return time.perf_counter() - start

    _row(
        measure,
        benchmark,
        generate,
        batch,
        dtype,
        "transformers generate",
        ttft,
        baseline=True,
        note=f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    )


def _kernels_note(dtype: str) -> str:
    backend = jax.default_backend()
    if backend != "cpu":
        return f"{backend}: xla kernels"
    natives = []
    if dtype == "bfloat16" and native.available():
        natives.append("decode matmul")
    if paged_native.available():
        natives.append("paged attention")
    if rope_native.available():
        natives.append("rope/kv write")
    return "cpu: " + (f"native {' + '.join(natives)}, " if natives else "") + "xla kernels"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
def bench_capibara(measure, benchmark, batch, dtype):
    pages_per_seq = -(-(PROMPT + NEW) // 16)
    config = EngineConfig(
        max_slots=batch,
        max_seq_len=PROMPT + NEW,
        page_size=16,
        num_pages=batch * pages_per_seq + 1,
        prefill_chunk=PROMPT,
        min_prefill_bucket=PROMPT,
        prefix_cache=False,  # distinct random prompts: nothing to share
        prefill_rows=batch,
    )
    engine = CapibaraInference(_model(dtype), config)
    prompts = [list(p) for p in _prompts(batch)]
    params = SamplingParams(max_tokens=NEW)
    last: list = []

    def generate():
        last[:] = engine.generate_batch(prompts, params)
        return np.asarray([g.token_ids[:CHECKED] for g in last], np.int32)

    try:
        _row(
            measure,
            benchmark,
            generate,
            batch,
            dtype,
            "capibara engine",
            lambda: float(np.mean([g.metrics.ttft for g in last])),  # the last timed run
        )
        benchmark.extra_info["note"] += (
            f"; {_kernels_note(dtype)}, {engine.num_compilations} compiled shapes, "
            f"up to {config.decode_steps} decode steps a dispatch"
        )
    finally:
        engine.close()
