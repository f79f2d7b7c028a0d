"""BlockSparseMatrix constructors and the host-side block schedule of the Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from capibara.kernels.block_sparse import BlockLayout, BlockSparseMatrix, metadata


def test_from_dense_keeps_exactly_the_nonzero_blocks():
    w = np.zeros((300, 200), np.float32)  # 3 x 2 grid of 128 x 128 blocks (padded)
    w[5, 7] = 1.0  # block (0, 0)
    w[290, 150] = -2.0  # block (2, 1), in the padded edge block
    m = BlockSparseMatrix.from_dense(w, (128, 128))
    np.testing.assert_array_equal(m.layout.mask, [[True, False], [False, False], [False, True]])
    assert m.blocks.shape == (2, 128, 128)
    np.testing.assert_array_equal(m.to_dense(), w)
    assert m.density == pytest.approx(2 / 6)


def test_from_dense_with_mask_drops_values_outside_it():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    mask = np.array([[True, False], [False, True]])
    dense = np.asarray(BlockSparseMatrix.from_dense(w, (32, 32), mask).to_dense())
    expected = w * np.kron(mask, np.ones((32, 32)))
    np.testing.assert_array_equal(dense, expected)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.6562, 0.9, 1.0])
def test_prune_keeps_the_largest_blocks_and_reports_the_exact_fraction(sparsity):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 384)).astype(np.float32)
    w *= rng.random((256 // 32, 384 // 32)).repeat(32, 0).repeat(32, 1)  # distinct block norms
    m = BlockSparseMatrix.prune(w, sparsity, (32, 32))
    total = (256 // 32) * (384 // 32)
    assert m.layout.nnz == round((1 - sparsity) * total)
    assert m.density == m.layout.nnz / total
    norms = np.linalg.norm(w.reshape(8, 32, 12, 32), axis=(1, 3))
    if 0 < m.layout.nnz < total:
        assert norms[m.layout.mask].min() >= norms[~m.layout.mask].max()


def test_nbytes_counts_blocks_and_indices():
    m = BlockSparseMatrix.prune(np.ones((128, 128), np.float32), 0.5, (32, 32))
    assert m.nbytes == 8 * 32 * 32 * 4 + 8 * 2 * 4


def test_is_a_pytree_with_static_layout():
    m = BlockSparseMatrix.prune(np.ones((64, 64), np.float32), 0.5, (32, 32))
    leaves = jax.tree.leaves(m)
    assert len(leaves) == 1 and leaves[0] is m.blocks
    doubled = jax.jit(lambda m: jax.tree.map(lambda b: 2 * b, m))(m)
    assert isinstance(doubled, BlockSparseMatrix) and doubled.layout == m.layout
    np.testing.assert_array_equal(doubled.to_dense(), 2 * m.to_dense())


def test_astype_and_dtype():
    m = BlockSparseMatrix.prune(np.ones((64, 64), np.float32), 0.5, (32, 32)).astype(jnp.bfloat16)
    assert m.dtype == jnp.bfloat16 and m.to_dense().dtype == jnp.bfloat16


def test_layouts_compare_and_hash_by_value():
    mask = np.array([[True, False]])
    a = BlockLayout((32, 64), (32, 32), mask)
    b = BlockLayout((32, 64), (32, 32), mask.copy())
    assert a == b and hash(a) == hash(b)
    assert a != BlockLayout((32, 64), (32, 32), ~mask)


def _check_schedule(schedule, mask_by_out, block_in_ids):
    """Every stored block is visited once; every output gets one FIRST and one LAST."""
    valid = (schedule.flags & metadata.VALID) != 0
    visited = sorted(schedule.block_ids[valid].tolist())
    assert visited == list(range(len(block_in_ids)))
    np.testing.assert_array_equal(schedule.in_ids[valid], block_in_ids[schedule.block_ids[valid]])
    num_out = mask_by_out.shape[0]
    for out in range(num_out):
        steps = np.nonzero(schedule.out_ids == out)[0]
        assert len(steps) == max(1, mask_by_out[out].sum())
        assert np.all(np.diff(steps) == 1), "an output's steps must be consecutive"
        assert schedule.flags[steps[0]] & metadata.FIRST
        assert schedule.flags[steps[-1]] & metadata.LAST
    # Non-VALID (empty output) steps still point at a stored block, never out of range.
    if len(block_in_ids):
        assert schedule.block_ids.max() < len(block_in_ids) and schedule.block_ids.min() >= 0


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.bool_, hnp.array_shapes(min_dims=2, max_dims=2, max_side=7)))
def test_schedules_visit_each_stored_block_once(mask):
    layout = BlockLayout((mask.shape[0] * 8, mask.shape[1] * 8), (8, 8), mask)
    _check_schedule(metadata.forward_schedule(layout), mask.T, layout.rows)
    _check_schedule(metadata.transposed_schedule(layout), mask, layout.cols)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 90),
    st.integers(1, 90),
    st.sampled_from([(8, 8), (16, 32), (32, 16)]),
    st.floats(0, 1),
)
def test_to_dense_round_trips_any_shape(k, n, block_shape, keep):
    rng = np.random.default_rng(k * 100 + n)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[rng.random((k, n)) > keep] = 0.0
    np.testing.assert_array_equal(BlockSparseMatrix.from_dense(w, block_shape).to_dense(), w)
