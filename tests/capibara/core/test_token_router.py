"""TokenRouter: top-k selection, weights, capacity, losses, bias balancing, jitter, padding.

Every expected value is recomputed independently in NumPy from the router's kernel.
"""

from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capibara.core.routing import (
    BalancingBias,
    RoutingContext,
    TokenRouter,
    TokenRouterConfig,
    router_z_loss,
    switch_load_balancing_loss,
)
from capibara.kernels.testing import assert_close

D = 16


def _tokens(seed: int, *shape: int) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (*shape, D), jnp.float32)


def _router(seed: int = 0, **config) -> TokenRouter:
    config.setdefault("num_experts", 4)
    return TokenRouter(D, TokenRouterConfig(**config), rngs=nnx.Rngs(seed))


def _np_scores(router: TokenRouter, x) -> tuple[np.ndarray, np.ndarray]:
    """(logits, scores) ``[t, E]`` in f64 NumPy."""
    logits = np.asarray(x, np.float64).reshape(-1, D) @ np.asarray(router.kernel[...], np.float64)
    if router.config.score_function == "softmax":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return logits, e / e.sum(-1, keepdims=True)
    return logits, 1 / (1 + np.exp(-logits))


def _np_capacity_keep(expert_ids: np.ndarray, valid: np.ndarray, capacity: int) -> np.ndarray:
    """A plain loop: first choices of every token (in order), then second choices, ..."""
    t, k = expert_ids.shape
    kept = np.zeros((t, k), bool)
    used: dict[int, int] = {}
    for slot in range(k):
        for token in range(t):
            if not valid[token]:
                continue
            e = int(expert_ids[token, slot])
            if used.get(e, 0) < capacity:
                used[e] = used.get(e, 0) + 1
                kept[token, slot] = True
    return kept


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**16),
    num_experts=st.integers(1, 8),
    k_fraction=st.floats(0.0, 1.0),
    score_function=st.sampled_from(["softmax", "sigmoid"]),
)
def test_selects_top_k_and_weights_are_renormalised_scores(
    seed, num_experts, k_fraction, score_function
):
    top_k = max(1, round(k_fraction * num_experts))
    router = _router(seed, num_experts=num_experts, top_k=top_k, score_function=score_function)
    x = _tokens(seed + 1, 3, 5)
    routing = router.route(x)
    _, scores = _np_scores(router, x)

    ids, weights = np.asarray(routing.expert_ids), np.asarray(routing.weights)
    assert ids.shape == weights.shape == (15, top_k)
    assert ids.dtype == np.int32
    # The chosen experts are the k best: no unchosen score beats a chosen one.
    chosen = np.take_along_axis(scores, ids, -1)
    unchosen = np.where(np.eye(num_experts, dtype=bool)[ids].any(1), -np.inf, scores)
    assert (chosen.min(-1) >= unchosen.max(-1) - 1e-6).all()
    assert (weights >= 0).all()
    assert_close(weights.sum(-1), np.ones(15), jnp.float32)
    assert_close(weights, chosen / chosen.sum(-1, keepdims=True), jnp.float32)
    assert routing.kept.all()


def test_without_renormalisation_weights_are_the_raw_scores():
    router = _router(3, top_k=2, renormalize=False, score_function="sigmoid")
    x = _tokens(4, 20)
    routing = router.route(x)
    _, scores = _np_scores(router, x)
    assert_close(
        routing.weights, np.take_along_axis(scores, np.asarray(routing.expert_ids), -1), jnp.float32
    )


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_never_exceeded_and_drops_are_counted(capacity_factor):
    # A biased kernel sends most tokens to expert 0, so a capacity must drop some.
    router = _router(5, num_experts=4, top_k=2, capacity_factor=capacity_factor)
    router.kernel[...] = router.kernel[...].at[:, 0].add(0.5)
    x = _tokens(6, 40) + 1.0
    routing = router.route(x)
    capacity = math.ceil(40 * 2 / 4 * capacity_factor)
    assert router.config.capacity(40) == capacity

    ids = np.asarray(routing.expert_ids)
    kept_expected = _np_capacity_keep(ids, np.ones(40, bool), capacity)
    np.testing.assert_array_equal(np.asarray(routing.kept), kept_expected)
    per_expert = np.bincount(ids[kept_expected], minlength=4)
    assert per_expert.max() <= capacity
    np.testing.assert_array_equal(routing.stats["tokens_per_expert"], per_expert)
    assert_close(routing.stats["dropped_fraction"], 1 - kept_expected.mean(), jnp.float32)
    assert routing.stats["dropped_fraction"] > 0, "the skewed input should overflow expert 0"
    assert (np.asarray(routing.weights)[~kept_expected] == 0).all()


