"""Bad router/block settings raise ValueError (TypeError for a wrong type) naming the field."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from capibara.core.routing import (
    DualProcessRouterConfig,
    ExpertChoiceRouterConfig,
    MoEBlockConfig,
    RoutingContext,
    TokenRouter,
    TokenRouterConfig,
)

BAD_CONFIGS = {
    "k>E": (lambda: TokenRouterConfig(num_experts=4, top_k=5), r"TokenRouterConfig\.top_k=5"),
    "k=0": (lambda: TokenRouterConfig(num_experts=4, top_k=0), r"TokenRouterConfig\.top_k=0"),
    "no-experts": (
        lambda: TokenRouterConfig(num_experts=0, top_k=1),
        r"TokenRouterConfig\.num_experts=0",
    ),
    "capacity=0": (
        lambda: TokenRouterConfig(num_experts=4, capacity_factor=0.0),
        r"TokenRouterConfig\.capacity_factor=0\.0",
    ),
    "capacity<0": (
        lambda: TokenRouterConfig(num_experts=4, capacity_factor=-1.0),
        r"TokenRouterConfig\.capacity_factor=-1\.0",
    ),
    "score-function": (
        lambda: TokenRouterConfig(num_experts=4, score_function="relu"),
        r"TokenRouterConfig\.score_function='relu'",
    ),
    "negative-loss-weight": (
        lambda: TokenRouterConfig(num_experts=4, z_loss_weight=-1e-3),
        r"TokenRouterConfig\.z_loss_weight",
    ),
    "jitter>=1": (
        lambda: TokenRouterConfig(num_experts=4, jitter_noise=1.0),
        r"TokenRouterConfig\.jitter_noise=1\.0",
    ),
    "expert-choice-capacity": (
        lambda: ExpertChoiceRouterConfig(num_experts=4, capacity_factor=0),
        r"ExpertChoiceRouterConfig\.capacity_factor=0",
    ),
    "mod-capacity=0": (
        lambda: DualProcessRouterConfig(capacity=0.0),
        r"DualProcessRouterConfig\.capacity=0\.0",
    ),
    "mod-capacity>1": (
        lambda: DualProcessRouterConfig(capacity=1.5),
        r"DualProcessRouterConfig\.capacity=1\.5",
    ),
    "mod-fast-path": (
        lambda: DualProcessRouterConfig(fast_path="skip"),
        r"DualProcessRouterConfig\.fast_path='skip'",
    ),
    "block-ffn": (
        lambda: MoEBlockConfig(d_model=8, ffn_dim=0, router=TokenRouterConfig(num_experts=2)),
        r"MoEBlockConfig\.ffn_dim=0",
    ),
    "block-implementation": (
        lambda: MoEBlockConfig(
            d_model=8, ffn_dim=8, router=TokenRouterConfig(num_experts=2), implementation="cuda"
        ),
        r"MoEBlockConfig\.implementation='cuda'",
    ),
    "block-shared": (
        lambda: MoEBlockConfig(
            d_model=8, ffn_dim=8, router=TokenRouterConfig(num_experts=2), num_shared_experts=-1
        ),
        r"MoEBlockConfig\.num_shared_experts=-1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_raises_naming_the_field(case):
    make, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=message):
        make()


def test_block_router_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"MoEBlockConfig\.router"):
        MoEBlockConfig(d_model=8, ffn_dim=8, router=DualProcessRouterConfig())


def test_padding_mask_of_the_wrong_shape_names_both_shapes():
    router = TokenRouter(8, TokenRouterConfig(num_experts=2, top_k=1), rngs=nnx.Rngs(0))
    context = RoutingContext(padding_mask=jnp.zeros((2, 3), bool))
    with pytest.raises(ValueError, match=r"padding_mask\.shape=\(2, 3\).*\(2, 4\)"):
        router.route(jnp.zeros((2, 4, 8)), context)
