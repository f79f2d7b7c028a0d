"""grouped_matmul and transposed_grouped_matmul: xla and Pallas (interpret) vs the reference.

Values over named edge cases (empty groups, one group holding every row, zero rows,
rows past the last group, m/k/n not multiples of the tiles) x dtypes x
``transpose_rhs``; group sizes drawn by hypothesis at fixed shapes (one compilation
per shape, many schedules); gradients of both operands against ``jax.vjp`` of the
reference with a random cotangent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gmm_inputs import (
    BLOCKS,
    DTYPES,
    IMPLS,
    call,
    forward_and_vjp,
    group_sizes,
    operands,
    scale,
)
from hypothesis import HealthCheck, given, settings

from capibara.kernels.grouped_matmul import BlockSizes, grouped_matmul, transposed_grouped_matmul
from capibara.kernels.testing import assert_close

# name -> (m, k, n, group_sizes). BLOCKS tiles rows by 16 and k, n by 128.
CASES = {
    "m=64-k=128-n=128-balanced": (64, 128, 128, [16, 16, 16, 16]),
    "m=70-k=200-n=130-straddling": (70, 200, 130, [20, 0, 33, 10]),
    "m=37-k=96-n=160-one-group": (37, 96, 160, [0, 37, 0]),
    "m=48-k=128-n=64-empty-first-last": (48, 128, 64, [0, 5, 43, 0]),
    "m=40-k=64-n=128-zero-rows": (40, 64, 128, [0, 0, 0]),
    "m=50-k=130-n=100-rows-past-groups": (50, 130, 100, [7, 0, 9]),
    "m=1-k=8-n=8-single-row": (1, 8, 8, [0, 1]),
    "m=33-k=256-n=256-single-group": (33, 256, 256, [33]),
}
CASE_PARAMS = [pytest.param(*v, id=k) for k, v in CASES.items()]


@pytest.mark.parametrize("transpose_rhs", [False, True], ids=["rhs", "rhs-T"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k", "n", "sizes"), CASE_PARAMS)
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_matches_reference(impl, m, k, n, sizes, dtype, transpose_rhs):
    lhs, rhs, _ = operands(0, m, k, n, len(sizes), dtype, transpose_rhs)
    sizes = jnp.asarray(sizes, jnp.int32)
    got = call(grouped_matmul, impl, transpose_rhs=transpose_rhs)(lhs, rhs, sizes)
    want = grouped_matmul(lhs, rhs, sizes, transpose_rhs=transpose_rhs, implementation="reference")
    assert got.shape == (m, n) and got.dtype == dtype
    assert_close(got, want, dtype, scale=scale(k))
    # Rows past the last group are exactly zero.
    np.testing.assert_array_equal(np.asarray(got[int(sizes.sum()) :], np.float32), 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k", "n", "sizes"), CASE_PARAMS)
@pytest.mark.parametrize("impl", IMPLS)
def test_transposed_matches_reference(impl, m, k, n, sizes, dtype):
    lhs, _, dy = operands(1, m, k, n, len(sizes), dtype)
    sizes = jnp.asarray(sizes, jnp.int32)
    got = call(transposed_grouped_matmul, impl)(lhs, dy, sizes)
    want = transposed_grouped_matmul(lhs, dy, sizes, implementation="reference")
    assert got.shape == (len(sizes), k, n) and got.dtype == dtype
    assert_close(got, want, dtype, scale=scale(m))
    for g in np.flatnonzero(np.asarray(sizes) == 0):  # an empty group's result is zeros
        np.testing.assert_array_equal(np.asarray(got[g], np.float32), 0)


# -- Group sizes drawn by hypothesis -----------------------------------------------
#
# Shapes are fixed per test so the jitted function compiles once; only the traced
# group sizes change between examples.

HYPOTHESIS = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
M, K, N, E = 75, 136, 130, 5


@pytest.fixture(scope="module")
def jitted():
    """``(impl, op) -> jitted fn``, built once per module so examples share compilations."""
    cache = {}

    def get(impl, op):
        if (impl, op) not in cache:
            if op == "forward":
                cache[impl, op] = jax.jit(call(grouped_matmul, impl))
            elif op == "transposed":
                cache[impl, op] = jax.jit(call(transposed_grouped_matmul, impl))
            else:  # the forward and its vjp
                fn = grouped_matmul if impl == "reference" else call(grouped_matmul, impl)
                cache[impl, op] = jax.jit(
                    lambda lhs, rhs, sizes, dy, fn=fn: forward_and_vjp(
                        fn, lhs, rhs, dy, group_sizes=sizes
                    )
                )
        return cache[impl, op]

    return get


def _examples(impl):
    return settings(HYPOTHESIS, max_examples=25 if impl == "xla" else 8)


@pytest.mark.parametrize("impl", IMPLS)
def test_drawn_group_sizes(impl, jitted):
    lhs, rhs, dy = operands(2, M, K, N, E)

    @_examples(impl)
    @given(sizes=group_sizes(M, E))
    def check(sizes):
        sizes = jnp.asarray(sizes)
        want = grouped_matmul(lhs, rhs, sizes, implementation="reference")
        assert_close(jitted(impl, "forward")(lhs, rhs, sizes), want, jnp.float32, scale=scale(K))
        want_t = transposed_grouped_matmul(lhs, dy, sizes, implementation="reference")
        got_t = jitted(impl, "transposed")(lhs, dy, sizes)
        assert_close(got_t, want_t, jnp.float32, scale=scale(M))

    check()


@pytest.mark.parametrize("impl", IMPLS)
def test_drawn_group_sizes_gradients(impl, jitted):
    lhs, rhs, dy = operands(3, M, K, N, E)

    @_examples(impl)
    @given(sizes=group_sizes(M, E))
    def check(sizes):
        sizes = jnp.asarray(sizes)
        got = jitted(impl, "vjp")(lhs, rhs, sizes, dy)
        want = jitted("reference", "vjp")(lhs, rhs, sizes, dy)
        for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want, strict=True):
            assert_close(g, w, jnp.float32, grad=True, scale=scale(M, K, N), err_msg=name)

    check()


# -- Gradients ---------------------------------------------------------------------


def _gradient_params():
    """xla: every case x dtype x layout. Pallas (slow in the interpreter): every case in
    f32, and every dtype x layout on the straddling case."""
    params = []
    for impl in ("xla", "pallas"):
        for name in list(CASES)[1:6]:
            for dtype, dtype_id in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16")):
                for transpose_rhs in (False, True):
                    plain = dtype == jnp.float32 and not transpose_rhs
                    if impl == "pallas" and not plain and name != "m=70-k=200-n=130-straddling":
                        continue
                    case_id = (
                        f"{IMPL_IDS[impl]}-{name}-{dtype_id}-rhs{'-T' if transpose_rhs else ''}"
                    )
                    params.append(
                        pytest.param(impl, *CASES[name], dtype, transpose_rhs, id=case_id)
                    )
    return params


IMPL_IDS = {"xla": "xla", "pallas": "pallas-interpret"}


@pytest.mark.parametrize(
    ("impl", "m", "k", "n", "sizes", "dtype", "transpose_rhs"), _gradient_params()
)
def test_gradients_match_reference_vjp(impl, m, k, n, sizes, dtype, transpose_rhs):
    lhs, rhs, dy = operands(4, m, k, n, len(sizes), dtype, transpose_rhs)
    sizes = jnp.asarray(sizes, jnp.int32)

    kwargs = dict(group_sizes=sizes, transpose_rhs=transpose_rhs)
    got = forward_and_vjp(call(grouped_matmul, impl), lhs, rhs, dy, **kwargs)
    want = forward_and_vjp(grouped_matmul, lhs, rhs, dy, implementation="reference", **kwargs)
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert_close(g, w, dtype, grad=True, scale=scale(m, k, n), err_msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_transposed_gradients_match_reference_vjp(impl):
    m, k, n, sizes = CASES["m=70-k=200-n=130-straddling"]
    lhs = operands(5, m, k, n, len(sizes))[0]
    d_out = operands(6, m, k, n, len(sizes))[1]  # [E, k, n]
    sizes = jnp.asarray(sizes, jnp.int32)

    dy = operands(7, m, k, n, len(sizes))[2]  # the [m, n] operand
    op = transposed_grouped_matmul
    got = forward_and_vjp(call(op, impl), lhs, dy, d_out, group_sizes=sizes)
    want = forward_and_vjp(op, lhs, dy, d_out, group_sizes=sizes, implementation="reference")
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want, strict=True):
        assert_close(g, w, jnp.float32, grad=True, scale=scale(m, k, n), err_msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_second_derivative_matches_reference(impl):
    """Reverse over reverse: the backward's kernels are themselves differentiable."""
    m, k, n, sizes = CASES["m=70-k=200-n=130-straddling"]
    lhs, rhs, _ = operands(8, m, k, n, len(sizes))
    sizes = jnp.asarray(sizes, jnp.int32)
    direction = jnp.ones_like(lhs)

    def hvp(fn):
        def loss(a, b):
            return jnp.sum(fn(a, b, sizes) ** 2)

        def directional_grad(a, b):  # <d loss / d lhs, direction>
            return jnp.vdot(jax.grad(loss)(a, b), direction)

        return jax.grad(directional_grad, argnums=(0, 1))(lhs, rhs)

    reference = functools.partial(grouped_matmul, implementation="reference")
    got, want = hvp(call(grouped_matmul, impl)), hvp(reference)
    for name, g, w in zip(("lhs", "rhs"), got, want, strict=True):
        assert_close(g, w, jnp.float32, grad=True, scale=scale(k, n) ** 2, err_msg=name)


def test_default_implementation_and_jit():
    m, k, n, sizes = CASES["m=70-k=200-n=130-straddling"]
    lhs, rhs, _ = operands(9, m, k, n, len(sizes))
    sizes = jnp.asarray(sizes, jnp.int32)
    got = jax.jit(grouped_matmul)(lhs, rhs, sizes)
    want = grouped_matmul(lhs, rhs, sizes, implementation="reference")
    assert_close(got, want, jnp.float32, scale=scale(k))


@pytest.mark.parametrize(
    "blocks",
    [BLOCKS, BlockSizes(block_m=8, block_k=128, block_n=256)],
    ids=["m16-k128-n128", "m8-k128-n256"],
)
def test_pallas_block_sizes(blocks):
    m, k, n, sizes = 45, 300, 200, [9, 0, 30, 6]
    lhs, rhs, _ = operands(10, m, k, n, len(sizes))
    sizes = jnp.asarray(sizes, jnp.int32)
    got = grouped_matmul(
        lhs, rhs, sizes, implementation="pallas", interpret=True, block_sizes=blocks
    )
    want = grouped_matmul(lhs, rhs, sizes, implementation="reference")
    assert_close(got, want, jnp.float32, scale=scale(k))
