"""``custom_vjp`` wiring: the forward saves the log-sum-exp, the backward is a kernel too.

``attention(q, k, v, q_seg, kv_seg, cfg)`` runs the ``xla`` or ``pallas`` backend named
in ``cfg`` for the forward pass and for ``(dq, dk, dv)``; the residuals are
``(q, k, v, segments, out, lse)`` -- never the ``[S, T]`` probabilities. It returns
``(out, lse [B, S, Hq] f32)``; ``lse`` is differentiable too (its cotangent enters the
backward kernels as ``δ -= dlse``, since ``∂lse/∂logits = p``).

Under ``vmap`` the Pallas calls fold the mapped axis into the batch dim
(``_batch_folded``) rather than using ``pallas_call``'s own batching rule, which adds a
grid axis without a dimension semantic (the TPU interpreter then fails on the length
mismatch). Every operand and result of those calls leads with the batch dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from capibara.kernels.flash_attention import masks, pallas_tpu, xla


@dataclasses.dataclass(frozen=True)
class OpConfig:
    """Static arguments of one attention call (hashable)."""

    spec: masks.MaskSpec
    scale: float
    cap: float | None
    backend: str  # "xla" | "pallas"
    block_q: int  # xla: query positions per block; pallas: query tile
    block_k: int  # xla: keys per chunk; pallas: key tile
    interpret: bool = False


def _batch_folded(fn):
    """``fn`` whose ``vmap`` maps ``[A, B, ...] -> [A·B, ...]`` on every operand (unmapped
    ones are broadcast) and unfolds every result; ``fn``'s arrays all lead with ``B``."""

    @jax.custom_batching.custom_vmap
    def folded(*args):
        return fn(*args)

    @folded.def_vmap
    def _rule(axis_size, in_batched, *args):
        def fold(x, batched):
            if x is None:
                return None
            x = x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            return x.reshape(axis_size * x.shape[1], *x.shape[2:])

        flat_args = [fold(x, bool(bat)) for x, bat in zip(args, in_batched, strict=True)]
        outs = folded(*flat_args)  # still folded: nested vmaps fold again
        outs = jax.tree.map(lambda y: y.reshape(axis_size, -1, *y.shape[1:]), outs)
        return outs, jax.tree.map(lambda _: True, outs)

    return folded


def _forward(q, k, v, q_seg, kv_seg, cfg: OpConfig):
    """``(out, internal lse, public lse)``: the backend's layout and ``[B, S, Hq]``."""
    kw = dict(spec=cfg.spec, scale=cfg.scale, cap=cfg.cap, block_q=cfg.block_q)
    b, s, _, _ = q.shape
    if cfg.backend == "pallas":
        call = functools.partial(
            pallas_tpu.forward, block_k=cfg.block_k, interpret=cfg.interpret, **kw
        )
        out, lse = _batch_folded(call)(q, k, v, q_seg, kv_seg)
        public = pallas_tpu.lse_from_tiles(lse, s)
    else:
        out, lse = xla.forward(q, k, v, q_seg, kv_seg, chunk=cfg.block_k, **kw)
        public = xla.lse_from_groups(lse, b, k.shape[2], s)
    # NOTE: the kernels mark rows that see no key with lse = +inf (so that the backward's
    # exp(s - lse) is 0 without a guard); the public value is log(0) = -inf.
    public = jnp.where(public == jnp.inf, -jnp.inf, public)
    return out, lse, public


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def attention(q, k, v, q_seg, kv_seg, cfg: OpConfig):
    """``(out [B, S, Hq, Dv], lse [B, S, Hq] f32)``; see ``capibara.kernels.flash_attention``."""
    out, _, public = _forward(q, k, v, q_seg, kv_seg, cfg)
    return out, public


def _attention_fwd(q, k, v, q_seg, kv_seg, cfg):
    out, lse, public = _forward(q, k, v, q_seg, kv_seg, cfg)
    return (out, public), (q, k, v, q_seg, kv_seg, out, lse)


def _attention_bwd(cfg, residuals, cotangents):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    dout, dlse = cotangents
    kw = dict(spec=cfg.spec, scale=cfg.scale, cap=cfg.cap, block_q=cfg.block_q)
    if cfg.backend == "pallas":
        call = functools.partial(
            pallas_tpu.backward, block_k=cfg.block_k, interpret=cfg.interpret, **kw
        )
        dq, dk, dv = _batch_folded(call)(q, k, v, q_seg, kv_seg, out, lse, dout, dlse)
    else:
        dq, dk, dv = xla.backward(
            q, k, v, q_seg, kv_seg, out, lse, dout, dlse, chunk=cfg.block_k, **kw
        )
    # Segment ids are integers: no cotangent.
    return dq, dk, dv, None, None


attention.defvjp(_attention_fwd, _attention_bwd)
