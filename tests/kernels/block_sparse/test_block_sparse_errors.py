"""Bad input to the block-sparse op raises ValueError/TypeError naming the values, at trace time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara.kernels import block_sparse_matmul
from capibara.kernels.block_sparse import BlockLayout, BlockSizes, BlockSparseMatrix


@pytest.fixture
def w():
    return BlockSparseMatrix.prune(np.ones((64, 96), np.float32), 0.5, (32, 32))


def test_k_mismatch(w):
    with pytest.raises(ValueError, match=r"x.shape=\(4, 63\).*w.shape=\(64, 96\)"):
        block_sparse_matmul(jnp.ones((4, 63)), w)


def test_scalar_x(w):
    with pytest.raises(ValueError, match="rank >= 1"):
        block_sparse_matmul(jnp.float32(1.0), w)


def test_integer_x(w):
    with pytest.raises(TypeError, match="int32"):
        block_sparse_matmul(jnp.ones((4, 64), jnp.int32), w)


def test_dtype_mismatch(w):
    with pytest.raises(TypeError, match=r"bfloat16.*float32"):
        block_sparse_matmul(jnp.ones((4, 64), jnp.bfloat16), w)


def test_dense_w_is_refused():
    with pytest.raises(TypeError, match="BlockSparseMatrix"):
        block_sparse_matmul(jnp.ones((4, 64)), jnp.ones((64, 96)))


def test_errors_raise_at_trace_time(w):
    with pytest.raises(ValueError, match="x's last dim"):
        jax.jit(block_sparse_matmul).lower(jax.ShapeDtypeStruct((4, 65), jnp.float32), w)


@pytest.mark.parametrize("sparsity", [-0.1, 1.5])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(ValueError, match=f"sparsity={sparsity}"):
        BlockSparseMatrix.prune(np.ones((64, 64), np.float32), sparsity, (32, 32))


@pytest.mark.parametrize("block_shape", [(0, 32), (32,), (32, 32.0), "32"])
def test_bad_block_shape(block_shape):
    with pytest.raises(ValueError, match="block_shape"):
        BlockSparseMatrix.from_dense(np.ones((64, 64), np.float32), block_shape)


def test_mask_not_matching_the_block_grid():
    with pytest.raises(ValueError, match=r"mask shape \(2, 2\).*block grid \(2, 3\)"):
        BlockSparseMatrix.from_dense(np.ones((64, 96), np.float32), (32, 32), np.ones((2, 2), bool))


def test_non_boolean_mask():
    with pytest.raises(TypeError, match="boolean"):
        BlockLayout((64, 64), (32, 32), np.ones((2, 2), np.int32))


def test_weight_of_wrong_rank_or_dtype():
    with pytest.raises(ValueError, match="2-D"):
        BlockSparseMatrix.from_dense(np.ones((2, 64, 64), np.float32), (32, 32))
    with pytest.raises(TypeError, match="floating"):
        BlockSparseMatrix.from_dense(np.ones((64, 64), np.int32), (32, 32))


def test_constructors_refuse_traced_weights():
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(lambda w: BlockSparseMatrix.from_dense(w, (32, 32)).blocks)(jnp.ones((64, 64)))


@pytest.mark.parametrize("block_m", [0, 12, -8])
def test_bad_block_sizes(block_m):
    with pytest.raises(ValueError, match=f"block_m={block_m}"):
        BlockSizes(block_m=block_m)


def test_unknown_implementation(w):
    with pytest.raises(ValueError, match="'triton' is not one of"):
        block_sparse_matmul(jnp.ones((4, 64)), w, implementation="triton")


def test_interpret_with_a_non_pallas_implementation(w):
    with pytest.raises(ValueError, match="interpret=True runs the Pallas kernel"):
        block_sparse_matmul(jnp.ones((4, 64)), w, implementation="xla", interpret=True)


def test_compiled_pallas_on_cpu_names_what_runs_here(w):
    with pytest.raises(ValueError, match=r"compiled kernel only on TPU.*interpret=True.*cpu: xla"):
        block_sparse_matmul(jnp.ones((4, 64)), w, implementation="pallas")
