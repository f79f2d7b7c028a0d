"""Grouped matmul as Mosaic TPU Pallas kernels: forward (``gmm``) and weight gradient (``tgmm``).

Both kernels walk a *static* grid whose step axis has ``tiles_m + E - 1`` entries,
the most (row tile, group) visits any ``group_sizes`` can need (``metadata.py``).
The schedule -- group bounds, the group and row tile of every step, how many steps
are active -- is computed from ``group_sizes`` with ``jnp`` inside ``jit`` and reaches
the index maps and the kernel bodies by scalar prefetch. Unlike megablox, whose grid
length is ``num_active`` (a traced value), nothing here depends on values at trace
time, so the kernels run in the Pallas TPU interpreter and export for TPU.

* ``gmm``: ``out[rows of g] = lhs[rows of g] @ rhs[g]``. A row tile that straddles a
  group boundary is visited once per group; each visit stores only its group's rows
  (a row mask), and the tile stays resident in VMEM between its consecutive visits.
  Row tiles owned by no group are visited once and written with zeros.
* ``tgmm``: ``out[g] = lhs[rows of g].T @ rhs[rows of g]``. The group's row tiles are
  consecutive steps reducing into one VMEM accumulator; rows of other groups are
  masked to zero before the product; an empty group is visited once, to write zeros.

Operands arrive padded: rows to a multiple of ``block_m``, K and N to multiples of
their tiles (zeros, which add nothing to the products).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from capibara.kernels import _platform
from capibara.kernels.grouped_matmul import metadata

NUM_SCALAR_PREFETCH = 5  # starts, ends, group_ids, m_tile_ids, num_active


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tiles of the Pallas kernels (the same for the forward and both gradients).

    Attributes:
      block_m: rows per tile (multiple of 8: the TPU sublane). Smaller tiles waste
        less work at group boundaries: a tile holding rows of two groups is
        multiplied once per group.
      block_k, block_n: contraction and output-column tiles (multiples of 128: the
        TPU lane).

    Each is clamped to its (rounded-up) problem dimension, so small problems don't
    pad to a whole default tile.
    """

    block_m: int = 128
    block_k: int = 512
    block_n: int = 512

    def __post_init__(self):
        for name, multiple in (("block_m", 8), ("block_k", 128), ("block_n", 128)):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")

    @classmethod
    def get_default(cls) -> BlockSizes:
        return cls()

    def clamped(self, m: int, k: int, n: int) -> BlockSizes:
        """These tiles, shrunk to fit ``[m, k] x [k, n]`` (rows rounded up to 16)."""
        return BlockSizes(
            block_m=min(self.block_m, _round_up(max(m, 1), 16)),
            block_k=min(self.block_k, _round_up(max(k, 1), 128)),
            block_n=min(self.block_n, _round_up(max(n, 1), 128)),
        )


def _row_mask(start, end, row0, shape):
    """``[shape]`` bool: which rows of the tile starting at ``row0`` lie in ``[start, end)``."""
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= start) & (rows < end)


def _tile_has_rows(start, end, row0, block_m):
    """Does the group ``[start, end)`` own any row of the tile ``[row0, row0 + block_m)``?"""
    return jnp.maximum(start, row0) < jnp.minimum(end, row0 + block_m)


