"""``BlockSparseMatrix.split_columns``: the same matrix in equal runs of blocks per group
of output block columns (``ColumnShardedLayout``), on one device. The mesh split is in
``tests/kernels/test_mesh.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara import kernels
from capibara.kernels import BlockSparseMatrix


@pytest.fixture(scope="module")
def pruned():
    dense = np.random.default_rng(0).standard_normal((96, 256)).astype(np.float32)
    return BlockSparseMatrix.prune(dense, 0.6, (32, 32))


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_same_matrix_same_product(pruned, shards):
    split = pruned.split_columns(shards)
    assert np.array_equal(np.asarray(split.to_dense()), np.asarray(pruned.to_dense()))
    assert split.blocks.shape == (split.layout.nnz, 32, 32)
    assert split.layout.nnz >= pruned.layout.nnz
    assert kernels.block_sparse.flops(4, split) == kernels.block_sparse.flops(4, pruned)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 96)), jnp.float32)
    want = x @ pruned.to_dense()
    for kw in ({"implementation": "xla"}, {"interpret": True}, {"implementation": "reference"}):
        got = kernels.block_sparse_matmul(x, split, **kw)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_padding_blocks_get_no_gradient_and_stay_out_of_the_product(pruned):
    split = pruned.split_columns(4)
    present = jnp.asarray(split.layout.present.reshape(-1))[:, None, None]
    x = jnp.asarray(np.random.default_rng(2).standard_normal((8, 96)), jnp.float32)

    def loss(blocks):
        w = BlockSparseMatrix(blocks, split.layout)
        return jnp.sum(jnp.sin(kernels.block_sparse_matmul(x, w, implementation="xla")))

    grads = jax.grad(loss)(split.blocks)
    assert not bool(present.all())  # this pattern needs padding
    assert float(jnp.max(jnp.abs(jnp.where(present, 0.0, grads)))) == 0.0
    # An optimizer writing into a padding block changes nothing.
    poked = jnp.where(present, split.blocks, 7.0)
    assert float(loss(poked)) == pytest.approx(float(loss(split.blocks)), abs=1e-6)
    dense = pruned.to_dense()
    want = jax.grad(lambda d: jnp.sum(jnp.sin(x @ d)))(dense) * (dense != 0)
    got = BlockSparseMatrix(grads, split.layout).to_dense()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_shard_counts_name_the_value(pruned):
    with pytest.raises(ValueError, match="num_shards=3 must divide the 8 block columns"):
        pruned.split_columns(3)
    with pytest.raises(ValueError, match="num_shards must be a positive int, got 0"):
        pruned.split_columns(0)
    with pytest.raises(ValueError, match="already split into 2 column shards"):
        pruned.split_columns(2).split_columns(2)
