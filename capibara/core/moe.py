"""``MoEBlock``: a router, then SwiGLU experts run as grouped matmuls over sorted tokens.

    routing  = router.route(x)                                    # ids, weights [t, k]
    x_sorted, group_sizes, order = capibara.kernels.moe.permute(x, ids)    # [t·k, d], by expert
    gate|up  = grouped_matmul(x_sorted, w_gate_up, group_sizes)   # [t·k, 2f]
    y_sorted = grouped_matmul(silu(gate)·up, w_down, group_sizes) # [t·k, d]
    y        = capibara.kernels.moe.unpermute(y_sorted, order, weights)    # [t, d]

plus, optionally, always-on shared experts (one dense SwiGLU over every token).

The block returns the *update*: the caller adds it to the residual stream, so a token
whose every assignment was dropped (over capacity, or picked by no expert) passes
through the residual unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from capibara.core.router_base import BaseRouter, Routing, RoutingContext
from capibara.core.token_routers import (
    ExpertChoiceRouter,
    ExpertChoiceRouterConfig,
    TokenRouter,
    TokenRouterConfig,
)
from capibara.kernels import _platform, moe
from capibara.kernels.grouped_matmul import grouped_matmul

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEBlockConfig:
    """Settings of ``MoEBlock``."""

    d_model: int
    ffn_dim: int  # SwiGLU hidden width of each expert
    router: TokenRouterConfig | ExpertChoiceRouterConfig
    num_shared_experts: int = 0  # always-on experts of width ffn_dim, run densely
    implementation: str | None = None  # passed to every kernel (None = best here)
    interpret: bool = False  # run the Pallas kernels in the interpreter
    # How tokens reach their experts on a mesh with an ``expert`` axis: None (per
    # platform), "ragged_all_to_all" or "all_gather" (capibara.kernels.moe.run_experts)
    expert_exchange: str | None = None

    def __post_init__(self):
        for name in ("d_model", "ffn_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoEBlockConfig.{name}={getattr(self, name)} must be >= 1")
        if not isinstance(self.router, TokenRouterConfig | ExpertChoiceRouterConfig):
            raise TypeError(
                "MoEBlockConfig.router must be a TokenRouterConfig or ExpertChoiceRouterConfig, "
                f"got {type(self.router).__name__}"
            )
        if self.num_shared_experts < 0:
            raise ValueError(
                f"MoEBlockConfig.num_shared_experts={self.num_shared_experts} must be >= 0"
            )
        if self.implementation is not None and self.implementation not in _platform.IMPLEMENTATIONS:
            raise ValueError(
                f"MoEBlockConfig.implementation={self.implementation!r} is not one of None, "
                + ", ".join(repr(i) for i in _platform.IMPLEMENTATIONS)
            )

        if self.expert_exchange is not None and self.expert_exchange not in moe.EXCHANGES:
            raise ValueError(
                f"MoEBlockConfig.expert_exchange={self.expert_exchange!r} is not one of None, "
                + ", ".join(repr(e) for e in moe.EXCHANGES)
            )

    @property
    def num_experts(self) -> int:
        return self.router.num_experts


def _swiglu(gate_up: jax.Array) -> jax.Array:
    """``[..., 2f] -> [..., f]``: ``silu(gate) · up`` (computed in f32)."""
    gate, up = jnp.split(gate_up.astype(jnp.float32), 2, axis=-1)
    return (jax.nn.silu(gate) * up).astype(gate_up.dtype)


def combine_weights(routing: Routing, num_experts: int) -> jax.Array:
    """f32 ``[t, E]``: the weight of each expert in each token's output (0 if not routed)."""
    one_hot = jax.nn.one_hot(routing.expert_ids, num_experts, dtype=jnp.float32)  # [t, k, E]
    weights = jnp.where(routing.kept, routing.weights, 0.0).astype(jnp.float32)
    return jnp.einsum("tke,tk->te", one_hot, weights)