def _gmm_kernel(
    starts_ref,
    ends_ref,
    group_ids_ref,
    m_tile_ids_ref,
    num_active_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    acc_ref,
    *,
    block_m: int,
    tiles_k: int,
    transpose_rhs: bool,
):
    """Step ``(n_i, s, k_i)``: ``acc += lhs_tile @ rhs[g]_tile``; at the last K tile store
    the rows of group ``g`` into the resident output tile."""
    s, k_i = pl.program_id(1), pl.program_id(2)
    group, tile = group_ids_ref[s], m_tile_ids_ref[s]
    start, end = starts_ref[group], ends_ref[group]
    row0 = tile * block_m
    active = s < num_active_ref[0]

    @pl.when(active & (k_i == 0))
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active & _tile_has_rows(start, end, row0, block_m))
    def _accumulate():
        contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))
        acc_ref[...] += jax.lax.dot_general(
            lhs_ref[...], rhs_ref[...], (contract, ((), ())), preferred_element_type=jnp.float32
        )

    @pl.when(active & (k_i == tiles_k - 1))
    def _store():
        # NOTE: the first visit of a tile finds uninitialized VMEM in out_ref; rows of
        # later groups are overwritten by their visits, rows of no group must be zero.
        first_visit = (s == 0) | (m_tile_ids_ref[jnp.maximum(s - 1, 0)] != tile)
        previous = jnp.where(first_visit, 0.0, out_ref[...].astype(jnp.float32))
        mask = _row_mask(start, end, row0, out_ref.shape)
        out_ref[...] = jnp.where(mask, acc_ref[...], previous).astype(out_ref.dtype)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    m: int,
    block_sizes: BlockSizes,
    transpose_rhs: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """``lhs [Mp, Kp]`` grouped times ``rhs [E, Kp, Np]`` (``[E, Np, Kp]`` if ``transpose_rhs``).

    Args:
      lhs, rhs: operands padded to whole ``block_sizes`` tiles.
      group_sizes: int32 ``[E]``; clamped to the first ``m`` rows.
      m: the unpadded number of rows.
      block_sizes: the tiles, already clamped to the problem.

    Returns:
      ``[Mp, Np]`` in ``lhs.dtype``; rows owned by no group are zero.
    """
    block_m, block_k, block_n = block_sizes.block_m, block_sizes.block_k, block_sizes.block_n
    m_padded, k_padded = lhs.shape
    num_groups = rhs.shape[0]
    n_padded = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiles_k, tiles_n = k_padded // block_k, n_padded // block_n
    meta = metadata.make_group_metadata(
        group_sizes, m=m, m_padded=m_padded, block_m=block_m, visit_empty_groups=False
    )
    steps = metadata.num_steps(m_padded, block_m, num_groups)

    # Index maps get the grid indices (n_i, s, k_i), then the scalar-prefetch refs.
    # Inactive steps pin k to its last tile, so they fetch nothing new.
    def k_of(s, k_i, num_active):
        return jnp.where(s < num_active[0], k_i, tiles_k - 1)

    def lhs_tile(n_i, s, k_i, starts, ends, group_ids, m_tile_ids, num_active):
        return m_tile_ids[s], k_of(s, k_i, num_active)  # lhs[tile(s), k]

    def rhs_tile(n_i, s, k_i, starts, ends, group_ids, m_tile_ids, num_active):
        k = k_of(s, k_i, num_active)  # rhs[group(s)][k, n] (or [n, k] transposed)
        return (group_ids[s], n_i, k) if transpose_rhs else (group_ids[s], k, n_i)

    def out_tile(n_i, s, k_i, starts, ends, group_ids, m_tile_ids, num_active):
        return m_tile_ids[s], n_i  # out[tile(s), n]

    rhs_block = (None, block_n, block_k) if transpose_rhs else (None, block_k, block_n)
    itemsize = lhs.dtype.itemsize
    return _platform.pallas_call(
        functools.partial(
            _gmm_kernel, block_m=block_m, tiles_k=tiles_k, transpose_rhs=transpose_rhs
        ),
        out_shape=jax.ShapeDtypeStruct((m_padded, n_padded), lhs.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=NUM_SCALAR_PREFETCH,
            grid=(tiles_n, steps, tiles_k),
            in_specs=[
                pl.BlockSpec((block_m, block_k), lhs_tile),
                pl.BlockSpec(rhs_block, rhs_tile),
            ],
            out_specs=pl.BlockSpec((block_m, block_n), out_tile),
            scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * k_padded * n_padded,
            transcendentals=0,
            # lhs once per N tile, one K x N weight slab per step, the output once.
            bytes_accessed=(lhs.size * tiles_n + steps * k_padded * n_padded + m * n_padded)
            * itemsize,
        ),
        interpret=_platform.interpret_params(interpret),
    )(*meta, lhs, rhs)


