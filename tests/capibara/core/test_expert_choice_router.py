"""ExpertChoiceRouter: every expert takes exactly c tokens, the best c; no decode."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capibara.core.routing import ExpertChoiceRouter, ExpertChoiceRouterConfig, RoutingContext
from capibara.kernels.testing import assert_close

D = 16


def _router(num_experts=4, capacity_factor=2.0, seed=0, **kw) -> ExpertChoiceRouter:
    config = ExpertChoiceRouterConfig(
        num_experts=num_experts, capacity_factor=capacity_factor, **kw
    )
    return ExpertChoiceRouter(D, config, rngs=nnx.Rngs(seed))


def _np_scores(router, x):
    logits = np.asarray(x, np.float64).reshape(-1, D) @ np.asarray(router.kernel[...], np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize(
    "num_experts,capacity_factor,t", [(4, 2.0, 24), (8, 1.0, 20), (3, 0.5, 7), (2, 4.0, 5)]
)
def test_every_expert_gets_exactly_c_tokens_its_best(num_experts, capacity_factor, t):
    router = _router(num_experts, capacity_factor, seed=num_experts)
    x = jax.random.normal(jax.random.key(t), (t, D))
    routing = router.route(x)
    c = min(t, math.ceil(t * capacity_factor / num_experts))
    assert router.config.capacity(t) == c

    kept = np.asarray(routing.kept)
    assert kept.shape == (t, num_experts)
    np.testing.assert_array_equal(kept.sum(0), np.full(num_experts, c))
    np.testing.assert_array_equal(routing.stats["tokens_per_expert"], np.full(num_experts, c))
    np.testing.assert_array_equal(routing.expert_ids, np.tile(np.arange(num_experts), (t, 1)))

    scores = _np_scores(router, x)
    for e in range(num_experts):
        # No token the expert left out scores above one it took.
        taken, left = scores[kept[:, e], e], scores[~kept[:, e], e]
        if left.size:
            assert taken.min() >= left.max() - 1e-6
    assert_close(routing.weights, np.where(kept, scores, 0.0), jnp.float32)
    unrouted = ~kept.any(1)
    assert_close(routing.stats["dropped_fraction"], unrouted.mean(), jnp.float32)


def test_padding_tokens_are_never_picked():
    router = _router(4, 2.0)
    x = jax.random.normal(jax.random.key(1), (2, 8, D))
    padding = jnp.zeros((2, 8), bool).at[:, 6:].set(True)
    routing = router.route(x, RoutingContext(padding_mask=padding))
    kept = np.asarray(routing.kept)
    assert not kept[np.asarray(padding).ravel()].any()
    # 12 real tokens, c = ceil(16 * 2 / 4) = 8 each: still exactly c per expert.
    np.testing.assert_array_equal(kept.sum(0), np.full(4, 8))


def test_decode_mode_raises_and_says_why():
    router = _router()
    with pytest.raises(ValueError, match=r"decode mode.*all\* tokens of the batch"):
        router.route(jnp.ones((4, 1, D)), RoutingContext(decode=True))


def test_z_loss_is_reported_and_reaches_the_kernel():
    router = _router(z_loss_weight=0.1)
    x = jax.random.normal(jax.random.key(2), (12, D))
    grads = nnx.grad(lambda r: r.route(x).total_aux_loss())(router)
    assert np.abs(np.asarray(grads["kernel"][...])).sum() > 0
