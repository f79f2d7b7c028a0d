"""Builds and runs the model's MoE layers: ``CapibaraConfig`` -> ``MoEBlock`` settings."""

from __future__ import annotations

from flax import nnx

from capibara.core.config import CapibaraConfig
from capibara.core.layers import dtype_of
from capibara.core.moe import MoEBlock, MoEBlockConfig
from capibara.core.token_routers import ExpertChoiceRouterConfig, TokenRouterConfig


def router_config(config: CapibaraConfig) -> TokenRouterConfig | ExpertChoiceRouterConfig:
    if config.router_kind == "expert_choice":
        return ExpertChoiceRouterConfig(
            num_experts=config.num_experts,
            capacity_factor=config.capacity_factor or float(config.num_experts_per_token),
            z_loss_weight=config.router_z_loss_coef,
        )
    return TokenRouterConfig(
        num_experts=config.num_experts,
        top_k=config.num_experts_per_token,
        score_function=config.router_score,
        renormalize=config.router_renormalize,
        capacity_factor=config.capacity_factor,
        load_balance_weight=config.router_aux_loss_coef,
        z_loss_weight=config.router_z_loss_coef,
        bias_update_rate=config.router_bias_update_rate,
        jitter_noise=config.router_jitter,
    )


def make_moe_block(config: CapibaraConfig, *, rngs: nnx.Rngs) -> MoEBlock:
    block_config = MoEBlockConfig(
        d_model=config.hidden_size,
        ffn_dim=config.intermediate_size,
        router=router_config(config),
        num_shared_experts=config.num_shared_experts,
        implementation=config.implementation,
        interpret=config.interpret_kernels,
        expert_exchange=config.expert_exchange,
    )
    return MoEBlock(block_config, rngs=rngs, param_dtype=dtype_of(config.param_dtype))