def test_switch_loss_is_one_for_perfectly_uniform_routing_and_more_when_skewed():
    num_experts, top_k, t = 4, 2, 8
    uniform_probs = jnp.full((t, num_experts), 1 / num_experts)
    # Every expert receives exactly t*k/E assignments.
    uniform_ids = (jnp.arange(t * top_k) % num_experts).reshape(t, top_k)
    valid = jnp.ones(t, bool)
    assert_close(switch_load_balancing_loss(uniform_probs, uniform_ids, valid), 1.0, jnp.float32)

    skewed_probs = jnp.tile(jnp.array([0.7, 0.1, 0.1, 0.1]), (t, 1))
    skewed_ids = jnp.tile(jnp.array([0, 1]), (t, 1))
    # E · Σ f_e P_e = 4 · (0.5 · 0.7 + 0.5 · 0.1)
    assert_close(switch_load_balancing_loss(skewed_probs, skewed_ids, valid), 1.6, jnp.float32)


def test_aux_losses_match_numpy_and_are_weighted():
    router = _router(7, top_k=2, load_balance_weight=0.5, z_loss_weight=0.25)
    x = _tokens(8, 30)
    routing = router.route(x)
    logits, scores = _np_scores(router, x)
    ids = np.asarray(routing.expert_ids)
    f = np.bincount(ids.ravel(), minlength=4) / ids.size
    balance = 4 * np.sum(f * scores.mean(0))
    lse = np.log(np.exp(logits).sum(-1))
    assert_close(routing.aux_losses["load_balance"], 0.5 * balance, jnp.float32)
    assert_close(routing.aux_losses["z_loss"], 0.25 * np.mean(lse**2), jnp.float32)
    assert_close(
        router_z_loss(jnp.asarray(logits, jnp.float32), jnp.ones(30, bool)),
        np.mean(lse**2),
        jnp.float32,
    )
    assert_close(routing.total_aux_loss(), 0.5 * balance + 0.25 * np.mean(lse**2), jnp.float32)


def test_load_balance_loss_reaches_the_router_kernel():
    router = _router(9, top_k=2, load_balance_weight=1.0, z_loss_weight=1.0)
    x = _tokens(10, 16)
    grads = nnx.grad(lambda r: r.route(x).total_aux_loss())(router)
    assert np.abs(np.asarray(grads["kernel"][...])).sum() > 0


def test_aux_loss_free_bias_balances_a_skewed_stream():
    num_experts = 4
    router = _router(
        11,
        num_experts=num_experts,
        top_k=1,
        score_function="sigmoid",
        bias_update_rate=0.01,
        load_balance_weight=0.0,
    )
    # Expert 0's score is sigmoid(6 + noise): it wins almost every token.
    router.kernel[...] = router.kernel[...].at[:, 0].add(6.0 / D)
    # The bias is state, not a parameter: an optimizer over nnx.Param never touches it.
    assert len(jax.tree.leaves(nnx.state(router, nnx.Param))) == 1
    assert len(jax.tree.leaves(nnx.state(router, BalancingBias))) == 1

    @nnx.jit
    def train_step(router, x):
        return router.route(x, RoutingContext(training=True)).stats["tokens_per_expert"]

    def imbalance(router, seed):  # max load / mean load, at inference (no bias update)
        load = np.asarray(router.route(_tokens(seed, 256) + 1.0).stats["tokens_per_expert"])
        return load.max() / load.mean()

    before = imbalance(router, 0)
    for step in range(300):
        train_step(router, _tokens(100 + step, 64) + 1.0)
    after = imbalance(router, 0)
    assert before > 2.5, f"the stream should start skewed, max/mean load = {before}"
    assert after < 1.3, f"bias balancing left max/mean load = {after} (from {before})"
    bias = np.asarray(router.bias[...])
    assert bias[0] == bias.min(), "the overloaded expert must be pushed down"

    # The bias only changes the selection: weights are still the unbiased scores.
    x = _tokens(1, 32) + 1.0
    routing = router.route(x)
    _, scores = _np_scores(router, x)
    assert_close(routing.weights, np.ones((32, 1)), jnp.float32)  # k=1, renormalised
    unnormalised = TokenRouter(
        D,
        TokenRouterConfig(
            num_experts=4,
            top_k=1,
            renormalize=False,
            score_function="sigmoid",
            bias_update_rate=0.01,
        ),
        rngs=nnx.Rngs(0),
    )
    nnx.update(unnormalised, nnx.state(router))
    routing = unnormalised.route(x)
    assert_close(
        routing.weights, np.take_along_axis(scores, np.asarray(routing.expert_ids), -1), jnp.float32
    )


