"""RoPE + KV-cache write: one serving step's worth for the ``small`` model's 12 layers
(Hq 12 / Hkv 4, D 64, pages of 16), as a decode step (8 tokens) and as a prefill
chunk (8 rows of 32 tokens), bf16 pools stored as ``uint16`` as the engine keeps them.

The 12 layers' pools are donated and carried from call to call (the function keeps
them), so every row writes in place as the engine's step does; only the rotated q
leaves a call and is checked against the reference. Rows: the xla path (baseline:
the jnp rotation and the uint16 scatter the layer used to run), ``implementation=None``
(on CPU the native kernel where it is built, for at most ``MAX_NATIVE_TOKENS``
tokens) and the native kernel by name. GFLOP/s
count the rotation's 6 flops per rotated pair; the op moves little data, so the
time per call is what matters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara import kernels
from capibara.kernels.bit_views import to_bits
from capibara.kernels.rope_kv_write import MAX_NATIVE_TOKENS, native, reference

LAYERS, HQ, HKV, D, PAGE, PAGES = 12, 12, 4, 64, 16, 49
TOKENS = {"decode": 8, "prefill": 8 * 32}


@functools.cache
def problem(kind: str):
    """(q, k, v, cos, sin, write_pages, write_offsets), pools, expected rotated q."""
    n = TOKENS[kind]
    rng = np.random.default_rng(0)
    bf16 = jnp.bfloat16
    q = jnp.asarray(rng.standard_normal((n, 1, HQ, D)), bf16)
    k = jnp.asarray(rng.standard_normal((n, HKV, D)), bf16)
    v = jnp.asarray(rng.standard_normal((n, HKV, D)), bf16)
    angles = rng.uniform(0, 96, (n, D // 2)).astype(np.float32)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    slots = rng.permutation(PAGES * PAGE)[:n]
    write_pages = jnp.asarray(slots // PAGE, jnp.int32)
    write_offsets = jnp.asarray(slots % PAGE, jnp.int32)
    args = (q, k, v, cos, sin, write_pages, write_offsets)
    pool = to_bits(jnp.asarray(rng.standard_normal((HKV, PAGES, PAGE, D)), bf16))
    expected = reference.rope_kv_write(q, k, v, cos, sin, pool, pool, write_pages, write_offsets)
    return args, pool, expected[0]


def step_function(kind: str, implementation: str | None):
    """``f(q, k, v, cos, sin, pages, offsets) -> rotated q``: every layer's op, its
    pools carried in place from call to call."""
    _, pool, _ = problem(kind)
    pools = [(pool.copy(), pool.copy()) for _ in range(LAYERS)]

    @functools.partial(jax.jit, donate_argnums=0)
    def layers(pools, q, k, v, cos, sin, write_pages, write_offsets):
        outs, new = [], []
        for k_pages, v_pages in pools:
            out, k_pages, v_pages = kernels.rope_kv_write(
                q,
                k,
                v,
                cos,
                sin,
                k_pages,
                v_pages,
                write_pages,
                write_offsets,
                implementation=implementation,
            )
            outs.append(out)
            new.append((k_pages, v_pages))
        return outs[-1], new

    def run(*args):
        nonlocal pools
        out, pools = layers(pools, *args)
        return out

    return run


def _row(measure, kind, impl, implementation, **kw):
    args, _, expected = problem(kind)
    n = TOKENS[kind]
    measure(
        step_function(kind, implementation),
        *args,
        op="rope_kv_write x12 layers",
        shape=f"{kind} {n} tok h{HQ}/{HKV} d{D} page{PAGE}",
        dtype="bf16",
        impl=impl,
        flops=LAYERS * 6.0 * n * (HQ + HKV) * D // 2,
        expected=expected,
        tol_dtype=jnp.bfloat16,
        rounds=50,
        **kw,
    )


@pytest.mark.parametrize("kind", TOKENS)
def bench_xla(measure, kind):
    _row(measure, kind, "xla", "xla", baseline=True)


@pytest.mark.parametrize("kind", TOKENS)
def bench_auto(measure, kind):
    backend = jax.default_backend()
    fits = TOKENS[kind] <= MAX_NATIVE_TOKENS
    default = "native" if backend == "cpu" and native.available() and fits else "xla"
    _row(measure, kind, "auto", None, note=f"{backend} default ({default})")


@pytest.mark.skipif(
    jax.default_backend() != "cpu" or not native.available(),
    reason="the native kernel is built for CPU, with a C++ compiler",
)
@pytest.mark.parametrize("kind", TOKENS)
def bench_native(measure, kind):
    _row(measure, kind, "native", "native")
