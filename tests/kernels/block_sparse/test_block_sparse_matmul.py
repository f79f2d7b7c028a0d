"""block_sparse_matmul: every implementation against the reference, values and gradients."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara.kernels import block_sparse_matmul
from capibara.kernels.block_sparse import BlockSizes, BlockSparseMatrix, xla
from capibara.kernels.testing import assert_close

# (name, implementation, interpret). pallas runs the TPU kernel in the Pallas TPU
# interpreter, with scalar prefetch and VMEM scratch simulated.
IMPLS = [
    pytest.param("xla", False, id="xla"),
    pytest.param("pallas", True, id="pallas-interpret"),
    pytest.param(None, False, id="auto"),
]

# (batch_shape, K, N, block_shape)
SHAPES = [
    pytest.param((16,), 256, 384, (128, 128), id="m=16-k=256-n=384-b=128"),
    pytest.param((2, 5), 200, 300, (128, 128), id="batch=2x5-k=200-n=300-b=128"),
    pytest.param((9,), 96, 80, (32, 16), id="m=9-k=96-n=80-b=32x16"),
    pytest.param((), 64, 96, (32, 32), id="unbatched-k=64-n=96-b=32"),
]


def random_matrix(rng, k, n, block_shape, density, dtype=np.float32):
    """A BlockSparseMatrix whose blocks are kept with probability ``density``."""
    grid = (math.ceil(k / block_shape[0]), math.ceil(n / block_shape[1]))
    mask = rng.random(grid) < density
    w = rng.standard_normal((k, n)).astype(np.float32)
    return BlockSparseMatrix.from_dense(w, block_shape, mask=mask).astype(dtype)


def scale_of(k: int) -> float:
    # A k-long dot of unit normals has magnitude ~sqrt(k); so has its rounding error.
    return math.sqrt(k)


@pytest.mark.parametrize("implementation,interpret", IMPLS)
@pytest.mark.parametrize("batch_shape,k,n,block_shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0], ids=lambda d: f"density={d}")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_matches_reference(
    implementation, interpret, batch_shape, k, n, block_shape, density, dtype
):
    rng = np.random.default_rng(0)
    w = random_matrix(rng, k, n, block_shape, density, dtype)
    x = jnp.asarray(rng.standard_normal((*batch_shape, k)), dtype)
    run = jax.jit(
        functools.partial(block_sparse_matmul, implementation=implementation, interpret=interpret)
    )
    out = run(x, w)
    expected = block_sparse_matmul(x, w, implementation="reference")
    assert out.shape == (*batch_shape, n)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, scale=scale_of(k))


@pytest.mark.parametrize("implementation,interpret", IMPLS[:2])
def test_all_zero_block_columns_give_zeros(implementation, interpret):
    rng = np.random.default_rng(1)
    mask = np.ones((2, 4), bool)
    mask[:, [0, 2]] = False  # output columns 0-127 and 256-383 have no stored block
    w = BlockSparseMatrix.from_dense(
        rng.standard_normal((256, 512)).astype(np.float32), (128, 128), mask
    )
    x = jnp.asarray(rng.standard_normal((24, 256)), jnp.float32)
    out = block_sparse_matmul(x, w, implementation=implementation, interpret=interpret)
    np.testing.assert_array_equal(out[:, :128], 0)
    np.testing.assert_array_equal(out[:, 256:384], 0)
    assert_close(out, block_sparse_matmul(x, w, implementation="reference"), jnp.float32, scale=16)


@pytest.mark.parametrize("implementation,interpret", IMPLS[:2])
def test_block_m_smaller_than_rows_tiles_rows(implementation, interpret):
    """Rows are split into several tiles (and the last one padded) with a small block_m."""
    rng = np.random.default_rng(2)
    w = random_matrix(rng, 128, 256, (64, 128), 0.6)
    x = jnp.asarray(rng.standard_normal((37, 128)), jnp.float32)
    out = block_sparse_matmul(
        x, w, implementation=implementation, interpret=interpret, block_sizes=BlockSizes(block_m=16)
    )
    assert_close(out, block_sparse_matmul(x, w, implementation="reference"), jnp.float32, scale=12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_xla_takes_dense_route_above_threshold_and_blocked_below(dtype):
    rng = np.random.default_rng(3)
    dense = random_matrix(rng, 256, 256, (64, 64), 1.0)
    sparse = random_matrix(rng, 256, 256, (64, 64), 0.2)
    threshold = xla.DENSE_DENSITY_THRESHOLDS[jnp.dtype(dtype).name]
    assert dense.density > threshold >= sparse.density
    assert xla.dense_is_faster(dense.layout, dtype)
    assert not xla.dense_is_faster(sparse.layout, dtype)


@pytest.mark.parametrize("density", [0.0, 0.3, 0.7, 1.0], ids=lambda d: f"density={d}")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_dense_route_matches_reference(density, dtype):
    """The dense route (one full-K dot per block column) at any density, including
    partly stored columns whose missing blocks it zero-fills."""
    rng = np.random.default_rng(5)
    w = random_matrix(rng, 200, 300, (64, 32), density, dtype)
    columns = jnp.stack(xla.dense_columns(w.blocks, w.layout))
    kp, np_ = w.layout.padded_shape
    padded = jnp.pad(w.to_dense(), ((0, kp - 200), (0, np_ - 300)))
    np.testing.assert_array_equal(columns, padded.reshape(kp, -1, 32).transpose(1, 0, 2))
    x = jnp.asarray(rng.standard_normal((13, kp)), dtype)
    out = xla.matmul_dense_columns(x, w.blocks, w.layout)[:, :300]
    expected = block_sparse_matmul(x[:, :200], w, implementation="reference")
    assert_close(out.astype(dtype), expected, dtype, scale=scale_of(200))


@pytest.mark.parametrize("implementation,interpret", IMPLS)
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0], ids=lambda d: f"density={d}")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_gradients_match_reference_vjp(implementation, interpret, density, dtype):
    rng = np.random.default_rng(4)
    k, n = 160, 200  # not multiples of the 64x64 blocks
    w = random_matrix(rng, k, n, (64, 64), density, dtype)
    x = jnp.asarray(rng.standard_normal((3, 11, k)), dtype)
    cotangent = jnp.asarray(rng.standard_normal((3, 11, n)), dtype)

    def vjp(impl, interp):
        def f(x, blocks):
            m = BlockSparseMatrix(blocks, w.layout)
            return block_sparse_matmul(x, m, implementation=impl, interpret=interp)

        _, pullback = jax.vjp(f, x, w.blocks)
        return pullback(cotangent)

    dx, dblocks = jax.jit(lambda: vjp(implementation, interpret))()
    dx_ref, dblocks_ref = vjp("reference", False)
    assert dx.dtype == dtype and dblocks.dtype == dtype
    assert dblocks.shape == w.blocks.shape
    assert_close(dx, dx_ref, dtype, grad=True, scale=scale_of(n))
    assert_close(dblocks, dblocks_ref, dtype, grad=True, scale=scale_of(33))


def test_gradient_is_a_block_sparse_matrix_with_the_same_layout():
    rng = np.random.default_rng(5)
    w = random_matrix(rng, 128, 128, (64, 64), 0.5)
    x = jnp.asarray(rng.standard_normal((8, 128)), jnp.float32)
    grad = jax.grad(lambda w: block_sparse_matmul(x, w, implementation="xla").sum())(w)
    assert isinstance(grad, BlockSparseMatrix) and grad.layout == w.layout
    # d/dW sum(x @ W) = x.T @ ones: every stored block's gradient is a column-sum of x.
    expected = jnp.broadcast_to(x.sum(0)[:, None], (128, 128)) * (w.to_dense() != 0)
    assert_close(grad.to_dense(), expected, jnp.float32, scale=4)


def test_same_layout_reuses_the_compiled_function():
    rng = np.random.default_rng(6)
    mask = rng.random((2, 2)) < 0.7
    w1 = BlockSparseMatrix.from_dense(
        rng.standard_normal((64, 64)).astype(np.float32), (32, 32), mask
    )
    w2 = BlockSparseMatrix.from_dense(
        rng.standard_normal((64, 64)).astype(np.float32), (32, 32), mask
    )
    x = jnp.ones((4, 64), jnp.float32)
    run = jax.jit(functools.partial(block_sparse_matmul, implementation="xla"))
    run(x, w1)
    run(x, w2)
    assert run._cache_size() == 1


@pytest.mark.parametrize(
    "m", [2 * xla.XLA_BLOCK_M, 2 * xla.XLA_BLOCK_M + 88], ids=["m=512", "m=600"]
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_xla_row_tiling_with_and_without_a_remainder(m, dtype):
    """The xla path scans over row tiles (16-bit tiles leave the scan as uint16); a
    remainder tile is computed separately."""
    rng = np.random.default_rng(7)
    w = random_matrix(rng, 96, 160, (32, 32), 0.4, dtype)
    x = jnp.asarray(rng.standard_normal((m, 96)), dtype)
    cotangent = jnp.asarray(rng.standard_normal((m, 160)), dtype)

    def vjp(impl):
        f = lambda x, b: block_sparse_matmul(x, BlockSparseMatrix(b, w.layout), implementation=impl)
        out, pullback = jax.vjp(f, x, w.blocks)
        return out, *pullback(cotangent)

    out, dx, dblocks = jax.jit(lambda: vjp("xla"))()
    out_ref, dx_ref, dblocks_ref = vjp("reference")
    assert_close(out, out_ref, dtype, scale=scale_of(96))
    assert_close(dx, dx_ref, dtype, grad=True, scale=scale_of(160))
    assert_close(dblocks, dblocks_ref, dtype, grad=True, scale=scale_of(m))
