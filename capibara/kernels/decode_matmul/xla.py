"""XLA's dot, inputs in their own dtype, f32 accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul(x: jax.Array, w: jax.Array, *, w_transposed: bool) -> jax.Array:
    """``x [M, K] @ w [K, N]`` (``w [N, K]`` with ``w_transposed``) -> f32 ``[M, N]``.

    A single row of a 16-bit ``x`` is padded to two: XLA:CPU lowers a one-row bf16
    dot to a vector-matrix product that first converts the whole weight to f32 (a
    materialized copy, every call: ~15x the time of the two-row product, which runs
    as one bf16 GEMM with f32 accumulation). f32 keeps one row: its vector path is fast.
    """
    pad = x.shape[0] == 1 and jnp.dtype(x.dtype).itemsize < 4
    rows = jnp.concatenate([x, jnp.zeros_like(x)]) if pad else x
    contract = ((1,), (1,) if w_transposed else (0,))
    y = jax.lax.dot_general(rows, w, (contract, ((), ())), preferred_element_type=jnp.float32)
    return y[:1] if pad else y
