"""Quantized decode matmul: a few rows times SmolLM2-135M's layer weights, bf16 vs int8
vs int4.

A decode step reads every weight once per step, so its time is the weights' bytes over
the memory bandwidth: int8 halves them, int4 (groups of 32 with f32 scale and min,
GGUF's Q4_1 layout) streams 0.75 bytes a weight. Each case chains all 210 layer
products of the model (30 layers × q, k, v, o, gate, up, down; 106 M weights, more
bytes than the L3 cache, as in a real step) and feeds every product back into the next
input, so the calls run one after another.

Rows per case, in one process: the bf16 ``decode_matmul`` on the engine's ``[N, K]``
serving layout (the baseline: what the engine runs today), ``quantized_matmul`` int8
per channel and int4, each with ``implementation=None`` (the native kernel on CPU up
to ``native.MAX_ROWS`` rows, xla beyond) and, for int4, the xla path forced. The note
gives the weight bytes streamed per second.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara import kernels
from capibara.kernels.quantized_matmul import native

LAYERS = 30
# SmolLM2-135M: d 576, 9 heads / 3 kv heads of 64, ffn 1536. (K, N) as x @ w.
LAYER_SHAPES = [
    (576, 576),
    (576, 192),
    (576, 192),
    (576, 576),
    (576, 1536),
    (576, 1536),
    (1536, 576),
]
ROWS = [1, 4, 8, 32]
FEEDBACK = 1e-3
WIDTH = 1536  # x carries the widest K; each product reads its first K columns


@functools.cache
def weights():
    """Float ``[K, N]`` weights of every layer product (fixed seed)."""
    rng = np.random.default_rng(0)
    return [
        (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
        for _ in range(LAYERS)
        for s in LAYER_SHAPES
    ]


@functools.cache
def stored(kind: str):
    ws = weights()
    if kind == "bf16":
        return [jnp.asarray(w.T, jnp.bfloat16) for w in ws]  # [N, K] serving layout
    if kind == "int8":
        return [kernels.quantize(w, 8) for w in ws]
    return [kernels.quantize(w, 4, 32) for w in ws]


def stored_bytes(kind: str) -> int:
    ws = stored(kind)
    return sum(w.size * 2 for w in ws) if kind == "bf16" else sum(w.nbytes for w in ws)


def chain(kind: str, implementation=None):
    """jit of: for each weight, ``y = x[:, :K] @ w`` then ``x[:, 0] += FEEDBACK · y[:, 0]``."""

    def product(x, w):
        if kind == "bf16":
            k = w.shape[1]
            return kernels.decode_matmul(
                x[:, :k], w, w_transposed=True, implementation=implementation
            )
        return kernels.quantized_matmul(
            x[:, : w.shape[0]],
            w,
            implementation=implementation,
            preferred_element_type=jnp.float32,
        )

    @jax.jit
    def run(x, ws):
        for w in ws:
            y = product(x, w)
            x = x.at[:, 0].add((FEEDBACK * y[:, 0]).astype(x.dtype))
        return y

    return run


@functools.cache
def problem(m: int, kind: str):
    """(x [m, WIDTH] bf16, expected f32 output of the last product: the same chain on
    each op's f32 reference)."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal((m, WIDTH)), jnp.bfloat16)
    return x, chain(kind, "reference")(x, stored(kind))


def _row(measure, benchmark, m, kind, impl_label, implementation=None, **kw):
    x, expected = problem(m, kind)
    flops = 2.0 * m * sum(k * n for k, n in LAYER_SHAPES) * LAYERS
    measure(
        chain(kind, implementation),
        x,
        stored(kind),
        op="quantized decode matmul",
        shape=f"SmolLM2 {LAYERS}x7 products, {m} rows",
        dtype="bf16 x",
        impl=impl_label,
        flops=flops,
        expected=expected,
        tol_dtype=jnp.bfloat16,
        rounds=20,
        **kw,
    )
    gbps = stored_bytes(kind) / benchmark.stats.stats.median / 1e9
    note = benchmark.extra_info.get("note", "")
    benchmark.extra_info["note"] = f"{gbps:.1f} GB/s of weights" + (f"; {note}" if note else "")


def _auto_note(m: int) -> str:
    if jax.default_backend() == "cpu" and native.available() and m <= native.MAX_ROWS:
        return "native"
    return "xla"


@pytest.mark.parametrize("m", ROWS, ids=[f"m{m}" for m in ROWS])
def bench_bf16(measure, benchmark, m):
    _row(measure, benchmark, m, "bf16", "bf16 decode_matmul", baseline=True)


@pytest.mark.parametrize("m", ROWS, ids=[f"m{m}" for m in ROWS])
def bench_int8(measure, benchmark, m):
    _row(measure, benchmark, m, "int8", f"int8 per-channel ({_auto_note(m)})")


@pytest.mark.parametrize("m", ROWS, ids=[f"m{m}" for m in ROWS])
def bench_int4(measure, benchmark, m):
    _row(measure, benchmark, m, "int4", f"int4 g32+min ({_auto_note(m)})")


@pytest.mark.parametrize("m", [1, 8], ids=["m1", "m8"])
def bench_int4_xla(measure, benchmark, m):
    _row(measure, benchmark, m, "int4", "int4 g32+min (xla forced)", implementation="xla")
