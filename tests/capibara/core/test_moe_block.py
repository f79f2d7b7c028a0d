"""MoEBlock against its dense reference (every expert on every token, masked by the routing).

The block runs on ``capibara.kernels.moe.permute`` + ``capibara.kernels.grouped_matmul`` +
``capibara.kernels.moe.unpermute``; the reference on three dense einsums. Outputs and gradients
of every parameter must agree, and dropless routing must be batch-invariant.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capibara.core.routing import (
    ExpertChoiceRouterConfig,
    MoEBlock,
    MoEBlockConfig,
    RoutingContext,
    TokenRouterConfig,
)
from capibara.kernels.testing import assert_close

D, FFN = 32, 24


def _block(
    router, seed=0, num_shared_experts=0, implementation="xla", param_dtype=jnp.float32, **kw
) -> MoEBlock:
    config = MoEBlockConfig(
        d_model=D,
        ffn_dim=FFN,
        router=router,
        num_shared_experts=num_shared_experts,
        implementation=implementation,
        **kw,
    )
    return MoEBlock(config, rngs=nnx.Rngs(seed), param_dtype=param_dtype)


def _tokens(seed, *shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), (*shape, D)).astype(dtype)


@nnx.jit(static_argnames="reference")
def _forward(block, x, context=None, reference=False):
    return (block.reference if reference else block)(x, context)


CASES = {
    "top2-softmax": dict(router=TokenRouterConfig(num_experts=4, top_k=2)),
    "top1-sigmoid": dict(
        router=TokenRouterConfig(num_experts=4, top_k=1, score_function="sigmoid")
    ),
    # Capacity drops, z-loss and the balancing bias (updated in training steps).
    "top2-capacity": dict(
        router=TokenRouterConfig(
            num_experts=4, top_k=2, capacity_factor=0.75, z_loss_weight=1e-3, bias_update_rate=0.01
        )
    ),
    "top2-shared": dict(router=TokenRouterConfig(num_experts=4, top_k=2), num_shared_experts=2),
    "expert-choice": dict(router=ExpertChoiceRouterConfig(num_experts=4, capacity_factor=1.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_matches_dense_reference(case):
    block = _block(seed=1, **CASES[case])
    x = _tokens(2, 3, 10)
    y, routing = _forward(block, x)
    expected, expected_routing = _forward(block, x, reference=True)
    assert y.shape == x.shape
    np.testing.assert_array_equal(routing.expert_ids, expected_routing.expert_ids)
    assert_close(y, expected, jnp.float32)
    if case == "top2-capacity":
        assert routing.stats["dropped_fraction"] > 0, "the capacity case should drop something"


def test_pallas_kernels_in_interpret_mode_match_reference():
    block = _block(
        TokenRouterConfig(num_experts=3, top_k=2), seed=3, implementation="pallas", interpret=True
    )
    x = _tokens(4, 12)
    y, _ = _forward(block, x)
    expected, _ = _forward(block, x, reference=True)
    assert_close(y, expected, jnp.float32)


def test_bf16_matches_dense_reference():
    block = _block(TokenRouterConfig(num_experts=4, top_k=2), seed=5, param_dtype=jnp.bfloat16)
    x = _tokens(6, 16, dtype=jnp.bfloat16)
    y, _ = _forward(block, x)
    expected, _ = _forward(block, x, reference=True)
    assert y.dtype == jnp.bfloat16
    assert_close(y, expected, jnp.bfloat16)


@pytest.mark.parametrize("case", ["top2-softmax", "top2-shared", "top2-capacity"])
def test_gradients_reach_router_and_experts_and_match_reference(case):
    block = _block(seed=7, **CASES[case])
    x = _tokens(8, 2, 12)
    cotangent = _tokens(9, 2, 12)
    context = RoutingContext(training=True)

    def loss(block, x, reference):
        y, routing = (block.reference if reference else block)(x, context)
        return jnp.sum(y * cotangent) + routing.total_aux_loss()

    grads = nnx.jit(nnx.grad(functools.partial(loss, reference=False), argnums=(0, 1)))
    ref_grads = nnx.jit(nnx.grad(functools.partial(loss, reference=True), argnums=(0, 1)))
    # Each training step may update the router's balancing bias: give both the same start.
    ref_block = nnx.clone(block)
    block_grads, x_grad = grads(block, x)
    ref_block_grads, ref_x_grad = ref_grads(ref_block, x)
    if block.router.bias is not None:
        assert np.abs(np.asarray(block.router.bias[...])).sum() > 0, "bias not updated"
        np.testing.assert_array_equal(block.router.bias[...], ref_block.router.bias[...])
    assert_close(x_grad, ref_x_grad, jnp.float32, grad=True)
    for path, g in nnx.to_flat_state(block_grads):
        want = dict(nnx.to_flat_state(ref_block_grads))[path]
        assert_close(g[...], want[...], jnp.float32, grad=True, err_msg=str(path))
        assert np.abs(np.asarray(g[...])).sum() > 0, f"no gradient reached {path}"
    names = {path[0] for path, _ in nnx.to_flat_state(block_grads)}
    assert {"router", "w_gate_up", "w_down"} <= names


@pytest.mark.parametrize(
    "top_k,score_function,capacity_factor", [(2, "softmax", None), (1, "sigmoid", 0.5)]
)
def test_dropless_routing_is_batch_invariant(top_k, score_function, capacity_factor):
    """Dropless, or in decode mode (which serves every assignment despite a capacity)."""
    router = TokenRouterConfig(
        num_experts=4, top_k=top_k, score_function=score_function, capacity_factor=capacity_factor
    )
    block = _block(router, seed=10, num_shared_experts=1)
    mine = _tokens(11, 5)
    crowd = _tokens(12, 40) * 2 + 0.5  # other requests, a different distribution
    serving = RoutingContext(decode=True)
    alone, _ = _forward(block, mine, serving)
    batched, _ = _forward(block, jnp.concatenate([crowd[:17], mine, crowd[17:]]), serving)
    assert_close(batched[17:22], alone, jnp.float32)
    # Padding around the same tokens changes nothing either.
    padded = jnp.concatenate([mine, crowd[:3]])[None]
    mask = jnp.zeros((1, 8), bool).at[0, 5:].set(True)
    with_padding, _ = _forward(block, padded, RoutingContext(decode=True, padding_mask=mask))
    assert_close(with_padding[0, :5], alone, jnp.float32)


@pytest.mark.parametrize(
    "router",
    [
        TokenRouterConfig(num_experts=4, top_k=2, capacity_factor=1.0),
        ExpertChoiceRouterConfig(num_experts=4, capacity_factor=1.0),
    ],
    ids=["capacity", "expert-choice"],
)
def test_capacity_and_expert_choice_are_not_batch_invariant(router):
    """The documented counterexamples: neighbours change a token's route."""
    block = _block(router, seed=14)
    mine = _tokens(13, 4)
    alone = block.router.route(mine)
    # A crowd of near-copies of my first token competes for exactly its experts.
    crowd = jnp.tile(mine[:1], (20, 1)) * 1.01
    batched = block.router.route(jnp.concatenate([crowd, mine]))
    mine_alone = np.where(alone.kept[0], alone.weights[0], 0)
    mine_batched = np.where(batched.kept[20], batched.weights[20], 0)
    assert not np.allclose(mine_batched, mine_alone, atol=1e-3)


