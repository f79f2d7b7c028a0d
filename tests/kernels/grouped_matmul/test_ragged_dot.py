"""``capibara.kernels.ragged_dot`` against ``jax.lax.ragged_dot`` itself: same
arguments, shapes, dtype promotion and results; and the documented differences."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara import kernels

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}


def operands(m=24, k=16, n=8, sizes=(5, 0, 11, 4), lhs_dtype=jnp.float32, rhs_dtype=None):
    keys = jax.random.split(jax.random.key(0), 2)
    lhs = jax.random.normal(keys[0], (m, k)).astype(lhs_dtype)
    rhs = jax.random.normal(keys[1], (len(sizes), k, n)).astype(rhs_dtype or lhs_dtype)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype)
    tol = TOLERANCE[jnp.dtype(want.dtype).type]
    scale = max(1.0, float(jnp.max(jnp.abs(want.astype(jnp.float32)))))
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
    assert err <= tol * scale, err


@pytest.mark.parametrize(
    "lhs_dtype, rhs_dtype, preferred",
    [
        (jnp.float32, jnp.float32, None),
        (jnp.bfloat16, jnp.bfloat16, None),
        (jnp.float16, jnp.float16, None),
        (jnp.bfloat16, jnp.float32, None),  # promoted to f32
        (jnp.bfloat16, jnp.bfloat16, jnp.float32),  # f32 out of bf16 in
        (jnp.float32, jnp.float32, jnp.bfloat16),
    ],
)
def test_dtypes_match_jax(lhs_dtype, rhs_dtype, preferred):
    lhs, rhs, sizes = operands(lhs_dtype=lhs_dtype, rhs_dtype=rhs_dtype)
    want = jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=preferred)
    got = kernels.ragged_dot(
        lhs, rhs, sizes, preferred_element_type=preferred, implementation="xla"
    )
    close(got, want)


@pytest.mark.parametrize(
    "sizes, precision",
    [((24, 0, 0, 0), None), ((0, 0, 0, 0), "highest"), ((3, 3, 3, 3), jax.lax.Precision.DEFAULT)],
)
def test_group_patterns_and_precisions_match_jax(sizes, precision):
    lhs, rhs, group_sizes = operands(sizes=sizes)
    want = jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=jax.lax.Precision.HIGHEST)
    got = jax.jit(functools.partial(kernels.ragged_dot, precision=precision))(lhs, rhs, group_sizes)
    close(got, want)  # rows past the groups are zero in both


def test_pallas_interpret_matches_jax():
    lhs, rhs, sizes = operands(m=64, k=128, n=128, sizes=(20, 0, 30, 14))
    want = jax.lax.ragged_dot(lhs, rhs, sizes, precision=jax.lax.Precision.HIGHEST)
    close(kernels.ragged_dot(lhs, rhs, sizes, interpret=True), want)
    close(kernels.ragged_dot(lhs, rhs, sizes, implementation="reference"), want)


def test_gradients_match_jax():
    lhs, rhs, sizes = operands()

    def loss(f):
        return lambda a, b: jnp.sum(jnp.sin(f(a, b, sizes)))

    precise = functools.partial(jax.lax.ragged_dot, precision=jax.lax.Precision.HIGHEST)
    want = jax.grad(loss(precise), argnums=(0, 1))(lhs, rhs)
    got = jax.grad(loss(kernels.ragged_dot), argnums=(0, 1))(lhs, rhs)
    for g, w in zip(got, want, strict=True):
        close(g, w)


@pytest.mark.parametrize("offset", [0, 2, 4])
def test_group_offset_computes_only_the_local_groups(offset):
    # megablox's sharded-groups form: 6 groups in group_sizes, rhs holds 2 of them.
    sizes = jnp.asarray([3, 5, 0, 4, 6, 2], jnp.int32)
    lhs, rhs_all, _ = operands(m=24, sizes=(0,) * 6)
    rhs = rhs_all[offset : offset + 2]
    want = jnp.zeros((24, rhs.shape[2]))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for g in range(offset, offset + 2):
        rows = slice(int(starts[g]), int(starts[g + 1]))
        want = want.at[rows].set(
            jnp.dot(lhs[rows], rhs[g - offset], precision=jax.lax.Precision.HIGHEST)
        )
    for group_offset in (jnp.asarray([offset], jnp.int32), offset):
        close(kernels.ragged_dot(lhs, rhs, sizes, group_offset=group_offset), want)
    traced = jax.jit(lambda o: kernels.ragged_dot(lhs, rhs, sizes, group_offset=o))
    close(traced(jnp.asarray([offset], jnp.int32)), want)


def test_vmap_with_unbatched_weights_matches_a_loop():
    lhs, rhs, sizes = operands()
    batch = jnp.stack([lhs, 2 * lhs, -lhs])
    got = jax.vmap(kernels.ragged_dot, in_axes=(0, None, None))(batch, rhs, sizes)
    for i in range(3):
        close(got[i], jax.lax.ragged_dot(batch[i], rhs, sizes))


def test_an_empty_groups_nan_weights_do_not_leak():
    lhs, rhs, sizes = operands()  # group 1 is empty
    poisoned = rhs.at[1].set(jnp.nan)
    got = kernels.ragged_dot(lhs, poisoned, sizes)
    assert bool(jnp.all(jnp.isfinite(got)))
    close(got, jax.lax.ragged_dot(lhs, rhs, sizes))


def test_bad_arguments_name_the_value():
    lhs, rhs, sizes = operands()
    with pytest.raises(ValueError, match=r"lhs must have rank 2 \(\[m, k\]\), got shape=\(24,\)"):
        kernels.ragged_dot(lhs[:, 0], rhs, sizes)
    with pytest.raises(TypeError, match="must be floating point, got int32"):
        kernels.ragged_dot(lhs.astype(jnp.int32), rhs.astype(jnp.int32), sizes)
    with pytest.raises(ValueError, match="group_offset=5 must be in"):
        kernels.ragged_dot(lhs, rhs[:2], sizes, group_offset=5)
    with pytest.raises(ValueError):
        kernels.ragged_dot(lhs, rhs, sizes, precision="sloppy")


def test_grouped_matmul_promotes_mixed_dtypes_like_ragged_dot():
    lhs, rhs, sizes = operands(lhs_dtype=jnp.bfloat16, rhs_dtype=jnp.float32)
    got = kernels.grouped_matmul(lhs, rhs, sizes, implementation="xla")
    close(got, jax.lax.ragged_dot(lhs, rhs, sizes, precision=jax.lax.Precision.HIGHEST))
