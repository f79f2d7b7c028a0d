"""Mixture-of-Depths (Raposo et al. 2024): a token takes the full block or a cheap path.

``DualProcessRouter`` scores every token with one scalar. In training (and prefill)
the top ``capacity`` fraction of each sequence's tokens take the *slow* path (the full
block: attention + MLP, run on those tokens only), the rest the *fast* path (the
residual alone, or a small MLP). The slow path's output is multiplied by the router
weight ``sigmoid(score)``, which is how the router gets a gradient.

Top-k over the sequence is not causal: whether token ``i`` is in the top-k depends on
tokens after it. So a small per-token predictor (an MLP on the stop-gradient input)
learns, through a BCE auxiliary loss, to guess the top-k decision from the token
alone; in decode (``context.decode=True``) it decides the route, token by token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from capibara.core.router_base import (
    BaseRouter,
    Routing,
    RoutingContext,
    flatten_tokens,
    masked_mean,
)

FAST_PATHS = ("residual", "mlp")
FAST, SLOW = 0, 1  # the "expert ids" of the two paths in a Routing


@dataclasses.dataclass(frozen=True, kw_only=True)
class DualProcessRouterConfig:
    """Settings of ``DualProcessRouter``."""

    capacity: float = 0.125  # fraction of each sequence's tokens on the slow path
    fast_path: str = "residual"  # "residual" (identity) or "mlp" (a small MLP update)
    fast_hidden: int = 64  # hidden width of the fast-path MLP
    predictor_hidden: int = 64  # hidden width of the causal decode-time predictor
    predictor_loss_weight: float = 0.01  # coefficient of the predictor's BCE loss

    def __post_init__(self):
        if not 0 < self.capacity <= 1:
            raise ValueError(
                f"DualProcessRouterConfig.capacity={self.capacity} must be in (0, 1] (the "
                "fraction of tokens on the slow path)"
            )
        if self.fast_path not in FAST_PATHS:
            raise ValueError(
                f"DualProcessRouterConfig.fast_path={self.fast_path!r} is not one of {FAST_PATHS}"
            )
        for name in ("fast_hidden", "predictor_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"DualProcessRouterConfig.{name}={getattr(self, name)} must be >= 1"
                )
        if self.predictor_loss_weight < 0:
            raise ValueError(
                f"DualProcessRouterConfig.predictor_loss_weight={self.predictor_loss_weight} "
                "must be >= 0"
            )

    def slow_tokens(self, seq_len: int) -> int:
        """Tokens per sequence on the slow path in training: ``ceil(capacity · seq_len)``."""
        return min(seq_len, math.ceil(self.capacity * seq_len))


class _MLP(nnx.Module):
    """``d -> hidden -> out`` with a GELU in between."""

    def __init__(self, d_in: int, hidden: int, d_out: int, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(d_in, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, d_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


def _sequence_shape(lead_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(batch, seq)`` of tokens with leading shape ``[..., seq]``."""
    if not lead_shape:
        raise ValueError("DualProcessRouter needs tokens [..., seq, d], got a single vector")
    return math.prod(lead_shape[:-1]), lead_shape[-1]


