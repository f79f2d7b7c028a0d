"""Token choice (``TokenRouter``) and expert choice (``ExpertChoiceRouter``) routers.

Both score every token against every expert with one f32 ``[d, E]`` matmul (routers
run in f32 whatever the model's dtype: top-k of near-ties is unstable in bf16).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from capibara.core.router_base import (
    BaseRouter,
    Routing,
    RoutingContext,
    entropy,
    load_stats,
    masked_mean,
)

SCORE_FUNCTIONS = ("softmax", "sigmoid")


class BalancingBias(nnx.Variable):
    """Per-expert selection bias of auxiliary-loss-free balancing: state, not a parameter.

    It is updated by a sign rule in the forward pass of training steps, never by the
    optimizer (filter parameters with ``nnx.Param``; this is not one).
    """


# -- Losses --------------------------------------------------------------------------


def switch_load_balancing_loss(
    probs: jax.Array, expert_ids: jax.Array, valid: jax.Array
) -> jax.Array:
    """Switch Transformer load-balancing loss ``E · Σ_e f_e · P_e`` (Fedus et al. 2021).

    ``f_e`` is the fraction of (non-padding) token-slot assignments sent to expert
    ``e`` and ``P_e`` the mean probability the router gives ``e``. It is 1 for perfectly
    uniform routing (``f_e = P_e = 1/E``) and grows as load concentrates; only ``P``
    carries a gradient (``f`` comes from a top-k).

    Args:
      probs: f32 ``[t, E]``, each row a distribution over experts.
      expert_ids: int32 ``[t, k]``, the experts chosen (before any capacity drop).
      valid: bool ``[t]``, False for padding tokens.
    """
    num_experts = probs.shape[-1]
    chosen = jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32), axis=1)
    fraction_routed = masked_mean(chosen, valid) / expert_ids.shape[1]  # [E] f_e
    mean_prob = masked_mean(probs, valid)  # [E] P_e
    return num_experts * jnp.sum(jax.lax.stop_gradient(fraction_routed) * mean_prob)


def router_z_loss(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over non-padding tokens of ``logsumexp(logits)²``.

    Keeps router logits small, so the f32 softmax stays well conditioned (Zoph et al. 2022).
    """
    return masked_mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)), valid)


def _distribution(scores: jax.Array, score_function: str) -> jax.Array:
    """Scores ``[t, E]`` as a distribution over experts (sigmoid scores normalised)."""
    if score_function == "softmax":
        return scores
    return scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), 1e-9)


# -- Token choice --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenRouterConfig:
    """Settings of ``TokenRouter``."""

    num_experts: int
    top_k: int = 2
    score_function: str = "softmax"  # "softmax" (Mixtral) or "sigmoid" (DeepSeek-V3)
    renormalize: bool = True  # top-k weights divided by their sum (sum to 1)
    capacity_factor: float | None = None  # None = dropless; else ceil(t·k/E·factor), not in decode
    load_balance_weight: float = 0.01  # Switch loss coefficient (0 = off)
    z_loss_weight: float = 0.0  # ST-MoE uses 1e-3 (0 = off)
    bias_update_rate: float = 0.0  # DeepSeek-V3 aux-loss-free balancing, 1e-3 there (0 = off)
    jitter_noise: float = 0.0  # multiplicative U(1-eps, 1+eps) on inputs, training only

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"TokenRouterConfig.num_experts={self.num_experts} must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"TokenRouterConfig.top_k={self.top_k} must be in [1, num_experts="
                f"{self.num_experts}]"
            )
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(
                f"TokenRouterConfig.score_function={self.score_function!r} is not one of "
                f"{SCORE_FUNCTIONS}"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"TokenRouterConfig.capacity_factor={self.capacity_factor} must be > 0 "
                "(or None for dropless routing)"
            )
        for name in ("load_balance_weight", "z_loss_weight", "bias_update_rate", "jitter_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"TokenRouterConfig.{name}={getattr(self, name)} must be >= 0")
        if self.jitter_noise >= 1:
            raise ValueError(
                f"TokenRouterConfig.jitter_noise={self.jitter_noise} must be < 1 (it scales "
                "inputs by U(1-eps, 1+eps))"
            )

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for ``num_tokens`` tokens: ``ceil(t·k/E·factor)``; None = dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(num_tokens * self.top_k / self.num_experts * self.capacity_factor)


def within_capacity(
    expert_ids: jax.Array, kept: jax.Array, num_experts: int, capacity: int
) -> jax.Array:
    """bool ``[t, k]``: the assignment fits in its expert's first ``capacity`` slots.

    Priority is slot-major, then by position: every token's first choice is placed
    before any token's second choice, and among equal slots earlier tokens come first
    (Switch/GShard). Assignments not ``kept`` (padding) take no slot.
    """
    num_tokens, top_k = expert_ids.shape
    one_hot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.int32) * kept[..., None]
    slot_major = one_hot.transpose(1, 0, 2).reshape(top_k * num_tokens, num_experts)
    position = jnp.cumsum(slot_major, axis=0) - 1  # queue position within each expert
    position = position.reshape(top_k, num_tokens, num_experts).transpose(1, 0, 2)
    position_of_assignment = jnp.sum(position * one_hot, axis=-1)  # [t, k]
    return kept & (position_of_assignment < capacity)


