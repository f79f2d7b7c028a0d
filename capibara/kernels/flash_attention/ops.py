"""``custom_vjp`` wiring: the forward saves the log-sum-exp, the backward is a kernel too.

``attention(q, k, v, q_seg, kv_seg, cfg)`` runs the ``xla`` or ``pallas`` backend named
in ``cfg`` for the forward pass and for ``(dq, dk, dv)``; the residuals are
``(q, k, v, segments, out, lse)`` -- never the ``[S, T]`` probabilities.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

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


def _forward(q, k, v, q_seg, kv_seg, cfg: OpConfig):
    kw = dict(spec=cfg.spec, scale=cfg.scale, cap=cfg.cap, block_q=cfg.block_q)
    if cfg.backend == "pallas":
        return pallas_tpu.forward(
            q, k, v, q_seg, kv_seg, block_k=cfg.block_k, interpret=cfg.interpret, **kw
        )
    return xla.forward(q, k, v, q_seg, kv_seg, chunk=cfg.block_k, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def attention(q, k, v, q_seg, kv_seg, cfg: OpConfig):
    """``[B, S, Hq, D]`` attention output; see ``capibara.kernels.flash_attention``."""
    return _forward(q, k, v, q_seg, kv_seg, cfg)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, cfg):
    out, lse = _forward(q, k, v, q_seg, kv_seg, cfg)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _attention_bwd(cfg, residuals, dout):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    kw = dict(spec=cfg.spec, scale=cfg.scale, cap=cfg.cap, block_q=cfg.block_q)
    if cfg.backend == "pallas":
        dq, dk, dv = pallas_tpu.backward(
            q,
            k,
            v,
            q_seg,
            kv_seg,
            out,
            lse,
            dout,
            block_k=cfg.block_k,
            interpret=cfg.interpret,
            **kw,
        )
    else:
        dq, dk, dv = xla.backward(q, k, v, q_seg, kv_seg, out, lse, dout, chunk=cfg.block_k, **kw)
    # Segment ids are integers: no cotangent.
    return dq, dk, dv, None, None


attention.defvjp(_attention_fwd, _attention_bwd)
