"""Paged decode attention: B=16 sequences of 4096 cached tokens, pages of 16, GQA 32/8,
D=128 -- one decode step of a 16-request batch.

Rows per dtype, all in one process: gather-then-dense (baseline: copy every page into
a dense ``[B, T, Hkv, D]`` cache, then ``jax.nn.dot_product_attention`` with
``key_value_seq_lengths``), ``implementation=None`` (what a user gets: on CPU the
native kernel where it is built, else the one-pass xla path), the xla path and the
native CPU kernel by name, and on TPU the Pallas kernel. The note gives decode tokens/s (B
tokens per call). GFLOP/s count 4·B·Hq·T·D; the op is memory-bound, so the cache
bytes read per second (``bytes_accessed``) is the number that matters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara import kernels
from capibara.kernels.paged_attention import bytes_accessed, flops, native

B, CONTEXT, PAGE, HQ, HKV, D = 16, 4096, 16, 32, 8, 128
PAGES_PER_SEQ = CONTEXT // PAGE
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
SHAPE = f"B{B} ctx{CONTEXT} page{PAGE} h{HQ}/{HKV} d{D}"


@functools.cache
def problem(dtype_name: str):
    """(q, k_pages, v_pages, lengths, page_table, expected); pages shuffled in the pool."""
    rng = np.random.default_rng(0)
    dtype = DTYPES[dtype_name]
    num_pages = B * PAGES_PER_SEQ
    q = jnp.asarray(rng.standard_normal((B, HQ, D)), dtype)
    k_pages = jnp.asarray(rng.standard_normal((HKV, num_pages, PAGE, D)), dtype)
    v_pages = jnp.asarray(rng.standard_normal((HKV, num_pages, PAGE, D)), dtype)
    page_table = jnp.asarray(rng.permutation(num_pages).reshape(B, PAGES_PER_SEQ), jnp.int32)
    lengths = jnp.full((B,), CONTEXT, jnp.int32)
    args = (q, k_pages, v_pages, lengths, page_table)
    expected = jax.jit(functools.partial(kernels.paged_attention, implementation="reference"))(
        *args
    )
    return (*args, expected)


def gather_then_dense(q, k_pages, v_pages, lengths, page_table):
    """The baseline: a dense copy of every sequence's cache, then dense attention."""
    hkv, _, page, d = k_pages.shape
    b, pages_per_seq = page_table.shape

    def dense(pages):  # [Hkv, B, pages_per_seq, page, D] -> [B, T, Hkv, D]
        return pages[:, page_table].reshape(hkv, b, pages_per_seq * page, d).transpose(1, 2, 0, 3)

    out = jax.nn.dot_product_attention(
        q[:, None], dense(k_pages), dense(v_pages), key_value_seq_lengths=lengths
    )
    return out[:, 0]


def _row(measure, benchmark, fn, dtype_name, impl, **kw):
    *args, expected = problem(dtype_name)
    measure(
        fn,
        *args,
        op="paged_attention",
        shape=SHAPE,
        dtype=dtype_name,
        impl=impl,
        flops=flops(B, 1, HQ, CONTEXT, D),
        expected=expected,
        tol_dtype=DTYPES[dtype_name],
        **kw,
    )
    median = benchmark.stats.stats.median
    gbps = bytes_accessed(B, HKV, CONTEXT, D, DTYPES[dtype_name]) / median / 1e9
    note = benchmark.extra_info.get("note", "")
    benchmark.extra_info["note"] = f"{B / median:,.0f} tok/s, {gbps:.1f} GB/s of cache" + (
        f"; {note}" if note else ""
    )


@pytest.mark.parametrize("dtype_name", DTYPES)
def bench_gather_then_dense(measure, benchmark, dtype_name):
    _row(
        measure,
        benchmark,
        jax.jit(gather_then_dense),
        dtype_name,
        "gather+jax.nn",
        baseline=True,
    )


@pytest.mark.parametrize("dtype_name", DTYPES)
def bench_auto(measure, benchmark, dtype_name):
    backend = jax.default_backend()
    default = {"tpu": "pallas", "cpu": "native" if native.available() else "xla"}
    note = f"{backend} default ({default.get(backend, 'xla')})"
    _row(measure, benchmark, jax.jit(kernels.paged_attention), dtype_name, "auto", note=note)


@pytest.mark.parametrize("dtype_name", DTYPES)
def bench_xla(measure, benchmark, dtype_name):
    f = jax.jit(functools.partial(kernels.paged_attention, implementation="xla"))
    _row(measure, benchmark, f, dtype_name, "xla")


@pytest.mark.skipif(
    jax.default_backend() != "cpu" or not native.available(),
    reason="the native kernel is built for CPU, with a C++ compiler",
)
@pytest.mark.parametrize("dtype_name", DTYPES)
def bench_native(measure, benchmark, dtype_name):
    f = jax.jit(functools.partial(kernels.paged_attention, implementation="native"))
    _row(measure, benchmark, f, dtype_name, "native")


@pytest.mark.skipif(
    jax.default_backend() != "tpu", reason="the Pallas kernel is compiled on TPU only"
)
@pytest.mark.parametrize("dtype_name", DTYPES)
def bench_pallas(measure, benchmark, dtype_name):
    f = jax.jit(functools.partial(kernels.paged_attention, implementation="pallas"))
    _row(measure, benchmark, f, dtype_name, "pallas")
