"""DualProcessRouter (Mixture-of-Depths): exact slow fraction, outputs, causality, learning."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from capibara.core.routing import (
    SLOW,
    DualProcessRouter,
    DualProcessRouterConfig,
    RoutingContext,
)
from capibara.kernels.testing import assert_close

D = 16
TRAIN = RoutingContext(training=True)
DECODE = RoutingContext(decode=True)


def _router(seed=0, **config) -> DualProcessRouter:
    return DualProcessRouter(D, DualProcessRouterConfig(**config), rngs=nnx.Rngs(seed))


def _tokens(seed, *shape):
    return jax.random.normal(jax.random.key(seed), (*shape, D))


def _np_logits(router, x):
    return np.asarray(x, np.float64).reshape(-1, D) @ np.asarray(router.kernel[...], np.float64)


@pytest.mark.parametrize("capacity,seq_len", [(0.25, 16), (0.5, 10), (0.125, 8), (1.0, 4)])
def test_training_sends_exactly_the_configured_fraction_to_the_slow_path(capacity, seq_len):
    router = _router(capacity=capacity)
    x = _tokens(seq_len, 3, seq_len)
    routing = router.route(x, TRAIN)
    slow = np.asarray(routing.expert_ids).reshape(3, seq_len) == SLOW
    c = math.ceil(capacity * seq_len)
    np.testing.assert_array_equal(slow.sum(-1), np.full(3, c))
    assert_close(routing.stats["slow_fraction"], c / seq_len, jnp.float32)
    assert_close(routing.stats["fast_fraction"], 1 - c / seq_len, jnp.float32)
    np.testing.assert_array_equal(routing.stats["tokens_per_expert"], [3 * (seq_len - c), 3 * c])

    # The slow tokens are each sequence's top-c router scores.
    logits = _np_logits(router, x).reshape(3, seq_len)
    for b in range(3):
        if c < seq_len:
            assert logits[b][slow[b]].min() >= logits[b][~slow[b]].max() - 1e-6
    weights = np.asarray(routing.weights).reshape(3, seq_len)
    assert_close(weights, np.where(slow, 1 / (1 + np.exp(-logits)), 1.0), jnp.float32)


def test_decode_routes_by_the_causal_predictor():
    router = _router(capacity=0.5)
    x = _tokens(1, 2, 12)
    routing = router.route(x, DECODE)
    predicted = np.asarray(router.predictor(x.reshape(-1, D)))[:, 0] > 0
    np.testing.assert_array_equal(np.asarray(routing.expert_ids)[:, 0] == SLOW, predicted)
    assert_close(routing.stats["slow_fraction"], predicted.mean(), jnp.float32)

    # Causal: changing later tokens never changes an earlier token's route.
    changed = x.at[:, 7:].set(_tokens(2, 2, 5) * 10)
    rerouted = router.route(changed, DECODE)
    np.testing.assert_array_equal(
        np.asarray(routing.expert_ids).reshape(2, 12)[:, :7],
        np.asarray(rerouted.expert_ids).reshape(2, 12)[:, :7],
    )
    # Token by token (one-token sequences) gives the same routes as the whole sequence.
    one_by_one = router.route(x.reshape(24, 1, D), DECODE)
    np.testing.assert_array_equal(one_by_one.expert_ids, routing.expert_ids)


def _causal_mix(w):
    """A slow path that mixes each token with the running mean of the tokens before it."""

    def slow_fn(xs, positions):
        del positions
        running = jnp.cumsum(xs, axis=1) / jnp.arange(1, xs.shape[1] + 1)[None, :, None]
        return jnp.tanh(running @ w)

    return slow_fn


@pytest.mark.parametrize("fast_path", ["residual", "mlp"])
def test_call_runs_the_block_on_the_slow_tokens_only_in_order(fast_path):
    router = _router(3, capacity=0.25, fast_path=fast_path, fast_hidden=8)
    w = jax.random.normal(jax.random.key(4), (D, D)) / 4
    x = _tokens(5, 2, 16)
    seen_positions = []

    def slow_fn(xs, positions):
        seen_positions.append(positions)
        return _causal_mix(w)(xs, positions)

    y, routing = router(x, slow_fn, TRAIN)
    slow = np.asarray(routing.expert_ids).reshape(2, 16) == SLOW
    weights = np.asarray(routing.weights).reshape(2, 16, 1)

    expected = np.array(x)
    for b in range(2):
        idx = np.flatnonzero(slow[b])
        np.testing.assert_array_equal(seen_positions[0][b], idx)
        update = np.asarray(_causal_mix(w)(x[b : b + 1, idx], None))[0]
        expected[b, idx] += weights[b, idx] * update
        fast = np.flatnonzero(~slow[b])
        if fast_path == "mlp":
            expected[b, fast] += np.asarray(router.fast_mlp(x[b, fast]))
    assert_close(y, expected, jnp.float32)


def test_decode_call_keeps_the_block_update_only_on_predicted_slow_tokens():
    router = _router(6, capacity=0.5)
    w = jax.random.normal(jax.random.key(7), (D, D)) / 4
    x = _tokens(8, 3, 1)  # three sequences, one new token each
    y, routing = router(x, lambda xs, pos: jnp.tanh(xs @ w), DECODE)
    slow = (np.asarray(routing.expert_ids) == SLOW).reshape(3, 1, 1)
    weight = np.asarray(routing.weights).reshape(3, 1, 1)
    expected = np.where(slow, x + weight * np.tanh(np.asarray(x) @ np.asarray(w)), x)
    assert_close(y, expected, jnp.float32)


def test_padding_tokens_stay_on_the_residual_and_do_not_count():
    router = _router(9, capacity=0.5, fast_path="mlp")
    x = _tokens(10, 2, 8)
    padding = jnp.zeros((2, 8), bool).at[1, 4:].set(True)
    y, routing = router(x, lambda xs, pos: xs * 3.0, RoutingContext(True, False, padding))
    pad = np.asarray(padding)
    np.testing.assert_array_equal(np.asarray(y)[pad], np.asarray(x)[pad])
    slow = np.asarray(routing.expert_ids).reshape(2, 8) == SLOW
    assert not slow[pad].any()
    assert_close(routing.stats["slow_fraction"], slow[~pad].sum() / 12, jnp.float32)
    assert routing.stats["tokens_per_expert"].sum() == 12


def test_router_learns_through_the_slow_path_and_predictor_only_through_bce():
    router = _router(11, capacity=0.25)
    w = jax.random.normal(jax.random.key(12), (D, D)) / 4
    x = _tokens(13, 2, 8)

    def output_loss(router):
        y, _ = router(x, lambda xs, pos: jnp.tanh(xs @ w), TRAIN)
        return jnp.sum(y**2)

    grads = nnx.grad(output_loss)(router)
    assert np.abs(np.asarray(grads["kernel"][...])).sum() > 0
    predictor_grads = jax.tree.leaves(grads["predictor"])
    assert all(np.abs(np.asarray(g)).sum() == 0 for g in predictor_grads)

    aux = nnx.grad(lambda r: r.route(x, TRAIN).total_aux_loss())(router)
    assert sum(np.abs(np.asarray(g)).sum() for g in jax.tree.leaves(aux["predictor"])) > 0


def test_predictor_learns_the_top_k_decisions():
    router = _router(14, capacity=0.25, predictor_hidden=32, predictor_loss_weight=1.0)
    optimizer = nnx.Optimizer(router, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(router, optimizer, x):
        def loss(router):
            routing = router.route(x, TRAIN)
            return routing.total_aux_loss(), routing.stats["predictor_accuracy"]

        (_, accuracy), grads = nnx.value_and_grad(loss, has_aux=True)(router)
        # Only the predictor trains here: the router's choices are the fixed target.
        grads["kernel"][...] = jnp.zeros_like(grads["kernel"][...])
        optimizer.update(router, grads)
        return accuracy

    accuracy = [float(step(router, optimizer, _tokens(100 + i, 8, 32))) for i in range(150)]
    assert accuracy[-1] > 0.9 > accuracy[0], accuracy[::15]