class MoEBlock(nnx.Module):
    """Routed SwiGLU experts (plus optional shared experts) on ``capibara.kernels.grouped_matmul``.

    Parameters: ``w_gate_up [E, d, 2f]`` (gate and up fused so one grouped matmul
    computes both), ``w_down [E, f, d]``, and for shared experts ``shared_gate_up
    [d, 2·s·f]``, ``shared_down [s·f, d]`` (``s`` shared experts fused into one MLP).

    NOTE: with ``ExpertChoiceRouter`` the routing has ``k = E`` slots per token, so
    ``permute`` lays out ``t·E`` rows of which only ``E·c`` are computed (the rest sit
    after the last group as zeros): memory ``E/k`` times a token-choice block's, not
    FLOPs.
    """

    def __init__(
        self, config: MoEBlockConfig, *, rngs: nnx.Rngs, param_dtype: jnp.dtype = jnp.float32
    ):
        self.config = config
        d, f, num_experts = config.d_model, config.ffn_dim, config.num_experts
        if isinstance(config.router, TokenRouterConfig):
            self.router: BaseRouter = TokenRouter(d, config.router, rngs=rngs)
        else:
            self.router = ExpertChoiceRouter(d, config.router, rngs=rngs)
        init_in = nnx.initializers.normal(stddev=d**-0.5)
        init_out = nnx.initializers.normal(stddev=f**-0.5)
        self.w_gate_up = nnx.Param(init_in(rngs.params(), (num_experts, d, 2 * f), param_dtype))
        self.w_down = nnx.Param(init_out(rngs.params(), (num_experts, f, d), param_dtype))
        shared = config.num_shared_experts * f
        if shared:
            self.shared_gate_up = nnx.Param(init_in(rngs.params(), (d, 2 * shared), param_dtype))
            self.shared_down = nnx.Param(
                nnx.initializers.normal(stddev=shared**-0.5)(
                    rngs.params(), (shared, d), param_dtype
                )
            )
        else:
            self.shared_gate_up = self.shared_down = None

    def __call__(
        self, x: jax.Array, context: RoutingContext | None = None
    ) -> tuple[jax.Array, Routing]:
        """Routes ``x [..., d]`` and returns ``(update [..., d], routing)``.

        The update is zero for padding tokens and for tokens none of whose assignments
        was kept (the caller adds it to the residual).
        """
        routing = self.router.route(x, context)
        tokens = x.reshape(-1, x.shape[-1])
        y = self._routed_experts(tokens, routing) + self._shared_experts(tokens)
        return y.reshape(x.shape), routing

    def _routed_experts(self, tokens: jax.Array, routing: Routing) -> jax.Array:
        """``[t, d]``: the weighted sum of each token's kept experts' outputs.

        On a mesh with an ``expert`` axis the tokens travel to their experts' shards
        (``capibara.kernels.moe.run_experts``, ``MoEBlockConfig.expert_exchange``)."""
        cfg, num_experts = self.config, self.config.num_experts
        # An out-of-range id is permute's way of dropping an assignment: its row lands
        # after the last group, where grouped_matmul leaves zeros and does no work.
        expert_ids = jnp.where(routing.kept, routing.expert_ids, num_experts)
        params = (self.w_gate_up[...].astype(tokens.dtype), self.w_down[...].astype(tokens.dtype))
        return moe.run_experts(
            tokens,
            expert_ids,
            routing.weights,
            self._expert_ffn,
            params,
            num_experts=num_experts,
            exchange=cfg.expert_exchange,
        )

    def _expert_ffn(self, params, x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """SwiGLU of the experts in ``params`` (``[E', d, 2f]``, ``[E', f, d]``) on rows
        sorted by expert, ``[r, d] -> [r, d]``."""
        cfg = self.config
        w_gate_up, w_down = params
        gmm = functools.partial(
            grouped_matmul, implementation=cfg.implementation, interpret=cfg.interpret
        )
        hidden = _swiglu(gmm(x_sorted, w_gate_up, group_sizes))
        # w_down [E, mlp, embed] is placed split along mlp (capibara.sharding): contract
        # over it per shard and psum, rather than re-laying the weight out every step.
        return gmm(hidden, w_down, group_sizes, split_k=True)

    def _shared_experts(self, tokens: jax.Array) -> jax.Array | float:
        if self.shared_gate_up is None:
            return 0.0
        hidden = _swiglu(tokens @ self.shared_gate_up[...].astype(tokens.dtype))
        return hidden @ self.shared_down[...].astype(tokens.dtype)

    def reference(
        self, x: jax.Array, context: RoutingContext | None = None
    ) -> tuple[jax.Array, Routing]:
        """The dense reference block: every expert on every token, masked by the routing.

        Same parameters and router as ``__call__``, ``E/k`` times the expert FLOPs, no
        kernels, ``Precision.HIGHEST``: the test oracle and the benchmark baseline.
        """
        routing = self.router.route(x, context)
        tokens = x.reshape(-1, x.shape[-1])
        w_gate_up = self.w_gate_up[...].astype(tokens.dtype)
        w_down = self.w_down[...].astype(tokens.dtype)
        gate_up = jnp.einsum("td,edf->etf", tokens, w_gate_up, precision=_HIGHEST)
        expert_out = jnp.einsum("etf,efd->etd", _swiglu(gate_up), w_down, precision=_HIGHEST)
        combine = combine_weights(routing, self.config.num_experts)
        y = jnp.einsum(
            "te,etd->td", combine, expert_out.astype(jnp.float32), precision=_HIGHEST
        ).astype(tokens.dtype)
        if self.shared_gate_up is not None:
            shared = _swiglu(
                jnp.dot(tokens, self.shared_gate_up[...].astype(tokens.dtype), precision=_HIGHEST)
            )
            y = y + jnp.dot(shared, self.shared_down[...].astype(tokens.dtype), precision=_HIGHEST)
        return y.reshape(x.shape), routing
