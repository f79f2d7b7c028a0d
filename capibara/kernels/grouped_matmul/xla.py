"""Grouped matmul in plain XLA, fast on CPU: one 2-D dot per row chunk of a group.

``jax.lax.ragged_dot`` on XLA CPU multiplies every row by every group's weights
(``E`` times the useful work), and batched dots are several times slower than 2-D
dots there (PALLAS_NOTES.md). This path loops over the groups (``fori_loop``); inside
a group it walks the group's rows in fixed-size chunks, each a 2-D dot against that
group's weights only, so the work is the useful work plus at most one partial chunk
per group:

1. Full chunks of the largest size ``chunks[0]`` while they fit in the group
   (a ``while_loop``: the group's size is a traced value).
2. The remainder, ``< chunks[0]`` rows, by a binary decomposition: one chunk of each
   smaller size that still fits (a ``cond`` each).
3. What is left (``< chunks[-1]`` rows) by one chunk of ``chunks[-1]`` rows whose
   rows outside the group are masked: the forward keeps the output's old rows, the
   weight gradient zeroes the operands' foreign rows.

Every chunk is a ``dynamic_slice`` of static size at a traced row offset, so nothing
is padded or gathered; a masked chunk that would run past the last row is shifted
back to end at ``m`` (its mask still selects exactly the group's rows).

NOTE: 16-bit operands are sliced and updated as same-width unsigned integers
(``_bits``): XLA CPU normalizes a bf16 ``dynamic-slice`` to f32 by converting the
*whole* sliced operand (all ``E`` weight matrices) to f32 and every slice back -- copies
that took about a quarter of the bf16 forward's time before this.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from capibara.kernels.grouped_matmul import metadata

# Row chunk sizes, largest first. Chunks below 64 rows re-read the whole K x N weight
# matrix for little work; 512-row dots ran at least as fast per FLOP as one 4096-row
# dot on this 2-core CPU, 1024-row chunks no faster. The weight gradient reduces over
# rows, so there a larger first chunk means fewer f32 ``[K, N]`` accumulations.
FORWARD_CHUNKS: tuple[int, ...] = (512, 256, 128, 64)
WEIGHT_GRAD_CHUNKS: tuple[int, ...] = (1024, 512, 256, 128, 64)


def _bits(x: jax.Array) -> jax.Array:
    """``x`` as unsigned integers of the same width (see the NOTE above)."""
    return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))


def _chunk_sizes(chunks: tuple[int, ...], m: int) -> tuple[int, ...]:
    return tuple(c for c in chunks if c <= m) or (m,)


def _walk_group(start, end, carry, step, *, chunks: tuple[int, ...], m: int):
    """Runs ``carry = step(carry, pos, size, lo, hi)`` over the chunks covering ``[start, end)``.

    ``step`` gets the chunk's first row ``pos``, its static ``size`` and, for the final
    masked chunk only, the rows ``[lo, hi)`` it must keep (``None`` otherwise).
    """
    biggest, smallest = chunks[0], chunks[-1]

    def full(state):
        pos, carry = state
        return pos + biggest, step(carry, pos, biggest, None, None)

    pos, carry = lax.while_loop(lambda s: s[0] + biggest <= end, full, (start, carry))
    for size in chunks[1:]:

        def smaller(state, size=size):
            pos, carry = state
            return pos + size, step(carry, pos, size, None, None)

        pos, carry = lax.cond(pos + size <= end, smaller, lambda s: s, (pos, carry))

    def masked(state):
        pos, carry = state
        window = jnp.minimum(pos, m - smallest)
        return step(carry, window, smallest, pos, end)

    return lax.cond(pos < end, masked, lambda s: s[1], (pos, carry))


def _row_mask(pos, size, lo, hi):
    rows = pos + lax.broadcasted_iota(jnp.int32, (size, 1), 0)
    return (rows >= lo) & (rows < hi)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    chunks: tuple[int, ...] = FORWARD_CHUNKS,
) -> jax.Array:
    """``out[rows of g] = lhs[rows of g] @ rhs[g]`` (``rhs[g].T`` if ``transpose_rhs``).

    Args:
      lhs: ``[m, k]``, ``m >= 1``.
      rhs: ``[E, k, n]`` (``[E, n, k]`` if ``transpose_rhs``), ``lhs.dtype``.
      group_sizes: int32 ``[E]``, clamped (``metadata.group_bounds``).

    Returns:
      ``[m, n]`` in ``lhs.dtype``; rows owned by no group are zero.
    """
    dtype = lhs.dtype
    m = lhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    starts, ends = metadata.group_bounds(group_sizes, m)
    chunks = _chunk_sizes(chunks, m)
    lhs_bits, rhs_bits = _bits(lhs), _bits(rhs)
    contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))

    def group(g, out):
        w = lax.bitcast_convert_type(lax.dynamic_index_in_dim(rhs_bits, g, keepdims=False), dtype)

        def step(out, pos, size, lo, hi):
            x = lax.bitcast_convert_type(lax.dynamic_slice_in_dim(lhs_bits, pos, size), dtype)
            y = lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=jnp.float32)
            y = _bits(y.astype(dtype))
            if lo is not None:  # keep the rows of the neighbouring groups
                y = jnp.where(
                    _row_mask(pos, size, lo, hi), y, lax.dynamic_slice_in_dim(out, pos, size)
                )
            return lax.dynamic_update_slice_in_dim(out, y, pos, 0)

        return _walk_group(starts[g], ends[g], out, step, chunks=chunks, m=m)

    out = lax.fori_loop(0, rhs.shape[0], group, jnp.zeros((m, n), lhs_bits.dtype))
    return lax.bitcast_convert_type(out, dtype)


def tgmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    out_dtype,
    chunks: tuple[int, ...] = WEIGHT_GRAD_CHUNKS,
) -> jax.Array:
    """``out[g] = lhs[rows of g].T @ rhs[rows of g]`` -> ``[E, k, n]`` in ``out_dtype``.

    Args:
      lhs: ``[m, k]``, ``m >= 1``.
      rhs: ``[m, n]``, ``lhs.dtype``.
      group_sizes: int32 ``[E]``, clamped (``metadata.group_bounds``).
      out_dtype: dtype of the result (accumulation is f32).
    """
    dtype = lhs.dtype
    (m, k), n = lhs.shape, rhs.shape[1]
    num_groups = group_sizes.shape[0]
    starts, ends = metadata.group_bounds(group_sizes, m)
    chunks = _chunk_sizes(chunks, m)
    lhs_bits, rhs_bits = _bits(lhs), _bits(rhs)

    def group(g, out):
        def step(acc, pos, size, lo, hi):
            x = lax.bitcast_convert_type(lax.dynamic_slice_in_dim(lhs_bits, pos, size), dtype)
            y = lax.bitcast_convert_type(lax.dynamic_slice_in_dim(rhs_bits, pos, size), dtype)
            if lo is not None:  # zero the rows of the neighbouring groups
                mask = _row_mask(pos, size, lo, hi)
                x, y = jnp.where(mask, x, 0).astype(dtype), jnp.where(mask, y, 0).astype(dtype)
            return acc + lax.dot_general(
                x, y, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )

        acc = _walk_group(
            starts[g], ends[g], jnp.zeros((k, n), jnp.float32), step, chunks=chunks, m=m
        )
        return lax.dynamic_update_index_in_dim(out, _bits(acc.astype(out_dtype)), g, 0)

    out_bits = _bits(jnp.zeros((), out_dtype)).dtype
    out = lax.fori_loop(0, num_groups, group, jnp.zeros((num_groups, k, n), out_bits))
    return lax.bitcast_convert_type(out, out_dtype)
