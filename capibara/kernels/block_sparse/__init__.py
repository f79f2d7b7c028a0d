"""Block-sparse matmul: a dense ``x [..., K]`` times a ``BlockSparseMatrix`` ``w [K, N]``.

    w = capibara.kernels.BlockSparseMatrix.prune(dense_w, sparsity=0.9, block_shape=(128, 128))
    y = capibara.kernels.block_sparse_matmul(x, w)          # [..., N]; differentiable in x and w

Implementations (``implementation=``):
  * ``"reference"``: ``x @ w.to_dense()``; the oracle.
  * ``"xla"``: one 2-D dot per run of output block columns over only the stored blocks
    (work proportional to the density); above ``xla.DENSE_DENSITY_THRESHOLDS[dtype]``
    it runs one full-K dot per block column instead (``xla.matmul_dense_columns``),
    which is faster there. The CPU/GPU default.
  * ``"pallas"``: Mosaic TPU kernels (forward, dx, dW) reading the block schedule by
    scalar prefetch; zero blocks are never fetched. The TPU default; ``interpret=True``
    runs them in the Pallas TPU interpreter anywhere.

On a mesh the rows of ``x`` split over ``data``; a matrix re-stored by
``w.split_columns(S)`` (``ColumnShardedLayout``) also splits its blocks and the output
columns over ``model`` when that axis divides ``S``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from capibara.kernels import _mesh, _platform
from capibara.kernels.block_sparse import ops, reference
from capibara.kernels.block_sparse.layout import BlockLayout, ColumnShardedLayout
from capibara.kernels.block_sparse.matrix import BlockSparseMatrix

__all__ = [
    "BlockLayout",
    "BlockSizes",
    "BlockSparseMatrix",
    "ColumnShardedLayout",
    "block_sparse_matmul",
    "bytes_accessed",
    "flops",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tiling of the Pallas kernels; the K and N tiles are the matrix's block shape.

    Attributes:
      block_m: rows of ``x`` per tile (multiple of 8: the TPU sublane). Clamped to the
        number of rows (rounded up to 8), so small batches don't pad to 512.
    """

    block_m: int = 512

    def __post_init__(self):
        if not isinstance(self.block_m, int) or self.block_m <= 0 or self.block_m % 8:
            raise ValueError(f"block_m must be a positive multiple of 8, got {self.block_m=}")

    @classmethod
    def get_default(cls) -> BlockSizes:
        return cls()


def flops(m: int, w: BlockSparseMatrix | BlockLayout) -> int:
    """Useful FLOPs of ``x [m, K] @ w``: 2·m·bk·bn per stored block."""
    layout = w.layout if isinstance(w, BlockSparseMatrix) else w
    if isinstance(layout, ColumnShardedLayout):
        layout = layout.full  # padding blocks do no useful work
    bk, bn = layout.block_shape
    return 2 * m * bk * bn * layout.nnz


def bytes_accessed(m: int, w: BlockSparseMatrix, dtype) -> int:
    """Minimum HBM traffic: read ``x`` and the stored blocks once, write ``y``."""
    k, n = w.shape
    return (m * k + m * n) * jnp.dtype(dtype).itemsize + w.nbytes


def _validate(x, w) -> None:
    if not isinstance(w, BlockSparseMatrix):
        raise TypeError(f"w must be a BlockSparseMatrix, got {type(w).__name__}")
    if x.ndim < 1:
        raise ValueError(f"x must have rank >= 1 ([..., K]), got shape={x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be floating point, got dtype={x.dtype}")
    if x.dtype != w.dtype:
        raise TypeError(f"x and w must share a dtype, got x.dtype={x.dtype}, w.dtype={w.dtype}")
    k, _ = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dim must equal w's K, got x.shape={x.shape}, w.shape={w.shape}")


