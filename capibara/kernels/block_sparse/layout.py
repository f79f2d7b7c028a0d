"""Static block layout of a block-sparse matrix, computed on the host.

A ``[K, N]`` matrix cut into ``[bk, bn]`` blocks is a ``[K_blocks, N_blocks]`` grid
of blocks; the layout records which of them are stored. It is plain numpy, hashable
and compared by value, so it can ride in a pytree's static aux data: two matrices with
the same sparsity pattern share one compiled kernel.

NOTE: stored blocks are ordered column-major -- by block column, then block row.
Every output block column of ``x @ w`` therefore reads one contiguous run of
``blocks``, which both the XLA path (one 2-D dot per column) and the Pallas kernel
(accumulate while the output block stays put) rely on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which ``[bk, bn]`` blocks of a ``[K, N]`` matrix are stored.

    Attributes:
      shape: logical ``(K, N)`` of the matrix.
      block_shape: ``(bk, bn)``.
      mask: bool ``[K_blocks, N_blocks]``, ``K_blocks = ceil(K / bk)``; read-only.
    """

    shape: tuple[int, int]
    block_shape: tuple[int, int]
    mask: np.ndarray

    def __post_init__(self):
        k, n = self.shape
        bk, bn = self.block_shape
        if min(bk, bn) <= 0:
            raise ValueError(f"block_shape must be positive, got block_shape={self.block_shape}")
        if min(k, n) <= 0:
            raise ValueError(f"matrix shape must be positive, got shape={self.shape}")
        expected = (math.ceil(k / bk), math.ceil(n / bn))
        mask = np.asarray(self.mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"block mask must be boolean, got dtype={mask.dtype}")
        if mask.shape != expected:
            raise ValueError(
                f"block mask shape {mask.shape} does not match the block grid {expected} of "
                f"shape={self.shape} cut into block_shape={self.block_shape}"
            )
        mask = mask.copy()
        mask.setflags(write=False)
        object.__setattr__(self, "mask", mask)

    # -- identity: by value, so equal patterns hit the same jit cache entry --------
    def _key(self):
        return (self.shape, self.block_shape, self.mask.tobytes())

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, BlockLayout) and self._key() == other._key()

    # -- sizes -----------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """``(K_blocks, N_blocks)``."""
        return self.mask.shape

    @property
    def padded_shape(self) -> tuple[int, int]:
        """``(K_blocks * bk, N_blocks * bn)``: the shape the kernels work on."""
        return (self.grid[0] * self.block_shape[0], self.grid[1] * self.block_shape[1])

    @functools.cached_property
    def nnz(self) -> int:
        """Number of stored blocks."""
        return int(self.mask.sum())

    @property
    def density(self) -> float:
        """Fraction of blocks stored, exactly ``nnz / (K_blocks * N_blocks)``."""
        return self.nnz / self.mask.size

    # -- coordinates of the stored blocks, in storage (column-major) order ------------
    @functools.cached_property
    def rows(self) -> np.ndarray:
        """int32 ``[nnz]``: block row of each stored block."""
        return np.nonzero(self.mask.T)[1].astype(np.int32)

    @functools.cached_property
    def cols(self) -> np.ndarray:
        """int32 ``[nnz]``: block column of each stored block."""
        return np.nonzero(self.mask.T)[0].astype(np.int32)

    @functools.cached_property
    def col_ptr(self) -> np.ndarray:
        """int32 ``[N_blocks + 1]``: column j's blocks are ``blocks[col_ptr[j]:col_ptr[j+1]]``."""
        return np.concatenate([[0], np.cumsum(self.mask.sum(axis=0))]).astype(np.int32)

    @functools.cached_property
    def row_major_order(self) -> np.ndarray:
        """int32 ``[nnz]``: storage indices sorted by (row, column), for ``w.T`` access."""
        return np.lexsort((self.cols, self.rows)).astype(np.int32)

    def transpose(self) -> BlockLayout:
        """Layout of ``w.T``: a ``[N, K]`` matrix of ``[bn, bk]`` blocks."""
        return BlockLayout(self.shape[::-1], self.block_shape[::-1], self.mask.T)


@dataclasses.dataclass(frozen=True, eq=False)
class ColumnShardedLayout:
    """A ``BlockLayout`` stored as ``num_shards`` equal runs of blocks, one per group of
    block columns, so the blocks can be split over a mesh axis (the output columns).

    Shard ``j`` owns block columns ``[j·Nb/S, (j+1)·Nb/S)``. Every shard stores the
    blocks of ``local``: the union over the shards of their column groups' patterns
    (one static layout, so every shard runs the same kernel), with zero blocks where its
    own group has none. ``blocks`` is ``[S · local.nnz, bk, bn]``, shard-major; the
    padding blocks are masked out of the product (``present``), so they stay zero and
    get zero gradients. Storage overhead: ``S · local.nnz / full.nnz`` (1 when the
    groups share a pattern).

    Attributes:
      full: the logical layout.
      num_shards: ``S``; must divide the block columns, and ``N`` must be a whole
        number of blocks.
    """

    full: BlockLayout
    num_shards: int

    def __post_init__(self):
        n, bn = self.full.shape[1], self.full.block_shape[1]
        nb = self.full.grid[1]
        if not isinstance(self.num_shards, numbers.Integral) or self.num_shards < 1:
            raise ValueError(f"num_shards must be a positive int, got {self.num_shards!r}")
        object.__setattr__(self, "num_shards", int(self.num_shards))
        if nb % self.num_shards or n % bn:
            raise ValueError(
                f"num_shards={self.num_shards} must divide the {nb} block columns of a "
                f"matrix whose N={n} is a multiple of bn={bn}"
            )

    def _key(self):
        return (self.full._key(), self.num_shards)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, ColumnShardedLayout) and self._key() == other._key()

    @property
    def shape(self) -> tuple[int, int]:
        return self.full.shape

    @property
    def block_shape(self) -> tuple[int, int]:
        return self.full.block_shape

    @property
    def density(self) -> float:
        """The logical matrix's density (padding blocks not counted)."""
        return self.full.density

    @functools.cached_property
    def local(self) -> BlockLayout:
        """``[K, N / S]``: the blocks every shard stores."""
        (k, n), s = self.full.shape, self.num_shards
        kb, nb = self.full.grid
        union = self.full.mask.reshape(kb, s, nb // s).any(axis=1)
        return BlockLayout((k, n // s), self.full.block_shape, union)

    @property
    def nnz(self) -> int:
        """Stored blocks, padding included: ``S · local.nnz``."""
        return self.num_shards * self.local.nnz

    @functools.cached_property
    def source(self) -> np.ndarray:
        """int32 ``[S, local.nnz]``: the index in ``full``'s storage of each stored block,
        -1 for a padding block."""
        kb, nb = self.full.grid
        index = np.full((kb, nb), -1, np.int32)
        index[self.full.rows, self.full.cols] = np.arange(self.full.nnz, dtype=np.int32)
        width = nb // self.num_shards
        cols = self.local.cols[None, :] + width * np.arange(self.num_shards)[:, None]
        return index[self.local.rows[None, :], cols]

    @property
    def present(self) -> np.ndarray:
        """bool ``[S, local.nnz]``: False for padding blocks."""
        return self.source >= 0
