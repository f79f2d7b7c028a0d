"""A minimal training step: next-token cross-entropy plus the routers' auxiliary losses."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx


def next_token_loss(model, tokens, padding_mask=None):
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``, plus aux.

    Args:
      model: a ``CapibaraModel``.
      tokens: int ``[B, S]``.
      padding_mask: bool ``[B, S]`` (True = padding): excluded from loss and routing.

    Returns:
      ``(total_loss, {"cross_entropy": ..., **aux_losses})``.
    """
    logits, aux_losses = model(
        tokens[:, :-1],
        training=True,
        padding_mask=None if padding_mask is None else padding_mask[:, :-1],
    )
    targets = tokens[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weights = jnp.ones_like(ce) if padding_mask is None else (~padding_mask[:, 1:]).astype(ce.dtype)
    cross_entropy = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    total = cross_entropy + sum(aux_losses.values(), jnp.zeros((), jnp.float32))
    return total, {"cross_entropy": cross_entropy, **aux_losses}


def make_optimizer(model, learning_rate: float = 1e-3, weight_decay: float = 0.0):
    """AdamW over the model's ``nnx.Param`` leaves."""
    return nnx.Optimizer(
        model, optax.adamw(learning_rate, weight_decay=weight_decay), wrt=nnx.Param
    )


@nnx.jit
def train_step(model, optimizer, tokens):
    """One AdamW step on ``tokens [B, S]``; returns the losses before the update."""
    (_, losses), grads = nnx.value_and_grad(next_token_loss, has_aux=True)(model, tokens)
    optimizer.update(model, grads)
    return losses