def test_dropped_and_padding_tokens_get_no_update():
    router = TokenRouterConfig(num_experts=4, top_k=1, capacity_factor=0.25)
    block = _block(router, seed=15)
    x = _tokens(16, 2, 8)
    mask = jnp.zeros((2, 8), bool).at[1, 6:].set(True)
    y, routing = _forward(block, x, RoutingContext(padding_mask=mask))
    untouched = ~np.asarray(routing.kept).any(-1)
    assert untouched.sum() > 2  # the two padding tokens and some dropped ones
    np.testing.assert_array_equal(np.asarray(y).reshape(16, D)[untouched], 0)
    assert routing.stats["dropped_fraction"] > 0


def test_implementation_reaches_the_kernels(monkeypatch):
    """The block's one ``implementation`` setting is what grouped_matmul receives."""
    import capibara.core.moe as moe_module

    seen = []
    real = moe_module.grouped_matmul

    @functools.wraps(real)
    def spy(*args, **kwargs):
        seen.append((kwargs.get("implementation"), kwargs.get("interpret")))
        return real(*args, **kwargs)

    monkeypatch.setattr(moe_module, "grouped_matmul", spy)
    for implementation, interpret in [("reference", False), ("pallas", True), (None, False)]:
        seen.clear()
        block = _block(
            TokenRouterConfig(num_experts=2, top_k=1),
            implementation=implementation,
            interpret=interpret,
        )
        jax.eval_shape(lambda x, block=block: block(x)[0], _tokens(17, 4))  # tracing is enough
        assert seen == [(implementation, interpret)] * 2
