"""``sparsify``: prune a model's linears to block-sparse and run them as block-sparse matmuls."""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from capibara.core.layers import Attention, Linear, SwiGLU
from capibara.kernels.block_sparse import BlockSparseMatrix

TARGETS = ("mlp", "attention")


@dataclasses.dataclass(frozen=True)
class SparsifyReport:
    """What ``sparsify`` changed.

    Attributes:
      linears: dotted paths of the linears made block-sparse.
      dense_params: weights in those linears before.
      kept_params: weights stored after (whole kept blocks, padding excluded).
      column_sharded: the linears stored in ``column_shards`` runs of blocks (those
        whose block columns ``column_shards`` divides; the others are stored whole).
    """

    linears: tuple[str, ...]
    dense_params: int
    kept_params: int
    column_sharded: tuple[str, ...] = ()

    @property
    def reduction(self) -> float:
        """Fraction of the targeted weights removed (exact, whole blocks)."""
        return 1.0 - self.kept_params / self.dense_params if self.dense_params else 0.0


def _targets(model, targets: tuple[str, ...]):
    """(path, Linear) pairs inside dense MLPs and/or attention blocks."""
    kinds = tuple(
        kind for name, kind in (("mlp", SwiGLU), ("attention", Attention)) if name in targets
    )
    for path, module in nnx.iter_graph(model):
        if isinstance(module, kinds):
            for sub_path, linear in nnx.iter_graph(module):
                if isinstance(linear, Linear):
                    yield ".".join(map(str, (*path, *sub_path))), linear


def sparsify(
    model,
    sparsity: float,
    block_shape: tuple[int, int] = (128, 128),
    targets: tuple[str, ...] = ("mlp",),
    column_shards: int = 1,
) -> SparsifyReport:
    """Prunes the chosen linears of ``model`` in place to block-sparse, by block norm.

    Each targeted ``Linear``'s ``[in, out]`` kernel keeps its ``round((1 - sparsity) ·
    num_blocks)`` blocks of largest Frobenius norm (``BlockSparseMatrix.prune``) and
    from then on runs through ``capibara.kernels.block_sparse_matmul`` with the model's kernel
    implementation. MoE experts are not targeted (they are grouped matmuls).

    Args:
      model: a ``CapibaraModel`` (or any module holding ``Linear`` layers).
      sparsity: fraction of blocks to drop, in ``[0, 1]``.
      block_shape: ``(bk, bn)`` blocks of the kernels.
      targets: subset of ``("mlp", "attention")``.
      column_shards: > 1 stores each pruned kernel as that many runs of blocks, one
        per group of output block columns (``BlockSparseMatrix.split_columns``), so
        ``capibara.shard`` splits them over the mesh's ``model`` axis (a multiple of
        it). Kernels whose block columns it does not divide stay whole (replicated).

    Returns:
      ``SparsifyReport`` with the exact parameter reduction.
    """
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {targets}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity=}")
    if not isinstance(column_shards, int) or column_shards < 1:
        raise ValueError(f"column_shards must be a positive int, got {column_shards!r}")
    paths, dense, kept, split = [], 0, 0, []
    for path, linear in list(_targets(model, tuple(targets))):
        if linear.sparse_layout is not None:
            raise ValueError(f"{path} is already block-sparse")
        kernel = linear.kernel.get_value()
        pruned = BlockSparseMatrix.prune(np.asarray(kernel), sparsity, block_shape)
        dense += kernel.size
        kept += _kept_in_bounds(pruned)
        block_cols, bn = pruned.layout.grid[1], pruned.block_shape[1]
        if column_shards > 1 and block_cols % column_shards == 0 and pruned.shape[1] % bn == 0:
            pruned = pruned.split_columns(column_shards)
            split.append(path)
        linear.make_sparse(pruned)
        paths.append(path)
    return SparsifyReport(tuple(paths), dense, kept, tuple(split))


def _kept_in_bounds(w: BlockSparseMatrix) -> int:
    """Weights inside the logical ``[K, N]`` that the stored blocks cover."""
    (k, n), (bk, bn) = w.shape, w.block_shape
    rows = np.minimum((w.layout.rows + 1) * bk, k) - w.layout.rows * bk
    cols = np.minimum((w.layout.cols + 1) * bn, n) - w.layout.cols * bn
    return int(np.sum(rows * cols))