class TokenRouter(BaseRouter):
    """Token choice: each token picks its top-k experts (Switch, Mixtral, DeepSeek-V3).

    Dropless (``capacity_factor=None``) it is batch-invariant at inference: a token's
    experts and weights depend on that token alone. A capacity makes a token's fate
    depend on its batch neighbours, so it is applied in training and prefill only,
    never with ``context.decode=True`` (see ``capibara.core.routing``).
    """

    def __init__(self, d_model: int, config: TokenRouterConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.initializers.normal(stddev=d_model**-0.5)
        self.kernel = nnx.Param(init(rngs.params(), (d_model, config.num_experts), jnp.float32))
        if config.bias_update_rate > 0:
            self.bias = BalancingBias(jnp.zeros((config.num_experts,), jnp.float32))
        else:
            self.bias = None
        self.jitter_rngs = rngs["jitter"].fork() if config.jitter_noise > 0 else None

    def logits(self, tokens: jax.Array, context: RoutingContext) -> jax.Array:
        """f32 ``[t, E]`` router logits of ``tokens [t, d]`` (jittered in training)."""
        x = tokens.astype(jnp.float32)
        eps = self.config.jitter_noise
        if context.training and eps > 0:
            x = x * jax.random.uniform(self.jitter_rngs(), x.shape, x.dtype, 1 - eps, 1 + eps)
        return jnp.dot(x, self.kernel[...], precision=jax.lax.Precision.HIGHEST)

    def compute_routing(self, tokens, valid, context, lead_shape) -> Routing:
        cfg = self.config
        logits = self.logits(tokens, context)
        if cfg.score_function == "softmax":
            scores = jax.nn.softmax(logits, axis=-1)
        else:
            scores = jax.nn.sigmoid(logits)

        # The balancing bias shifts which experts are *selected*; the weights stay the
        # unbiased scores, so the bias never changes what a chosen expert contributes.
        selection = scores if self.bias is None else scores + self.bias[...][None, :]
        _, expert_ids = jax.lax.top_k(selection, cfg.top_k)
        weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
        if cfg.renormalize:
            weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-9)

        kept = jnp.broadcast_to(valid[:, None], expert_ids.shape)
        # Serving must be batch-invariant: a capacity would let co-batched requests
        # decide which of a token's experts run.
        capacity = None if context.decode else cfg.capacity(tokens.shape[0])
        if capacity is not None:
            kept = within_capacity(expert_ids, kept, cfg.num_experts, capacity)
        weights = jnp.where(kept, weights, 0.0)

        probs = _distribution(scores, cfg.score_function)
        aux_losses = {}
        if cfg.load_balance_weight > 0:
            balance = switch_load_balancing_loss(probs, expert_ids, valid)
            aux_losses["load_balance"] = cfg.load_balance_weight * balance
        if cfg.z_loss_weight > 0:
            aux_losses["z_loss"] = cfg.z_loss_weight * router_z_loss(logits, valid)

        stats = load_stats(expert_ids, kept, valid, cfg.num_experts)
        stats["router_entropy"] = masked_mean(entropy(probs), valid)
        stats = jax.lax.stop_gradient(stats)
        if context.training and self.bias is not None:
            self._update_bias(expert_ids, valid)
        return Routing(expert_ids.astype(jnp.int32), weights, kept, aux_losses, stats)

    def _update_bias(self, expert_ids: jax.Array, valid: jax.Array) -> None:
        """DeepSeek-V3's sign rule: ``b_e += γ · sign(mean load - load_e)``.

        The load is what the router *selected* this step (before capacity drops), over
        non-padding tokens: overloaded experts become less attractive, idle ones more.
        """
        chosen = jax.nn.one_hot(expert_ids, self.config.num_experts, dtype=jnp.float32)
        load = jnp.sum(chosen * valid[:, None, None].astype(jnp.float32), axis=(0, 1))
        step = self.config.bias_update_rate * jnp.sign(jnp.mean(load) - load)
        self.bias[...] = self.bias[...] + jax.lax.stop_gradient(step)


