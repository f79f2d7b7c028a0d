"""permute / unpermute: layout, round trip, capacity drops, gradients, and a whole
routed expert MLP (permute -> grouped matmuls -> unpermute) against a per-token loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capibara.kernels import moe
from capibara.kernels.grouped_matmul import grouped_matmul
from capibara.kernels.testing import assert_close


def _routing(seed, t, k, num_experts, d=8):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    ids = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(t)])
    return x, jnp.asarray(ids, jnp.int32)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    t=st.sampled_from([1, 7, 33]),
    k=st.integers(1, 3),
    num_experts=st.sampled_from([3, 8]),
    seed=st.integers(0, 2**16),
)
def test_layout_and_round_trip(t, k, num_experts, seed):
    x, ids = _routing(seed, t, k, num_experts)
    x_sorted, sizes, order = moe.permute(x, ids, num_experts)
    assert x_sorted.shape == (t * k, x.shape[1]) and sizes.dtype == jnp.int32
    np.testing.assert_array_equal(
        sizes, np.bincount(np.asarray(ids).ravel(), minlength=num_experts)
    )
    assert int(order.num_dropped) == 0 and bool(order.kept.all())
    # Row r of x_sorted is its token, and belongs to the expert its group says.
    expert_of_row = np.repeat(np.arange(num_experts), np.asarray(sizes))
    np.testing.assert_array_equal(x_sorted, np.asarray(x)[np.asarray(order.token_ids)])
    positions = np.asarray(order.positions)
    np.testing.assert_array_equal(expert_of_row[positions], ids)
    token_of_choice = np.broadcast_to(np.arange(t)[:, None], (t, k))
    np.testing.assert_array_equal(np.asarray(order.token_ids)[positions], token_of_choice)
    # unpermute(permute(x)) with weights 1/k is x.
    back = moe.unpermute(x_sorted, order, jnp.full((t, k), 1.0 / k))
    assert_close(back, x, jnp.float32)


def test_capacity_drops_by_position_first_choices_first():
    x = jnp.arange(12.0).reshape(6, 2)
    ids = jnp.asarray([[0, 2], [2, 1], [0, 3], [3, 3], [1, 0], [2, 0]], jnp.int32)
    x_sorted, sizes, order = moe.permute(x, ids, 4, capacity=2)
    # Expert 0: first choices of tokens 0 and 2 win over second choices of 4 and 5.
    # Expert 2: first choices of 1 and 5 win over token 0's second choice.
    # Expert 3: token 3's first choice, then second choices in token order: 2 before 3.
    np.testing.assert_array_equal(sizes, [2, 2, 2, 2])
    assert int(order.num_dropped) == 4
    np.testing.assert_array_equal(
        order.kept,
        [[True, False], [True, True], [True, True], [True, False], [True, False], [True, False]],
    )
    np.testing.assert_array_equal(x_sorted[8:], 0)  # dropped rows: zeros after the groups
    kept_tokens = {int(order.token_ids[r]) for r in range(8)}
    assert kept_tokens == {0, 1, 2, 3, 4, 5}
    # A dropped choice contributes nothing.
    out = moe.unpermute(x_sorted, order, jnp.ones((6, 2)))
    expected = np.asarray(x) * np.asarray(order.kept).sum(1, keepdims=True)
    assert_close(out, expected, jnp.float32)


def test_capacity_zero_and_large():
    x, ids = _routing(0, 10, 2, 4)
    _, sizes, order = moe.permute(x, ids, 4, capacity=0)
    assert int(sizes.sum()) == 0 and int(order.num_dropped) == 20
    _, sizes, order = moe.permute(x, ids, 4, capacity=100)
    assert int(sizes.sum()) == 20 and int(order.num_dropped) == 0


def test_out_of_range_expert_ids_are_dropped():
    x = jnp.ones((3, 4))
    ids = jnp.asarray([[0, 5], [-1, 1], [1, 1]], jnp.int32)
    x_sorted, sizes, order = moe.permute(x, ids, 2)
    np.testing.assert_array_equal(sizes, [1, 3])
    assert int(order.num_dropped) == 2
    np.testing.assert_array_equal(x_sorted[4:], 0)


def test_permute_under_jit():
    x, ids = _routing(1, 16, 2, 4)
    got = jax.jit(moe.permute, static_argnames=("num_experts", "capacity"))(x, ids, num_experts=4)
    want = moe.permute(x, ids, 4)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)


def _expert_mlp(x, ids, weights, w_up, w_down, implementation, capacity=None):
    x_sorted, sizes, order = moe.permute(x, ids, w_up.shape[0], capacity=capacity)
    h = jax.nn.silu(grouped_matmul(x_sorted, w_up, sizes, implementation=implementation))
    y = grouped_matmul(h, w_down, sizes, implementation=implementation)
    return moe.unpermute(y, order, weights)


def _loop_mlp(x, ids, weights, w_up, w_down):
    """Choice by choice, each token through its own expert's weights: what routing means."""
    out = 0.0
    for j in range(ids.shape[1]):
        up, down = w_up[ids[:, j]], w_down[ids[:, j]]  # [t, d, f], [t, f, d]
        h = jax.nn.silu(jnp.einsum("td,tdf->tf", x, up, precision="highest"))
        out = out + weights[:, j, None] * jnp.einsum("tf,tfd->td", h, down, precision="highest")
    return out


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_routed_expert_mlp_values_and_gradients(implementation):
    t, k, num_experts, d, f = 12, 2, 4, 8, 16
    x, ids = _routing(2, t, k, num_experts, d)
    rng = np.random.default_rng(3)
    weights = jax.nn.softmax(jnp.asarray(rng.standard_normal((t, k)), jnp.float32))
    w_up = jnp.asarray(rng.standard_normal((num_experts, d, f)) / 3, jnp.float32)
    w_down = jnp.asarray(rng.standard_normal((num_experts, f, d)) / 4, jnp.float32)

    got = _expert_mlp(x, ids, weights, w_up, w_down, implementation)
    assert_close(got, _loop_mlp(x, ids, weights, w_up, w_down), jnp.float32, scale=4)

    args = (x, weights, w_up, w_down)
    grads = jax.grad(
        lambda x, w, u, dn: jnp.sum(_expert_mlp(x, ids, w, u, dn, implementation) ** 2),
        argnums=(0, 1, 2, 3),
    )(*args)
    want = jax.grad(
        lambda x, w, u, dn: jnp.sum(_loop_mlp(x, ids, w, u, dn) ** 2), argnums=(0, 1, 2, 3)
    )(*args)
    for name, g, w in zip(("x", "weights", "w_up", "w_down"), grads, want, strict=True):
        assert_close(g, w, jnp.float32, grad=True, scale=8, err_msg=name)


