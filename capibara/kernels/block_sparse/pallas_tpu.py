"""Block-sparse matmul as Mosaic TPU Pallas kernels (forward, input and weight gradients).

The block schedule (``metadata.py``) reaches the kernel through scalar prefetch, so
the index maps fetch only stored blocks: a zero block is never read from HBM, never
multiplied. The grid is static -- ``(m_tiles, num_steps)`` with one step per stored
block -- and the output tile stays resident in VMEM while consecutive steps
accumulate into it.

All functions take 2-D operands padded to the layout's padded shape and ``M`` padded
to a multiple of ``block_m``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from capibara.kernels import _platform
from capibara.kernels.block_sparse import metadata
from capibara.kernels.block_sparse.layout import BlockLayout


def _accumulate_kernel(
    block_ids_ref,
    in_ids_ref,
    out_ids_ref,
    flags_ref,
    x_ref,
    w_ref,
    o_ref,
    acc_ref,
    *,
    transpose_w: bool,
):
    """One step: ``acc += x_tile @ block`` (or ``@ block.T``), framed by FIRST/LAST."""
    del block_ids_ref, in_ids_ref, out_ids_ref  # used by the index maps only
    flags = flags_ref[pl.program_id(1)]

    @pl.when((flags & metadata.FIRST) != 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((flags & metadata.VALID) != 0)
    def _multiply():
        contract = ((1,), (1,)) if transpose_w else ((1,), (0,))
        acc_ref[...] += jax.lax.dot_general(
            x_ref[...], w_ref[...], (contract, ((), ())), preferred_element_type=jnp.float32
        )

    @pl.when((flags & metadata.LAST) != 0)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _sparse_product(
    x, blocks, schedule, *, in_block, out_block, out_width, transpose_w, block_m, interpret
):
    """Runs ``_accumulate_kernel`` over ``schedule``: ``[M, *] -> [M, out_width]``."""
    m = x.shape[0]
    bk, bn = blocks.shape[1:]

    # Index maps get the grid indices, then the scalar-prefetch refs.
    def x_tile(i, s, block_ids, in_ids, out_ids, flags):  # x[i, in_ids[s]]
        return i, in_ids[s]

    def w_block(i, s, block_ids, in_ids, out_ids, flags):  # blocks[block_ids[s]]
        return block_ids[s], 0, 0

    def out_tile(i, s, block_ids, in_ids, out_ids, flags):  # out[i, out_ids[s]]
        return i, out_ids[s]

    flops = 2 * m * bk * bn * int((schedule.flags & metadata.VALID).astype(bool).sum())
    itemsize = x.dtype.itemsize
    return _platform.pallas_call(
        functools.partial(_accumulate_kernel, transpose_w=transpose_w),
        out_shape=jax.ShapeDtypeStruct((m, out_width), x.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(m // block_m, schedule.num_steps),
            in_specs=[
                pl.BlockSpec((block_m, in_block), x_tile),
                pl.BlockSpec((None, bk, bn), w_block),
            ],
            out_specs=pl.BlockSpec((block_m, out_block), out_tile),
            scratch_shapes=[pltpu.VMEM((block_m, out_block), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=flops,
            transcendentals=0,
            bytes_accessed=(x.size + m * out_width) * itemsize
            + blocks.size * blocks.dtype.itemsize * (m // block_m),
        ),
        interpret=_platform.interpret_params(interpret),
    )(schedule.block_ids, schedule.in_ids, schedule.out_ids, schedule.flags, x, blocks)


def matmul(x, blocks, layout: BlockLayout, *, block_m: int, interpret: bool = False):
    """``x [M, Kp] @ w -> [M, Np]`` in ``x.dtype`` (f32 accumulation)."""
    bk, bn = layout.block_shape
    return _sparse_product(
        x,
        blocks,
        metadata.forward_schedule(layout),
        in_block=bk,
        out_block=bn,
        out_width=layout.padded_shape[1],
        transpose_w=False,
        block_m=block_m,
        interpret=interpret,
    )


def matmul_transposed(dy, blocks, layout: BlockLayout, *, block_m: int, interpret: bool = False):
    """``dy [M, Np] @ w.T -> [M, Kp]``: blocks are read in row order and transposed in VMEM."""
    bk, bn = layout.block_shape
    return _sparse_product(
        dy,
        blocks,
        metadata.transposed_schedule(layout),
        in_block=bn,
        out_block=bk,
        out_width=layout.padded_shape[0],
        transpose_w=True,
        block_m=block_m,
        interpret=interpret,
    )


def _weight_grad_kernel(rows_ref, cols_ref, x_ref, dy_ref, o_ref, acc_ref):
    """Block b, row tile i: ``acc += x[i, rows[b]].T @ dy[i, cols[b]]``."""
    del rows_ref, cols_ref  # used by the index maps only
    i = pl.program_id(1)

    @pl.when(i == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += jax.lax.dot_general(
        x_ref[...], dy_ref[...], (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )

    @pl.when(i == pl.num_programs(1) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def weight_grad(x, dy, layout: BlockLayout, *, block_m: int, out_dtype, interpret: bool = False):
    """``(x.T @ dy)`` at the stored blocks only -> ``[nnz, bk, bn]`` in ``out_dtype``.

    Grid ``(nnz, m_tiles)``: each stored block reduces over the row tiles; the blocks
    that are not stored are never computed.
    """
    m = x.shape[0]
    bk, bn = layout.block_shape

    def x_tile(b, i, rows, cols):  # x[i, rows[b]]
        return i, rows[b]

    def dy_tile(b, i, rows, cols):  # dy[i, cols[b]]
        return i, cols[b]

    def grad_block(b, i, rows, cols):  # dblocks[b]
        return b, 0, 0

    return _platform.pallas_call(
        _weight_grad_kernel,
        out_shape=jax.ShapeDtypeStruct((layout.nnz, bk, bn), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(layout.nnz, m // block_m),
            in_specs=[pl.BlockSpec((block_m, bk), x_tile), pl.BlockSpec((block_m, bn), dy_tile)],
            out_specs=pl.BlockSpec((None, bk, bn), grad_block),
            scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * bk * bn * layout.nnz,
            transcendentals=0,
            bytes_accessed=layout.nnz * (m * (bk + bn) * x.dtype.itemsize + bk * bn * 4),
        ),
        interpret=_platform.interpret_params(interpret),
    )(layout.rows, layout.cols, x, dy)
