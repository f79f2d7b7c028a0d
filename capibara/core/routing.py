"""The routing system: which expert (or which path) each token takes.

Routers (all ``route(inputs [..., d], context=None) -> Routing``):

* ``TokenRouter`` (``token_routers.py``): token choice, top-k of E experts; softmax or
  sigmoid scores, optional renormalisation, optional capacity, Switch load-balancing
  loss, ST-MoE z-loss, DeepSeek-V3 auxiliary-loss-free bias balancing, jitter noise.
* ``ExpertChoiceRouter`` (``token_routers.py``): each expert picks its top-c tokens.
* ``DualProcessRouter`` (``mixture_of_depths.py``): Mixture-of-Depths, a token takes
  the full block or a fast path.

``MoEBlock`` (``moe.py``) runs a router and SwiGLU experts on ``capibara.kernels.moe.permute``,
``capibara.kernels.grouped_matmul`` and ``capibara.kernels.moe.unpermute``. The shared types
(``Routing``, ``RoutingContext``, ``BaseRouter``) are in ``router_base.py``.

Batch invariance
----------------

A serving engine batches unrelated requests together and splits prompts into chunks
as it pleases; a request's output must not depend on that. A router is
*batch-invariant* when a token's route (experts and weights) depends on that token
alone. These are:

* ``TokenRouter`` outside training (jitter and the bias update only happen in
  training) when dropless: ``capacity_factor=None``, or any capacity with
  ``context.decode=True``, which turns the capacity off;
* ``DualProcessRouter`` in decode mode (``context.decode=True``): its per-token
  predictor decides.

These are **not**, and the inference engine must not use them that way:

* ``TokenRouter`` with a ``capacity_factor`` outside decode: the capacity is a share
  of the batch's ``t·k`` assignments, and which assignments overflow depends on the
  other tokens (earlier tokens and first choices win), so a token can be dropped in
  one batch and served in another. The engine routes with ``decode=True`` (prefill
  included), which serves every assignment.
* ``ExpertChoiceRouter``: experts rank *all* tokens of the batch, so a token's experts
  depend on its neighbours and on tokens after it. It refuses ``decode=True``: it is
  for training and for scoring whole sequences offline, not for serving.
* ``DualProcessRouter`` outside decode: the top-``capacity`` tokens are chosen over the
  whole sequence (non-causal: later tokens change earlier routes). The engine must
  route MoD with ``decode=True`` in prefill as well as decode, so both agree with
  the causal predictor and with each other.

In short: the inference engine passes ``RoutingContext(decode=True)`` to every serving
pass, prefill included. Within those rules the MoE block's output for a token is the
same, within f32 rounding, whether the token is alone or in a larger batch (tested).
A model trained with a capacity is then served dropless, the usual practice (Switch,
GShard): at inference no token is dropped, so outputs can differ slightly from what
the capacity-limited training forward computed on the same batch.
"""

from __future__ import annotations

from capibara.core.mixture_of_depths import (
    FAST,
    SLOW,
    DualProcessRouter,
    DualProcessRouterConfig,
)
from capibara.core.moe import MoEBlock, MoEBlockConfig, combine_weights
from capibara.core.router_base import BaseRouter, Routing, RoutingContext
from capibara.core.token_routers import (
    BalancingBias,
    ExpertChoiceRouter,
    ExpertChoiceRouterConfig,
    TokenRouter,
    TokenRouterConfig,
    router_z_loss,
    switch_load_balancing_loss,
    within_capacity,
)

__all__ = [
    "FAST",
    "SLOW",
    "BalancingBias",
    "BaseRouter",
    "DualProcessRouter",
    "DualProcessRouterConfig",
    "ExpertChoiceRouter",
    "ExpertChoiceRouterConfig",
    "MoEBlock",
    "MoEBlockConfig",
    "Routing",
    "RoutingContext",
    "TokenRouter",
    "TokenRouterConfig",
    "combine_weights",
    "router_z_loss",
    "switch_load_balancing_loss",
    "within_capacity",
]
