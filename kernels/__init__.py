"""Capibara kernels: Pallas TPU kernels with XLA and reference implementations.

Every op takes ``implementation=None | "pallas" | "xla" | "reference"``,
``interpret=False`` and ``block_sizes=None``; see ``kernels/_platform.py`` for which
implementation runs where.
"""

from kernels.block_sparse import BlockSparseMatrix, block_sparse_matmul

__all__ = [
    "BlockSparseMatrix",
    "block_sparse_matmul",
]