def test_bad_inputs():
    x = jnp.ones((4, 8))
    with pytest.raises(ValueError, match=r"x must have rank 2.*\(8,\)"):
        moe.permute(x[0], jnp.zeros((4, 2), jnp.int32), 4)
    with pytest.raises(ValueError, match=r"expert_ids must have shape \[t, k\].*\(3, 2\)"):
        moe.permute(x, jnp.zeros((3, 2), jnp.int32), 4)
    with pytest.raises(TypeError, match="expert_ids must be integers"):
        moe.permute(x, jnp.zeros((4, 2)), 4)
    with pytest.raises(ValueError, match="num_experts must be a positive int, got 0"):
        moe.permute(x, jnp.zeros((4, 2), jnp.int32), 0)
    with pytest.raises(ValueError, match="capacity must be None or an int >= 0, got -1"):
        moe.permute(x, jnp.zeros((4, 2), jnp.int32), 4, capacity=-1)
    x_sorted, _, order = moe.permute(x, jnp.zeros((4, 2), jnp.int32), 4)
    with pytest.raises(ValueError, match=r"y_sorted must have shape \[t \* k, d\] = \[8, d\]"):
        moe.unpermute(x_sorted[:7], order, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"weights must have shape \[t, k\] = \(4, 2\)"):
        moe.unpermute(x_sorted, order, jnp.ones((4, 3)))