def test_bias_is_not_updated_outside_training():
    router = _router(12, bias_update_rate=0.1)
    router.route(_tokens(13, 16))
    np.testing.assert_array_equal(router.bias[...], np.zeros(4))
    router.route(_tokens(13, 16), RoutingContext(training=True))
    assert np.abs(np.asarray(router.bias[...])).sum() > 0


def test_jitter_only_in_training():
    x = _tokens(14, 64)
    plain = _router(15, top_k=2)
    jittery = _router(15, top_k=2, jitter_noise=0.5)
    evaluated = jittery.route(x)
    np.testing.assert_array_equal(evaluated.weights, plain.route(x).weights)
    np.testing.assert_array_equal(evaluated.expert_ids, plain.route(x).expert_ids)
    trained = jittery.route(x, RoutingContext(training=True))
    assert not np.allclose(trained.weights, evaluated.weights)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_padding_tokens_do_not_count_toward_load(capacity_factor):
    router = _router(
        16, top_k=2, capacity_factor=capacity_factor, load_balance_weight=1.0, z_loss_weight=1.0
    )
    x = _tokens(17, 2, 12)
    padding = jnp.zeros((2, 12), bool).at[0, 8:].set(True).at[1, 5:].set(True)
    routing = router.route(x, RoutingContext(padding_mask=padding))

    real = x[~np.asarray(padding)]  # the 13 real tokens, in order
    alone = _router(
        16, top_k=2, capacity_factor=capacity_factor, load_balance_weight=1.0, z_loss_weight=1.0
    ).route(real)
    valid = ~np.asarray(padding).ravel()
    assert not np.asarray(routing.kept)[~valid].any()
    assert (np.asarray(routing.weights)[~valid] == 0).all()
    assert_close(routing.aux_losses["load_balance"], alone.aux_losses["load_balance"], jnp.float32)
    assert_close(routing.aux_losses["z_loss"], alone.aux_losses["z_loss"], jnp.float32)
    assert_close(routing.stats["router_entropy"], alone.stats["router_entropy"], jnp.float32)
    if capacity_factor is None:
        # Capacity is a share of all t slots (padding included), so only dropless
        # routing gives the real tokens alone the same loads.
        np.testing.assert_array_equal(
            routing.stats["tokens_per_expert"], alone.stats["tokens_per_expert"]
        )
        assert routing.stats["dropped_fraction"] == 0
    else:
        assert routing.stats["tokens_per_expert"].sum() <= 13 * 2
        kept = _np_capacity_keep(np.asarray(routing.expert_ids), valid, router.config.capacity(24))
        np.testing.assert_array_equal(routing.kept, kept)


def test_decode_mode_serves_every_assignment_despite_a_capacity():
    capped = _router(18, top_k=2, capacity_factor=0.5)
    dropless = _router(18, top_k=2)
    x = _tokens(19, 32) + 1.0
    assert capped.route(x).stats["dropped_fraction"] > 0
    served = capped.route(x, RoutingContext(decode=True))
    expected = dropless.route(x)
    assert served.kept.all()
    np.testing.assert_array_equal(served.expert_ids, expected.expert_ids)
    np.testing.assert_array_equal(served.weights, expected.weights)
    assert served.stats["dropped_fraction"] == 0
