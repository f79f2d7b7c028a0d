"""Bad input: shape/dtype errors raise at trace time; bad group *values* never read or
write out of bounds (the Pallas interpreter raises on an out-of-bounds read and fills
uninitialized memory with NaN, so a clean, NaN-free run that matches the clamped
reference is the proof)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gmm_inputs import BLOCKS, IMPLS, call, forward_and_vjp, operands, scale

from capibara.kernels.grouped_matmul import (
    BlockSizes,
    grouped_matmul,
    metadata,
    transposed_grouped_matmul,
)
from capibara.kernels.testing import assert_close

M, K, N = 40, 64, 96


@pytest.fixture
def args():
    lhs, rhs, _ = operands(0, M, K, N, 3)
    return lhs, rhs, jnp.asarray([10, 20, 10], jnp.int32)


def test_lhs_rank(args):
    _, rhs, sizes = args
    with pytest.raises(ValueError, match=r"lhs must have rank 2.*\(2, 40, 64\)"):
        grouped_matmul(jnp.ones((2, M, K)), rhs, sizes)


def test_rhs_rank(args):
    lhs, rhs, sizes = args
    with pytest.raises(ValueError, match=r"rhs must have rank 3.*\(64, 96\)"):
        grouped_matmul(lhs, rhs[0], sizes)


def test_k_mismatch(args):
    lhs, rhs, sizes = args
    with pytest.raises(ValueError, match=r"share k.*lhs.shape=\(40, 63\)"):
        grouped_matmul(lhs[:, :63], rhs, sizes)


def test_k_mismatch_transposed(args):
    lhs, rhs, sizes = args  # rhs [E, K, N] read as [E, n, k] has k = N != K
    with pytest.raises(ValueError, match="transpose_rhs=True"):
        grouped_matmul(lhs, rhs, sizes, transpose_rhs=True)


def test_mixed_dtypes_are_promoted_not_refused(args):
    # As jax.lax.ragged_dot: bf16 x f32 runs in f32 (test_ragged_dot compares with it).
    lhs, rhs, sizes = args
    got = grouped_matmul(lhs.astype(jnp.bfloat16), rhs, sizes, implementation="xla")
    want = grouped_matmul(lhs.astype(jnp.bfloat16).astype(jnp.float32), rhs, sizes)
    assert got.dtype == jnp.float32
    assert jnp.array_equal(got, want)


def test_integer_operands(args):
    lhs, rhs, sizes = args
    with pytest.raises(TypeError, match=r"floating point.*int32"):
        grouped_matmul(lhs.astype(jnp.int32), rhs.astype(jnp.int32), sizes)


def test_float_group_sizes(args):
    lhs, rhs, _ = args
    with pytest.raises(TypeError, match=r"group_sizes must be int32.*float32"):
        grouped_matmul(lhs, rhs, jnp.ones(3, jnp.float32))


def test_group_sizes_shape(args):
    lhs, rhs, _ = args
    with pytest.raises(
        ValueError,
        match=r"shape \[E\] = \[3\] \(rhs.shape\[0\]\), got \(4,\)",
    ):
        grouped_matmul(lhs, rhs, jnp.ones(4, jnp.int32))


def test_transposed_m_mismatch(args):
    lhs, _, sizes = args
    with pytest.raises(ValueError, match="share m"):
        transposed_grouped_matmul(lhs, jnp.ones((M + 1, N)), sizes)


def test_transposed_group_sizes_rank(args):
    lhs, _, _ = args
    with pytest.raises(ValueError, match=r"group_sizes must have shape \[E\], got \(2, 2\)"):
        transposed_grouped_matmul(lhs, jnp.ones((M, N)), jnp.ones((2, 2), jnp.int32))


def test_no_groups(args):
    lhs, _, _ = args
    with pytest.raises(ValueError, match="need at least one group"):
        transposed_grouped_matmul(lhs, jnp.ones((M, N)), jnp.ones((0,), jnp.int32))


def test_list_group_sizes_are_checked(args):
    lhs, rhs, _ = args
    assert grouped_matmul(lhs, rhs, [10, 0, 30]).shape == (M, N)
    with pytest.raises(ValueError, match="must be >= 0"):
        grouped_matmul(lhs, rhs, [10, -1, 30])


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        ([10, -1, 10], r"must be >= 0, got \[10, -1, 10\]"),
        ([20, 20, 1], "sum to 41, more than the 40"),
    ],
    ids=["negative", "past-m"],
)
def test_concrete_bad_group_sizes_raise(args, sizes, match):
    lhs, rhs, _ = args
    with pytest.raises(ValueError, match=match):
        grouped_matmul(lhs, rhs, np.asarray(sizes, np.int32))
    with pytest.raises(ValueError, match=match):
        transposed_grouped_matmul(lhs, jnp.ones((M, N)), jnp.asarray(sizes, jnp.int32))


def test_shape_errors_raise_at_trace_time(args):
    _, rhs, sizes = args
    lhs = jax.ShapeDtypeStruct((M, K + 1), jnp.float32)
    with pytest.raises(ValueError, match="share k"):
        jax.jit(grouped_matmul).lower(lhs, rhs, sizes)


@pytest.mark.parametrize("value", [0, 12, 100, "8"])
def test_bad_block_sizes(value):
    with pytest.raises(ValueError, match="block_m must be a positive multiple of 8"):
        BlockSizes(block_m=value)


def test_bad_block_k():
    with pytest.raises(ValueError, match="block_k must be a positive multiple of 128, got 64"):
        BlockSizes(block_k=64)


def test_block_sizes_type(args):
    with pytest.raises(TypeError, match="block_sizes must be BlockSizes"):
        grouped_matmul(*args, block_sizes=(128, 128, 128))


def test_unknown_implementation(args):
    with pytest.raises(ValueError, match="implementation='triton'"):
        grouped_matmul(*args, implementation="triton")


def test_compiled_pallas_on_cpu_names_the_alternatives(args):
    with pytest.raises(ValueError, match="interpret=True"):
        grouped_matmul(*args, implementation="pallas")


# -- Bad values under jit: clamped, never out of bounds -----------------------------

BAD_VALUES = {
    "past-m": [30, 30, 30],  # rows 40.. do not exist: group 1 ends at 40, group 2 empty
    "huge": [5, 2**30, 2**30],  # would overflow an int32 cumsum unclamped
    "negative": [12, -7, 20],  # -7 counts as 0
    "all-negative": [-1, -2, -3],
    "past-m-by-one": [0, 41, 0],
}


@pytest.mark.parametrize("sizes", BAD_VALUES.values(), ids=BAD_VALUES.keys())
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_values_under_jit_are_clamped(impl, sizes):
    lhs, rhs, dy = operands(1, M, K, N, 3)
    # The documented clamp, computed independently (int64 numpy): negative sizes count
    # as 0, rows past M are dropped.
    ends = np.minimum(np.cumsum(np.maximum(np.asarray(sizes, np.int64), 0)), M)
    clean = np.diff(np.concatenate([[0], ends])).astype(np.int32)

    got = jax.jit(
        lambda a, b, s: forward_and_vjp(call(grouped_matmul, impl), a, b, dy, group_sizes=s)
    )(lhs, rhs, jnp.asarray(sizes, jnp.int32))
    want = forward_and_vjp(
        grouped_matmul, lhs, rhs, dy, group_sizes=clean, implementation="reference"
    )
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want, strict=True):
        assert np.isfinite(np.asarray(g)).all(), name
        assert_close(g, w, jnp.float32, grad=True, scale=scale(M, K, N), err_msg=name)


def test_clamped_semantics():
    starts, ends = metadata.group_bounds(jnp.asarray([30, -4, 30, 2**31 - 1], jnp.int32), 40)
    np.testing.assert_array_equal(starts, [0, 30, 30, 40])
    np.testing.assert_array_equal(ends, [30, 30, 40, 40])


def test_pallas_interpreter_catches_out_of_bounds_reads():
    """The safety net above is real: the interpreter does raise on a bad read."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    def kernel(idx_ref, x_ref, o_ref):
        o_ref[...] = x_ref[...]

    call_oob = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(1,),
            in_specs=[pl.BlockSpec((8, 128), lambda i, idx: (idx[0], 0))],
            out_specs=pl.BlockSpec((8, 128), lambda i, idx: (0, 0)),
        ),
        interpret=pltpu.InterpretParams(),
    )
    with pytest.raises(Exception, match=r"(?i)out.of.bounds"):
        jax.block_until_ready(call_oob(jnp.asarray([5], jnp.int32), jnp.ones((16, 128))))


def test_default_blocks_are_clamped_to_small_problems():
    assert BlockSizes().clamped(5, 10, 300) == BlockSizes(block_m=16, block_k=128, block_n=384)
    assert BLOCKS.clamped(1000, 1000, 1000) == BLOCKS
