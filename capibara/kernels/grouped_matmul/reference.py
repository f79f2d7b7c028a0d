"""Reference grouped matmuls: a Python loop over the groups, masks, HIGHEST precision.

Obviously correct and slow (every group multiplies every row); the test oracle.
Group sizes are clamped exactly as the kernels clamp them (``metadata.group_bounds``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from capibara.kernels.grouped_matmul import metadata

_HIGHEST = jax.lax.Precision.HIGHEST


def _group_rows(group_sizes, m):
    """``[E, m, 1]`` bool: does row ``r`` belong to group ``g``."""
    starts, ends = metadata.group_bounds(group_sizes, m)
    rows = jnp.arange(m)[None, :, None]
    return (rows >= starts[:, None, None]) & (rows < ends[:, None, None])


def grouped_matmul(lhs, rhs, group_sizes, *, transpose_rhs: bool = False):
    """``[m, k] x [E, k, n] -> [m, n]``: row ``r`` of group ``g`` times ``rhs[g]``."""
    m = lhs.shape[0]
    in_group = _group_rows(group_sizes, m)
    spec = "mk,nk->mn" if transpose_rhs else "mk,kn->mn"
    out = jnp.zeros((m, rhs.shape[1] if transpose_rhs else rhs.shape[2]), jnp.float32)
    for g in range(rhs.shape[0]):
        y = jnp.einsum(spec, lhs, rhs[g], precision=_HIGHEST, preferred_element_type=jnp.float32)
        out = out + jnp.where(in_group[g], y, 0.0)
    return out.astype(lhs.dtype)


def transposed_grouped_matmul(lhs, rhs, group_sizes):
    """``[m, k] x [m, n] -> [E, k, n]``: ``lhs[rows of g].T @ rhs[rows of g]`` per group."""
    in_group = _group_rows(group_sizes, lhs.shape[0])
    out = [
        jnp.einsum(
            "mk,mn->kn",
            jnp.where(in_group[g], lhs, 0),
            rhs,
            precision=_HIGHEST,
            preferred_element_type=jnp.float32,
        )
        for g in range(group_sizes.shape[0])
    ]
    return jnp.stack(out).astype(lhs.dtype)
