"""Reference block-sparse matmul: densify, then one matmul. Obviously correct; the oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from capibara.kernels.block_sparse.matrix import BlockSparseMatrix


def block_sparse_matmul(x: jax.Array, w: BlockSparseMatrix) -> jax.Array:
    """``x [..., K] @ w.to_dense() [K, N] -> [..., N]`` at HIGHEST precision, f32 accumulation."""
    out = jnp.einsum(
        "...k,kn->...n",
        x,
        w.to_dense(),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    return out.astype(x.dtype)
