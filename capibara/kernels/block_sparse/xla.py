"""Block-sparse matmul in plain XLA: work proportional to the stored blocks.

XLA's CPU batched dot is several times slower than its 2-D dot (see
PALLAS_NOTES.md), so a gather-then-einsum over blocks loses to the dense matmul. This
path instead issues one *2-D* dot per run of output block columns that share the same
set of block rows: ``x[:, rows] @ stack(blocks)`` with the stored blocks of those
columns laid side by side. The layout is static, so the loop unrolls at trace time and
every dot has a static shape; a fully dense run degenerates to one plain matmul.

The gathered ``x[:, rows]`` copies are what cost: done over all of ``x`` they stream
through main memory once per output column. So the rows are processed ``XLA_BLOCK_M``
at a time inside a ``lax.scan``: a row tile of ``x`` and its gathers stay in cache.
On a 2-core CPU at x ``[2048, 4096]``, 128x128 blocks, that took density 0.1 from
2.7x to ~4.4x faster than dense and density 0.34 from 0.9x to ~1.6x (tiles of 64,
128, 256 and 512 rows tried; 256 was best).

All functions take 2-D operands already padded to the layout's padded shape:
``x [M, Kp]``, ``dy [M, Np]``, ``blocks [nnz, bk, bn]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from capibara.kernels.bit_views import from_bits, to_bits
from capibara.kernels.block_sparse.layout import BlockLayout


def _column_runs(layout: BlockLayout) -> list[tuple[int, int, np.ndarray]]:
    """Groups consecutive block columns with identical row sets.

    Returns:
      ``(first_col, last_col + 1, rows)`` per run; ``rows`` (int32) is empty for runs
      of all-zero columns. Blocks of the run are ``blocks[col_ptr[first]:col_ptr[end]]``
      in (column, row) order.
    """
    runs = []
    for j in range(layout.grid[1]):
        rows = layout.rows[layout.col_ptr[j] : layout.col_ptr[j + 1]]
        if runs and np.array_equal(runs[-1][2], rows):
            runs[-1][1] = j + 1
        else:
            runs.append([j, j + 1, rows])
    return [(a, b, rows) for a, b, rows in runs]


def _take_block_columns(x: jax.Array, rows: np.ndarray, block: int) -> jax.Array:
    """``x [M, Kb*block]`` -> ``[M, len(rows)*block]``: the block columns ``rows``.

    One slice per run of consecutive rows, then one concatenate: on this CPU that copies
    1.2-1.4x faster than an indexed gather of the same columns.
    """
    num_blocks = x.shape[1] // block
    if len(rows) == num_blocks:  # every block: no copy
        return x
    if len(rows) == 0:
        return x[:, :0]
    starts = [i for i, r in enumerate(rows) if i == 0 or r != rows[i - 1] + 1]
    ends = [*starts[1:], len(rows)]
    spans = [(rows[a], rows[b - 1] + 1) for a, b in zip(starts, ends, strict=True)]
    return _concatenate([x[:, lo * block : hi * block] for lo, hi in spans], axis=1)


def _dot(a, b, dims=((1,), (0,))):
    return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


XLA_BLOCK_M = 256  # rows per scan step of the forward and input-gradient products


def matmul(x: jax.Array, blocks: jax.Array, layout: BlockLayout) -> jax.Array:
    """``x [M, Kp] @ w`` -> ``[M, Np]`` in ``x.dtype`` (f32 accumulation, rounded once),
    ``XLA_BLOCK_M`` rows per scan step."""
    m, kp = x.shape
    runs = _column_runs(layout)
    # Built once, before the scan: XLA does not hoist these copies out of the loop by
    # itself, and redoing them per row tile cost ~10 % at density 0.34.
    weights = [_run_weight(blocks, layout, run) for run in runs]
    full = m // XLA_BLOCK_M * XLA_BLOCK_M
    if full <= XLA_BLOCK_M:
        return _matmul_rows(x, weights, runs, layout)
    tiles = x[:full].reshape(full // XLA_BLOCK_M, XLA_BLOCK_M, kp)

    def step(_, tile):  # 16-bit tiles leave the scan as uint16 (see bit_views)
        return None, to_bits(_matmul_rows(tile, weights, runs, layout))

    _, out = jax.lax.scan(step, None, tiles)
    out = from_bits(out, x.dtype).reshape(full, -1)
    if full < m:  # the remainder rows: one more (smaller) call, no padding copy
        rest = _matmul_rows(x[full:], weights, runs, layout)
        out = _concatenate([out, rest], axis=0)
    return out


def _run_weight(blocks: jax.Array, layout: BlockLayout, run) -> jax.Array | None:
    """The dense ``[rows * bk, cols * bn]`` sub-matrix of one column run (None if empty)."""
    first, end, rows = run
    if len(rows) == 0:
        return None
    bk, bn = layout.block_shape
    stored = blocks[layout.col_ptr[first] : layout.col_ptr[end]]
    # [cols, rows, bk, bn] -> [rows, bk, cols, bn]
    w_run = stored.reshape(end - first, len(rows), bk, bn).transpose(1, 2, 0, 3)
    return w_run.reshape(len(rows) * bk, (end - first) * bn)


def _matmul_rows(x: jax.Array, weights: list, runs: list, layout: BlockLayout) -> jax.Array:
    """``x [m, Kp] @ w`` -> ``[m, Np]`` in ``x.dtype`` for one row tile: one dot per
    column run."""
    (bk, bn), m = layout.block_shape, x.shape[0]
    outs = []
    for (first, end, rows), w_run in zip(runs, weights, strict=True):
        if w_run is None:
            outs.append(jnp.zeros((m, (end - first) * bn), x.dtype))
        else:
            outs.append(_dot(_take_block_columns(x, rows, bk), w_run).astype(x.dtype))
    return _concatenate(outs, axis=1)


def matmul_transposed(dy: jax.Array, blocks: jax.Array, layout: BlockLayout) -> jax.Array:
    """``dy [M, Np] @ w.T`` -> ``[M, Kp]`` in ``dy.dtype`` (the input gradient)."""
    blocks_t = blocks[layout.row_major_order].transpose(0, 2, 1)
    return matmul(dy, blocks_t, layout.transpose())


def weight_grad(x: jax.Array, dy: jax.Array, layout: BlockLayout) -> jax.Array:
    """``(x.T @ dy)`` at the stored blocks only -> f32 ``[nnz, bk, bn]``."""
    (bk, bn) = layout.block_shape
    grads = []
    for first, end, rows in _column_runs(layout):
        if len(rows) == 0:
            continue
        # [rows * bk, cols * bn] = x_rows.T @ dy_cols, then back to storage order.
        g = _dot(_take_block_columns(x, rows, bk), dy[:, first * bn : end * bn], ((0,), (0,)))
        g = g.reshape(len(rows), bk, end - first, bn).transpose(2, 0, 1, 3)
        grads.append(g.reshape(-1, bk, bn))
    if not grads:
        return jnp.zeros((0, bk, bn), jnp.float32)
    return grads[0] if len(grads) == 1 else jnp.concatenate(grads, axis=0)


def dense_columns(blocks: jax.Array, layout: BlockLayout) -> list[jax.Array]:
    """``blocks [nnz, bk, bn]`` -> ``N_blocks`` zero-filled dense ``[Kp, bn]`` block columns.

    Stored blocks are column-major, so a fully stored column is a contiguous slice of
    ``blocks``; a partly stored one is filled by a gather of whole blocks from its own
    slice. Each column is its own small fusion that the dot after it reads from cache.
    Either way this is cheaper than building the row-major ``[Kp, Np]`` matrix, which
    interleaves rows of all the blocks of a block row (a transpose of the whole weight;
    ~15 % of a dense matmul's time here), and cheaper than filling one ``[N_blocks, Kp,
    bn]`` array first (single-core A/B: f32 0.83-0.93x -> 0.91-1.02x dense).
    """
    (kb, nb), (bk, bn) = layout.grid, layout.block_shape
    bits = to_bits(blocks)
    columns = []
    for j in range(nb):
        first, end = layout.col_ptr[j], layout.col_ptr[j + 1]
        stored = bits[first:end]
        if end == first:
            stored = jnp.zeros((kb, bk, bn), bits.dtype)
        elif end - first < kb:
            index = np.zeros(kb, np.int32)
            index[layout.rows[first:end]] = np.arange(end - first, dtype=np.int32)
            stored = jnp.where(layout.mask[:, j, None, None], stored[index], 0)
        columns.append(from_bits(stored.reshape(kb * bk, bn), blocks.dtype))
    return columns


def matmul_dense_columns(x: jax.Array, blocks: jax.Array, layout: BlockLayout) -> jax.Array:
    """``x [M, Kp] @ w`` -> ``[M, Np]`` in ``x.dtype``: one full-``K`` 2-D dot per block
    column, accumulated in f32 and rounded once.

    The dense route of ``implementation=None`` on CPU: the same FLOPs as a dense matmul
    (zero blocks included) without re-laying the weight out as ``[Kp, Np]``. XLA's 2-D
    dot with ``N = bn`` columns runs as fast per FLOP as one wide dot here.
    """
    outs = [_dot(x, column).astype(x.dtype) for column in dense_columns(blocks, layout)]
    return _concatenate(outs, axis=1)


def _concatenate(pieces: list[jax.Array], axis: int) -> jax.Array:
    """``jnp.concatenate``, moving 16-bit floats as uint16 (see ``capibara.kernels.bit_views``)."""
    if len(pieces) == 1:
        return pieces[0]
    dtype = pieces[0].dtype
    return from_bits(jnp.concatenate([to_bits(p) for p in pieces], axis=axis), dtype)


def dense_is_faster(layout: BlockLayout, dtype) -> bool:
    """Cost model for ``implementation=None`` on CPU: take the dense route?

    The blocked path pays a gather of ``x`` per run of columns and small dots; the dense
    route (``matmul_dense_columns``) pays the zero blocks' FLOPs. Where they cross was
    measured on a 2-core CPU at x ``[2048, 4096]`` @ w ``[4096, 4096]``, 128x128 blocks,
    as ratios to the dense matmul: f32 blocked 1.11x / 0.98x at density 0.5 / 0.6 against
    1.04x / 1.01x for the dense route; bf16 blocked 1.01x / 0.85x against 0.90x / 0.91x
    (bf16 dots run twice as fast as f32 ones; the gathers do not).
    """
    return layout.density > DENSE_DENSITY_THRESHOLDS.get(jnp.dtype(dtype).name, 0.6)


# Density above which the dense route wins, by the dtype of ``x``.
DENSE_DENSITY_THRESHOLDS = {"float32": 0.6, "bfloat16": 0.55}