def block_sparse_matmul(
    x: jax.Array,
    w: BlockSparseMatrix,
    *,
    implementation: str | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """``x [..., K] @ w [K, N] -> [..., N]`` reading only the stored blocks of ``w``.

    Args:
      x: dense ``[..., K]`` (any leading batch dims), f32/bf16/f16; same dtype as ``w``.
      w: ``BlockSparseMatrix`` of logical shape ``[K, N]``.
      implementation: ``None`` (best for the platform, chosen at lowering), ``"pallas"``,
        ``"xla"`` or ``"reference"``.
      interpret: run the Pallas kernel in the Pallas TPU interpreter.
      block_sizes: ``BlockSizes`` of the Pallas kernel; ``None`` = default.

    Returns:
      ``[..., N]`` in ``x.dtype``, accumulated in f32. Differentiable in ``x`` and in
      ``w`` (the gradient is a ``BlockSparseMatrix`` with ``w``'s layout).
    """
    _validate(x, w)
    block_sizes = block_sizes or BlockSizes.get_default()
    if not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be BlockSizes, got {type(block_sizes).__name__}")
    k, n = w.shape
    batch_shape = x.shape[:-1]
    m = math.prod(batch_shape)
    x2d = x.reshape(m, k)
    if isinstance(w.layout, ColumnShardedLayout):
        out = _column_sharded(x2d, w, implementation, interpret, block_sizes)
    else:
        run = _runner(w.layout, implementation, interpret, block_sizes)
        blocks = (None,) * w.blocks.ndim
        out = _mesh.run_per_shard(
            "block_sparse_matmul", run, (x2d, w.blocks), (("rows", None), blocks), ("rows", None)
        )
    return out.reshape(*batch_shape, n)


def _runner(layout: BlockLayout, implementation, interpret, block_sizes):
    """``run(x2d [m, K], blocks [nnz, bk, bn]) -> [m, N]`` for one static layout."""
    (k, n), (kp, _) = layout.shape, layout.padded_shape

    def padded_call(backend: str, x2d, blocks):
        # The kernels work on whole blocks: pad K with zeros, and (pallas) rows to a tile.
        m = x2d.shape[0]  # this shard's rows under a mesh
        block_m = min(block_sizes.block_m, max(8, -(-m // 8) * 8))
        m_pad = -(-m // block_m) * block_m if backend == "pallas" else m
        xp = jnp.pad(x2d, ((0, m_pad - m), (0, kp - k)))
        cfg = ops.OpConfig(layout, backend, block_m, interpret)
        return ops.matmul(xp, blocks, cfg)[:m, :n]

    def reference_call(x2d, blocks):
        return reference.block_sparse_matmul(x2d, BlockSparseMatrix(blocks, layout))

    return _platform.dispatch(
        "block_sparse_matmul",
        implementation,
        interpret,
        {
            "pallas": functools.partial(padded_call, "pallas"),
            "xla": functools.partial(padded_call, "xla"),
            "reference": reference_call,
        },
    )


def _column_sharded(x2d, w: BlockSparseMatrix, implementation, interpret, block_sizes):
    """``x2d @ w`` for a ``ColumnShardedLayout``: each run of blocks gives its group of
    output columns; on a mesh the runs (and the columns) split over ``model``."""
    layout = w.layout
    local, s = layout.local, layout.num_shards
    run = _runner(local, implementation, interpret, block_sizes)
    chunks = w.blocks.reshape(s, local.nnz, *layout.block_shape)
    present = jnp.asarray(layout.present)

    def column_groups(x2d, chunks, present):
        # Padding blocks are zeros by construction; the mask keeps them so (and their
        # gradient zero) whatever an optimizer writes there.
        chunks = jnp.where(present[:, :, None, None], chunks, jnp.zeros((), chunks.dtype))
        return jnp.concatenate([run(x2d, c) for c in chunks], axis=1)

    return _mesh.run_per_shard(
        "block_sparse_matmul",
        column_groups,
        (x2d, chunks, present),
        (("rows", None), ("cols", None, None, None), ("cols", None)),
        ("rows", "cols"),
    )


def lowering_cases():
    """Forward, dx and dW kernels, exported for TPU (see ``capibara.kernels.lowering``)."""
    import numpy as np

    from capibara.kernels.lowering import LoweringCase

    rng = np.random.default_rng(0)
    mask = rng.random((3, 4)) < 0.5
    mask[:, 1] = False  # an empty output column
    w = BlockSparseMatrix.from_dense(np.ones((384, 512), np.float32), (128, 128), mask=mask).astype(
        jnp.bfloat16
    )
    x = jax.ShapeDtypeStruct((256, 384), jnp.bfloat16)
    matmul = functools.partial(block_sparse_matmul, implementation="pallas")

    def forward(x, blocks):
        return matmul(x, BlockSparseMatrix(blocks, w.layout))

    def backward(x, blocks):
        _, vjp = jax.vjp(forward, x, blocks)
        return vjp(jnp.ones((256, 512), jnp.bfloat16))

    return [
        LoweringCase("block_sparse.forward", forward, (x, w.blocks)),
        LoweringCase("block_sparse.backward(dx,dW)", backward, (x, w.blocks)),
    ]
