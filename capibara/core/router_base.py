"""What every router shares: the ``Routing`` result, the ``RoutingContext`` and ``BaseRouter``.

A router looks at tokens ``[..., d]`` and says, for each of the ``t`` tokens (the
leading dimensions flattened), which ``k`` experts it goes to and with which weight.
``BaseRouter.route`` does the bookkeeping (flattening, the padding mask, the default
context); subclasses implement ``compute_routing`` on the flat ``[t, d]`` tokens.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Where each token goes: the output of every router (a pytree).

    Attributes:
      expert_ids: int32 ``[t, k]``, the experts (or, for Mixture-of-Depths, the path:
        0 = fast, 1 = slow) of each token, one per slot.
      weights: f32 ``[t, k]``, the factor each slot's output is multiplied by; 0 where
        ``kept`` is False.
      kept: bool ``[t, k]``, the slot is computed: False for an assignment dropped by
        an expert's capacity, for a token no expert picked, and for padding tokens.
        A token whose slots are all dropped passes through the residual unchanged.
      aux_losses: name -> f32 scalar, already multiplied by its configured weight, to
        be added to the training loss.
      stats: name -> f32 array, for monitoring only (no gradient flows through them):
        ``tokens_per_expert [E]`` (kept, non-padding assignments), ``dropped_fraction``
        (of non-padding assignments), ``router_entropy`` (mean over non-padding tokens,
        nats) and whatever a router adds.
    """

    expert_ids: jax.Array
    weights: jax.Array
    kept: jax.Array
    aux_losses: dict[str, jax.Array]
    stats: dict[str, jax.Array]

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]

    def total_aux_loss(self) -> jax.Array:
        """f32 scalar: the sum of ``aux_losses`` (0 if there are none)."""
        return sum(self.aux_losses.values(), jnp.zeros((), jnp.float32))


@dataclasses.dataclass(frozen=True)
class RoutingContext:
    """What a router may need beyond the tokens themselves.

    Attributes:
      training: training step: jitter noise is applied, the balancing bias is updated.
      decode: serving: tokens are routed one step at a time from a KV cache (or in a
        prefill that must agree with that), so routing must be causal and
        batch-invariant: ``TokenRouter`` ignores its capacity, ``DualProcessRouter``
        routes by its causal predictor, ``ExpertChoiceRouter`` refuses (see
        ``capibara.core.routing``).
      padding_mask: bool, the tokens' leading shape (e.g. ``[batch, seq]``) or
        ``None``; True marks a padding token. Padding tokens are not computed and do not
        count toward expert load, the balancing losses or the statistics.
    """

    training: bool = False
    decode: bool = False
    padding_mask: jax.Array | None = None


# training/decode pick code paths, so they are static; the mask is traced data.
jax.tree_util.register_dataclass(
    RoutingContext, data_fields=["padding_mask"], meta_fields=["training", "decode"]
)


class BaseRouter(nnx.Module):
    """A router: ``route(inputs [..., d], context) -> Routing`` over the flattened tokens.

    Subclasses implement ``compute_routing``; ``route`` flattens the leading
    dimensions, turns the padding mask into a ``valid [t]`` mask and checks shapes.
    """

    def route(self, inputs: jax.Array, context: RoutingContext | None = None) -> Routing:
        """Routes every token of ``inputs``.

        Args:
          inputs: ``[..., d]`` tokens; the leading dimensions are flattened to ``t``.
          context: training/decode flags and the padding mask; ``None`` = inference,
            no padding.

        Returns:
          ``Routing`` with ``[t, k]`` ids/weights/kept, ``t = prod(inputs.shape[:-1])``.
        """
        tokens, valid, context, lead_shape = flatten_tokens(inputs, context)
        return self.compute_routing(tokens, valid, context, lead_shape)

    def compute_routing(
        self,
        tokens: jax.Array,
        valid: jax.Array,
        context: RoutingContext,
        lead_shape: tuple[int, ...],
    ) -> Routing:
        """Routes ``tokens [t, d]``; implemented by each router.

        Args:
          tokens: ``[t, d]``.
          valid: bool ``[t]``, False for padding tokens.
          context: the caller's context (training, decode).
          lead_shape: the leading shape ``tokens`` was flattened from (``[batch, seq]``
            for routers that work per sequence).
        """
        raise NotImplementedError


# -- Shared helpers ------------------------------------------------------------------


def flatten_tokens(
    inputs: jax.Array, context: RoutingContext | None
) -> tuple[jax.Array, jax.Array, RoutingContext, tuple[int, ...]]:
    """``inputs [..., d]`` -> ``(tokens [t, d], valid bool[t], context, leading shape)``.

    ``valid`` is False for padding tokens; ``context`` defaults to inference, no padding.
    """
    context = RoutingContext() if context is None else context
    if inputs.ndim < 1:
        raise ValueError(f"inputs must be [..., d], got inputs.shape={inputs.shape}")
    lead_shape = inputs.shape[:-1]
    num_tokens = math.prod(lead_shape)
    if context.padding_mask is None:
        valid = jnp.ones((num_tokens,), bool)
    else:
        if context.padding_mask.shape != lead_shape:
            raise ValueError(
                f"context.padding_mask.shape={context.padding_mask.shape} must be the "
                f"tokens' leading shape {lead_shape} (inputs.shape={inputs.shape})"
            )
        valid = ~context.padding_mask.reshape(num_tokens).astype(bool)
    return inputs.reshape(num_tokens, inputs.shape[-1]), valid, context, lead_shape


def masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of ``values [t, ...]`` over the rows where ``valid [t]``; 0 if none are."""
    weight = valid.astype(jnp.float32).reshape(valid.shape + (1,) * (values.ndim - 1))
    count = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
    return jnp.sum(values * weight, axis=0) / count


def entropy(probs: jax.Array) -> jax.Array:
    """``[t, E]`` distributions -> ``[t]`` entropies in nats (0·log 0 = 0)."""
    return -jnp.sum(
        jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), -1
    )


def load_stats(
    expert_ids: jax.Array, kept: jax.Array, valid: jax.Array, num_experts: int
) -> dict[str, jax.Array]:
    """``tokens_per_expert [E]`` and ``dropped_fraction`` of the non-padding assignments."""
    one_hot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32)  # [t, k, E]
    tokens_per_expert = jnp.sum(one_hot * kept[..., None], axis=(0, 1))
    num_assignments = jnp.sum(valid.astype(jnp.float32)) * expert_ids.shape[1]
    dropped = num_assignments - jnp.sum(tokens_per_expert)
    return {
        "tokens_per_expert": tokens_per_expert,
        "dropped_fraction": dropped / jnp.maximum(num_assignments, 1.0),
    }