class DualProcessRouter(BaseRouter):
    """Mixture-of-Depths router: slow path (full block) or fast path per token.

    ``route`` returns a ``Routing`` with ``k = 1`` whose "expert" is the path
    (``FAST = 0``, ``SLOW = 1``) and whose weight is the factor that path's update is
    multiplied by (the router weight on the slow path, 1 on the fast one).
    ``__call__`` also runs the block on the slow tokens.
    """

    def __init__(self, d_model: int, config: DualProcessRouterConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.initializers.normal(stddev=d_model**-0.5)
        self.kernel = nnx.Param(init(rngs.params(), (d_model,), jnp.float32))
        self.predictor = _MLP(d_model, config.predictor_hidden, 1, rngs=rngs)
        if config.fast_path == "mlp":
            self.fast_mlp = _MLP(d_model, config.fast_hidden, d_model, rngs=rngs)
        else:
            self.fast_mlp = None

    def compute_routing(self, tokens, valid, context, lead_shape) -> Routing:
        routing, _ = self._route(tokens, valid, context, lead_shape)
        return routing

    def _route(
        self,
        tokens: jax.Array,
        valid: jax.Array,
        context: RoutingContext,
        lead_shape: tuple[int, ...],
    ) -> tuple[Routing, jax.Array | None]:
        """The ``Routing`` and, outside decode, the slow tokens' positions ``[batch, c]``."""
        batch, seq_len = _sequence_shape(lead_shape)
        x = tokens.astype(jnp.float32)
        logits = jnp.dot(x, self.kernel[...], precision=jax.lax.Precision.HIGHEST)  # [t]
        router_weight = jax.nn.sigmoid(logits)
        # The predictor must not pull on the residual stream: it only imitates the router.
        predictor_logits = self.predictor(jax.lax.stop_gradient(x))[:, 0]  # [t]

        aux_losses, stats = {}, {}
        if context.decode:
            slow = (predictor_logits > 0) & valid
            slow_positions = None
        else:
            num_slow = self.config.slow_tokens(seq_len)
            # Padding ranks last; the ascending sort keeps the slow tokens in causal order.
            ranked = jnp.where(valid, logits, -jnp.inf).reshape(batch, seq_len)
            _, top = jax.lax.top_k(ranked, num_slow)
            slow_positions = jnp.sort(top, axis=-1).astype(jnp.int32)  # [batch, c]
            chosen = jnp.zeros((batch, seq_len), bool)
            chosen = chosen.at[jnp.arange(batch)[:, None], slow_positions].set(True)
            slow = chosen.reshape(-1) & valid
            target = jax.lax.stop_gradient(slow.astype(jnp.float32))
            bce = _sigmoid_bce(predictor_logits, target)
            aux_losses["predictor_bce"] = self.config.predictor_loss_weight * masked_mean(
                bce, valid
            )
            agrees = ((predictor_logits > 0) == slow).astype(jnp.float32)
            stats["predictor_accuracy"] = masked_mean(agrees, valid)

        slow_fraction = masked_mean(slow.astype(jnp.float32), valid)
        valid_f = valid.astype(jnp.float32)
        stats |= {
            "slow_fraction": slow_fraction,
            "fast_fraction": jnp.where(jnp.any(valid), 1.0 - slow_fraction, 0.0),
            "tokens_per_expert": jnp.stack(
                [jnp.sum(valid_f * ~slow), jnp.sum(valid_f * slow)]
            ),  # [fast, slow]
            "dropped_fraction": jnp.zeros((), jnp.float32),
            "router_entropy": masked_mean(_binary_entropy(router_weight), valid),
        }
        expert_ids = jnp.where(slow, SLOW, FAST).astype(jnp.int32)[:, None]
        weights = jnp.where(slow, router_weight, 1.0)[:, None] * valid_f[:, None]
        routing = Routing(
            expert_ids, weights, valid[:, None], aux_losses, jax.lax.stop_gradient(stats)
        )
        return routing, slow_positions

    def __call__(
        self,
        x: jax.Array,
        slow_fn: Callable[[jax.Array, jax.Array], jax.Array],
        context: RoutingContext | None = None,
    ) -> tuple[jax.Array, Routing]:
        """Applies the block to the slow tokens and the fast path to the others.

        Args:
          x: ``[..., seq, d]`` residual stream.
          slow_fn: the full block's *update* (what it adds to the residual),
            ``slow_fn(x_slow [b, n, d], positions int32[b, n]) -> [b, n, d]``, with
            ``positions`` the tokens' indices in their sequence (for RoPE, masks). Outside
            decode it sees only the ``n = ceil(capacity·seq)`` slow tokens, in order; in
            decode it sees every token (``n = seq``) and its update is kept only where
            the predictor chose the slow path.
          context: training/decode flags and padding mask.

        Returns:
          ``(y [..., seq, d], routing)``: ``y = x + w·slow_fn(x)`` on slow tokens,
          ``x + fast(x)`` on the others (``fast = 0`` for ``"residual"``), ``x`` on
          padding.
        """
        tokens, valid, context, lead_shape = flatten_tokens(x, context)
        batch, seq_len = _sequence_shape(lead_shape)
        d = x.shape[-1]
        routing, slow_positions = self._route(tokens, valid, context, lead_shape)

        xs = x.reshape(batch, seq_len, d)
        slow = (routing.expert_ids[:, 0] == SLOW).reshape(batch, seq_len, 1)
        weight = routing.weights[:, 0].reshape(batch, seq_len, 1).astype(jnp.float32)
        valid_3d = valid.reshape(batch, seq_len, 1)
        fast_update = jnp.zeros_like(xs) if self.fast_mlp is None else self.fast_mlp(xs)
        fast_update = jnp.where(slow | ~valid_3d, 0, fast_update)

        if slow_positions is None:  # decode: every token through the block, then select
            positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
            slow_update = jnp.where(slow, weight * slow_fn(xs, positions), 0)
        else:
            x_slow = jnp.take_along_axis(xs, slow_positions[..., None], axis=1)  # [b, c, d]
            w_slow = jnp.take_along_axis(weight, slow_positions[..., None], axis=1)
            kept = jnp.take_along_axis(slow, slow_positions[..., None], axis=1)
            update = jnp.where(kept, w_slow * slow_fn(x_slow, slow_positions), 0)
            slow_update = jnp.zeros(xs.shape, update.dtype)
            slow_update = slow_update.at[jnp.arange(batch)[:, None], slow_positions].add(update)

        y = xs + (fast_update + slow_update).astype(xs.dtype)
        return y.reshape(x.shape), routing


def _sigmoid_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise binary cross-entropy of ``sigmoid(logits)`` against ``targets`` in [0, 1].

    The stable form ``max(z, 0) - z·y + log(1 + e^-|z|)``.
    """
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def _binary_entropy(p: jax.Array) -> jax.Array:
    p = jnp.clip(p, 1e-7, 1 - 1e-7)
    return -(p * jnp.log(p) + (1 - p) * jnp.log1p(-p))
