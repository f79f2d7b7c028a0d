"""The oracle: dequantize to f32, then an f32 matmul at ``Precision.HIGHEST``."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul(x, w, out_dtype):
    """``x [M, K] @ w.dequantize() [K, N]`` in f32, returned in ``out_dtype``."""
    y = jnp.dot(
        x.astype(jnp.float32), w.dequantize(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return y.astype(out_dtype)
