"""The oracle: ``x @ w`` with f32 inputs at ``Precision.HIGHEST``."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul(x: jax.Array, w: jax.Array, *, w_transposed: bool) -> jax.Array:
    """``x [M, K] @ w [K, N]`` (``w [N, K]`` with ``w_transposed``) -> f32 ``[M, N]``."""
    spec = "mk,nk->mn" if w_transposed else "mk,kn->mn"
    f32 = jnp.float32
    return jnp.einsum(spec, x.astype(f32), w.astype(f32), precision=jax.lax.Precision.HIGHEST)