# -- Expert choice -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertChoiceRouterConfig:
    """Settings of ``ExpertChoiceRouter``."""

    num_experts: int
    capacity_factor: float = 2.0  # each expert takes c = ceil(t·factor/E) tokens
    z_loss_weight: float = 0.0  # ST-MoE router z-loss coefficient (0 = off)

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(
                f"ExpertChoiceRouterConfig.num_experts={self.num_experts} must be >= 1"
            )
        if not self.capacity_factor > 0:
            raise ValueError(
                f"ExpertChoiceRouterConfig.capacity_factor={self.capacity_factor} must be > 0"
            )
        if self.z_loss_weight < 0:
            raise ValueError(
                f"ExpertChoiceRouterConfig.z_loss_weight={self.z_loss_weight} must be >= 0"
            )

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert takes: ``min(t, ceil(t·factor/E))``."""
        return min(num_tokens, math.ceil(num_tokens * self.capacity_factor / self.num_experts))


class ExpertChoiceRouter(BaseRouter):
    """Expert choice (Zhou et al. 2022): each expert picks its top-c tokens.

    Every expert gets exactly ``c`` tokens (perfect balance, no balancing loss); a
    token may be picked by 0 to E experts. The ``Routing`` therefore has ``k = E``
    slots, slot ``e`` being expert ``e``, ``kept`` where it picked the token.

    It ranks tokens across the whole batch, so it is for training (and offline scoring
    of whole sequences), not serving: ``context.decode=True`` raises.
    """

    def __init__(self, d_model: int, config: ExpertChoiceRouterConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.initializers.normal(stddev=d_model**-0.5)
        self.kernel = nnx.Param(init(rngs.params(), (d_model, config.num_experts), jnp.float32))

    def compute_routing(self, tokens, valid, context, lead_shape) -> Routing:
        if context.decode:
            raise ValueError(
                "ExpertChoiceRouter cannot route in decode mode (context.decode=True): each "
                "expert picks its top-c tokens among *all* tokens of the batch, so a token's "
                "route depends on tokens that come after it and on its batch neighbours, "
                "which a step-by-step decode does not have. Use it for training only, or "
                "serve the model with a TokenRouter."
            )
        cfg = self.config
        num_tokens, num_experts = tokens.shape[0], cfg.num_experts
        logits = jnp.dot(
            tokens.astype(jnp.float32), self.kernel[...], precision=jax.lax.Precision.HIGHEST
        )
        scores = jax.nn.softmax(logits, axis=-1)  # [t, E]
        capacity = cfg.capacity(num_tokens)

        # Padding tokens rank below every real token (scores are >= 0).
        ranked = jnp.where(valid[:, None], scores, -1.0).T  # [E, t]
        _, token_ids = jax.lax.top_k(ranked, capacity)  # [E, c]
        picked = jnp.zeros((num_experts, num_tokens), bool)
        picked = picked.at[jnp.arange(num_experts)[:, None], token_ids].set(True)
        kept = picked.T & valid[:, None]  # [t, E]

        expert_ids = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), kept.shape)
        weights = jnp.where(kept, scores, 0.0)
        aux_losses = {}
        if cfg.z_loss_weight > 0:
            aux_losses["z_loss"] = cfg.z_loss_weight * router_z_loss(logits, valid)
        unrouted = valid & ~jnp.any(kept, axis=-1)
        stats = {
            "tokens_per_expert": jnp.sum(kept.astype(jnp.float32), axis=0),
            # Tokens no expert picked: they pass through the residual alone.
            "dropped_fraction": jnp.sum(unrouted.astype(jnp.float32))
            / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0),
            "router_entropy": masked_mean(entropy(scores), valid),
        }
        return Routing(expert_ids, weights, kept, aux_losses, jax.lax.stop_gradient(stats))
