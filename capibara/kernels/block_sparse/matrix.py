"""``BlockSparseMatrix``: a ``[K, N]`` weight stored as its non-zero ``[bk, bn]`` blocks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from capibara.kernels.block_sparse.layout import BlockLayout, ColumnShardedLayout


def _check_block_shape(block_shape) -> tuple[int, int]:
    if (
        not isinstance(block_shape, tuple | list)
        or len(block_shape) != 2
        or not all(isinstance(b, int | np.integer) for b in block_shape)
    ):
        raise ValueError(f"block_shape must be a pair of ints (bk, bn), got {block_shape=}")
    bk, bn = (int(b) for b in block_shape)
    if bk <= 0 or bn <= 0:
        raise ValueError(f"block_shape must be positive, got {block_shape=}")
    return bk, bn


def _check_weight(w) -> np.ndarray:
    if isinstance(w, jax.core.Tracer):
        raise TypeError(
            "BlockSparseMatrix constructors read the weight on the host to fix the block "
            "layout; call them outside jit (got a traced array)"
        )
    w_np = np.asarray(w)
    if w_np.ndim != 2:
        raise ValueError(f"weight must be 2-D [K, N], got shape={w_np.shape}")
    if not jnp.issubdtype(w_np.dtype, jnp.floating):
        raise TypeError(f"weight must be floating point, got dtype={w_np.dtype}")
    return w_np


def _blocked(w: np.ndarray, block_shape: tuple[int, int]) -> np.ndarray:
    """``[K, N]`` -> zero-padded ``[K_blocks, N_blocks, bk, bn]``."""
    (k, n), (bk, bn) = w.shape, block_shape
    kb, nb = math.ceil(k / bk), math.ceil(n / bn)
    padded = np.zeros((kb * bk, nb * bn), w.dtype)
    padded[:k, :n] = w
    return padded.reshape(kb, bk, nb, bn).transpose(0, 2, 1, 3)


def densify(blocks: jax.Array, layout: BlockLayout | ColumnShardedLayout) -> jax.Array:
    """``blocks [nnz, bk, bn]`` -> the zero-padded ``[K_blocks * bk, N_blocks * bn]`` matrix."""
    if isinstance(layout, ColumnShardedLayout):
        local, s = layout.local, layout.num_shards
        chunks = blocks.reshape(s, local.nnz, *layout.block_shape)
        present = jnp.asarray(layout.present)[:, :, None, None]
        chunks = jnp.where(present, chunks, jnp.zeros((), blocks.dtype))
        return jnp.concatenate([densify(c, local) for c in chunks], axis=1)
    (kb, nb), (bk, bn) = layout.grid, layout.block_shape
    grid = jnp.zeros((kb, nb, bk, bn), blocks.dtype).at[layout.rows, layout.cols].set(blocks)
    return grid.transpose(0, 2, 1, 3).reshape(kb * bk, nb * bn)


@jax.tree_util.register_pytree_node_class
class BlockSparseMatrix:
    """A ``[K, N]`` matrix stored as its non-zero ``[bk, bn]`` blocks.

    The only array leaf is ``blocks [nnz, bk, bn]``; the ``layout`` (which blocks are
    stored, see ``BlockLayout``) is static pytree metadata, fixed on the host when the
    matrix is built. Gradients with respect to a ``BlockSparseMatrix`` are again
    ``BlockSparseMatrix`` values with the same layout: only stored blocks get one.

    Blocks are zero-padded where ``K`` or ``N`` is not a multiple of the block shape.
    ``split_columns`` re-stores the matrix so its blocks split over a mesh axis along
    the output columns (``ColumnShardedLayout``).
    """

    def __init__(self, blocks: jax.Array, layout: BlockLayout | ColumnShardedLayout):
        bk, bn = layout.block_shape
        if tuple(blocks.shape) != (layout.nnz, bk, bn):
            raise ValueError(
                f"blocks shape {tuple(blocks.shape)} does not match the layout: expected "
                f"(nnz, bk, bn) = {(layout.nnz, bk, bn)}"
            )
        self.blocks = blocks
        self.layout = layout

    # -- pytree --------------------------------------------------------------------
    def tree_flatten(self):
        return (self.blocks,), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        obj = object.__new__(cls)
        (obj.blocks,) = children
        obj.layout = layout
        return obj

    # -- constructors ----------------------------------------------------------------
    @classmethod
    def from_dense(cls, w, block_shape, mask=None) -> BlockSparseMatrix:
        """Stores the blocks of a dense ``w [K, N]``.

        Args:
          w: concrete ``[K, N]`` floating-point array (read on the host).
          block_shape: ``(bk, bn)``; need not divide ``(K, N)`` (edges are zero-padded).
          mask: optional bool ``[ceil(K/bk), ceil(N/bn)]``: store exactly these blocks
            (values outside them are dropped). Default: every block holding a non-zero.
        """
        w_np = _check_weight(w)
        block_shape = _check_block_shape(block_shape)
        blocked = _blocked(w_np, block_shape)
        if mask is None:
            mask = np.any(blocked != 0, axis=(2, 3))
        else:
            if isinstance(mask, jax.core.Tracer):
                raise TypeError("mask must be concrete (a host array), got a traced array")
            mask = np.asarray(mask)
        layout = BlockLayout(tuple(w_np.shape), block_shape, mask)
        blocks = blocked[layout.rows, layout.cols]
        return cls(jnp.asarray(blocks, dtype=w_np.dtype), layout)

    @classmethod
    def prune(cls, w, sparsity: float, block_shape) -> BlockSparseMatrix:
        """Keeps the blocks of ``w`` with the largest Frobenius norm.

        Exactly ``round((1 - sparsity) * num_blocks)`` blocks are kept (ties broken by
        position), so ``result.density`` reports the fraction actually kept, which
        differs from ``1 - sparsity`` only by the rounding to whole blocks.

        Args:
          w: concrete ``[K, N]`` floating-point array.
          sparsity: fraction of blocks to drop, in ``[0, 1]``.
          block_shape: ``(bk, bn)``.
        """
        w_np = _check_weight(w)
        block_shape = _check_block_shape(block_shape)
        if not 0.0 <= float(sparsity) <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity=}")
        blocked = _blocked(w_np, block_shape)
        norms = np.sqrt(np.sum(np.square(blocked.astype(np.float64)), axis=(2, 3)))
        keep = round((1.0 - float(sparsity)) * norms.size)
        # Stable sort on -norm: equal norms keep the earlier (row-major) block.
        order = np.argsort(-norms.ravel(), kind="stable")[:keep]
        mask = np.zeros(norms.size, bool)
        mask[order] = True
        return cls.from_dense(w_np, block_shape, mask.reshape(norms.shape))

    def split_columns(self, num_shards: int) -> BlockSparseMatrix:
        """The same matrix stored in ``num_shards`` equal runs of blocks, one per group of
        block columns (``ColumnShardedLayout``): place ``blocks`` split over the mesh's
        ``model`` axis (``P("model")``) and ``block_sparse_matmul`` computes each
        shard's output columns from its own blocks."""
        if isinstance(self.layout, ColumnShardedLayout):
            raise ValueError(f"already split into {self.layout.num_shards} column shards")
        layout = ColumnShardedLayout(self.layout, num_shards)
        source = jnp.asarray(np.maximum(layout.source, 0).reshape(-1))
        present = jnp.asarray(layout.present.reshape(-1))[:, None, None]
        blocks = jnp.where(present, self.blocks[source], jnp.zeros((), self.blocks.dtype))
        return BlockSparseMatrix(blocks, layout)

    # -- views -----------------------------------------------------------------------
    def to_dense(self) -> jax.Array:
        """The ``[K, N]`` dense matrix (zeros outside the stored blocks)."""
        k, n = self.layout.shape
        return densify(self.blocks, self.layout)[:k, :n]

    def astype(self, dtype) -> BlockSparseMatrix:
        return BlockSparseMatrix(self.blocks.astype(dtype), self.layout)

    @property
    def shape(self) -> tuple[int, int]:
        return self.layout.shape

    @property
    def block_shape(self) -> tuple[int, int]:
        return self.layout.block_shape

    @property
    def dtype(self):
        return self.blocks.dtype

    @property
    def density(self) -> float:
        """Fraction of blocks stored (exact: ``nnz / num_blocks``)."""
        return self.layout.density

    @property
    def nbytes(self) -> int:
        """Bytes of the stored blocks plus their int32 row/column indices."""
        return int(self.blocks.size) * self.blocks.dtype.itemsize + 2 * 4 * self.layout.nnz

    def __repr__(self):
        return (
            f"BlockSparseMatrix(shape={self.shape}, block_shape={self.block_shape}, "
            f"dtype={self.dtype}, nnz={self.layout.nnz}, density={self.density:.4f})"
        )