def _tgmm_kernel(
    starts_ref,
    ends_ref,
    group_ids_ref,
    m_tile_ids_ref,
    num_active_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    acc_ref,
    *,
    block_m: int,
):
    """Step ``(k_i, n_i, s)``: ``acc += lhs_tile[rows of g].T @ rhs_tile[rows of g]``;
    the group's first visit zeroes ``acc``, its last writes ``out[g]``."""
    s = pl.program_id(2)
    num_active = num_active_ref[0]
    group, tile = group_ids_ref[s], m_tile_ids_ref[s]
    start, end = starts_ref[group], ends_ref[group]
    row0 = tile * block_m
    active = s < num_active
    # NOTE: a group's visits are consecutive steps (metadata step 2), so a change of
    # group id between neighbours marks its first and last visit.
    first_visit = (s == 0) | (group_ids_ref[jnp.maximum(s - 1, 0)] != group)
    last_visit = (s == num_active - 1) | (
        group_ids_ref[jnp.minimum(s + 1, num_active - 1)] != group
    )

    @pl.when(active & first_visit)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active & _tile_has_rows(start, end, row0, block_m))
    def _accumulate():
        # Rows of other groups share the tile: zero them in both operands.
        def masked(ref):
            mask = _row_mask(start, end, row0, ref.shape)
            return jnp.where(mask, ref[...].astype(jnp.float32), 0.0).astype(ref.dtype)

        acc_ref[...] += jax.lax.dot(
            masked(lhs_ref).swapaxes(0, 1), masked(rhs_ref), preferred_element_type=jnp.float32
        )

    @pl.when(active & last_visit)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    m: int,
    block_sizes: BlockSizes,
    out_dtype,
    interpret: bool = False,
) -> jax.Array:
    """Per group ``lhs[rows of g].T @ rhs[rows of g]``: ``[Mp, Kp], [Mp, Np] -> [E, Kp, Np]``.

    Args:
      lhs, rhs: operands padded to whole ``block_sizes`` tiles.
      group_sizes: int32 ``[E]``; clamped to the first ``m`` rows.
      m: the unpadded number of rows.
      block_sizes: the tiles, already clamped to the problem.
      out_dtype: dtype of the result (accumulation is f32).
    """
    block_m, block_k, block_n = block_sizes.block_m, block_sizes.block_k, block_sizes.block_n
    m_padded, k_padded = lhs.shape
    n_padded = rhs.shape[1]
    num_groups = group_sizes.shape[0]
    tiles_k, tiles_n = k_padded // block_k, n_padded // block_n
    meta = metadata.make_group_metadata(
        group_sizes, m=m, m_padded=m_padded, block_m=block_m, visit_empty_groups=True
    )
    steps = metadata.num_steps(m_padded, block_m, num_groups)

    # Index maps get the grid indices (k_i, n_i, s), then the scalar-prefetch refs.
    def lhs_tile(k_i, n_i, s, starts, ends, group_ids, m_tile_ids, num_active):
        return m_tile_ids[s], k_i  # lhs[tile(s), k]

    def rhs_tile(k_i, n_i, s, starts, ends, group_ids, m_tile_ids, num_active):
        return m_tile_ids[s], n_i  # rhs[tile(s), n]

    def out_tile(k_i, n_i, s, starts, ends, group_ids, m_tile_ids, num_active):
        return group_ids[s], k_i, n_i  # out[group(s)][k, n]

    itemsize = lhs.dtype.itemsize
    return _platform.pallas_call(
        functools.partial(_tgmm_kernel, block_m=block_m),
        out_shape=jax.ShapeDtypeStruct((num_groups, k_padded, n_padded), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=NUM_SCALAR_PREFETCH,
            grid=(tiles_k, tiles_n, steps),
            in_specs=[
                pl.BlockSpec((block_m, block_k), lhs_tile),
                pl.BlockSpec((block_m, block_n), rhs_tile),
            ],
            out_specs=pl.BlockSpec((None, block_k, block_n), out_tile),
            scratch_shapes=[pltpu.VMEM((block_k, block_n), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * k_padded * n_padded,
            transcendentals=0,
            bytes_accessed=(lhs.size * tiles_n + rhs.size * tiles_k) * itemsize
            + num_groups * k_padded * n_padded * jnp.dtype(out_dtype).itemsize,
        ),
        interpret=_platform.interpret_params(interpret),
    )(*meta, lhs, rhs)
