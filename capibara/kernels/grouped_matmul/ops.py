"""``custom_vjp`` wiring: the forward and both gradients are grouped-matmul kernels.

With ``out = gmm(lhs, rhs)`` (``out[rows of g] = lhs[rows of g] @ rhs[g]``):

* ``d lhs = gmm(d out, rhs, transpose_rhs=not transpose_rhs)``
* ``d rhs = tgmm(lhs, d out)``, or ``tgmm(d out, lhs)`` when ``rhs`` is stored
  transposed (``[E, n, k]``), so no gradient is ever transposed after the fact.

``tgmm`` has its own vjp (two ``gmm`` calls), so second derivatives are kernels too
(reverse over reverse; ``custom_vjp`` has no forward mode).
Both run on the same backend as the forward (``xla`` or ``pallas``). The Pallas path
pads the operands to whole tiles here and slices the result back.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from capibara.kernels.grouped_matmul import pallas_tpu, xla


@dataclasses.dataclass(frozen=True)
class OpConfig:
    """Static arguments of the grouped products (hashable)."""

    backend: str  # "xla" | "pallas"
    block_sizes: pallas_tpu.BlockSizes  # Pallas tiles before clamping to the problem
    interpret: bool = False


def _pad_to(x, shape):
    if x.shape == shape:
        return x
    return jnp.pad(x, [(0, want - have) for have, want in zip(x.shape, shape, strict=True)])


def _tiles(cfg: OpConfig, m: int, k: int, n: int):
    """The clamped tiles of an ``[m, k] x [k, n]`` product and the padded ``(m, k, n)``."""
    bs = cfg.block_sizes.clamped(m, k, n)
    padded = (-(-d // b) * b for d, b in ((m, bs.block_m), (k, bs.block_k), (n, bs.block_n)))
    return bs, tuple(padded)


def _forward(lhs, rhs, group_sizes, cfg: OpConfig, transpose_rhs: bool):
    if cfg.backend == "xla":
        return xla.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs)
    (m, k), num_groups = lhs.shape, rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    bs, (mp, kp, np_) = _tiles(cfg, m, k, n)
    rhs_shape = (num_groups, np_, kp) if transpose_rhs else (num_groups, kp, np_)
    out = pallas_tpu.gmm(
        _pad_to(lhs, (mp, kp)),
        _pad_to(rhs, rhs_shape),
        group_sizes,
        m=m,
        block_sizes=bs,
        transpose_rhs=transpose_rhs,
        interpret=cfg.interpret,
    )
    return out[:m, :n]


def _transposed(lhs, rhs, group_sizes, cfg: OpConfig):
    if cfg.backend == "xla":
        return xla.tgmm(lhs, rhs, group_sizes, out_dtype=lhs.dtype)
    (m, k), n = lhs.shape, rhs.shape[1]
    bs, (mp, kp, np_) = _tiles(cfg, m, k, n)
    out = pallas_tpu.tgmm(
        _pad_to(lhs, (mp, kp)),
        _pad_to(rhs, (mp, np_)),
        group_sizes,
        m=m,
        block_sizes=bs,
        out_dtype=lhs.dtype,
        interpret=cfg.interpret,
    )
    return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gmm(lhs, rhs, group_sizes, cfg: OpConfig, transpose_rhs: bool):
    """``[m, k] x [E, k, n] -> [m, n]`` (``rhs [E, n, k]`` if ``transpose_rhs``)."""
    return _forward(lhs, rhs, group_sizes, cfg, transpose_rhs)


# NOTE: each fwd rule returns the custom_vjp function itself, not the kernel: an outer
# differentiation (a second derivative) differentiates the fwd rule, and the kernels
# are not differentiable (the xla path bitcasts to integers, pallas_call has no rule).


def _gmm_fwd(lhs, rhs, group_sizes, cfg, transpose_rhs):
    return gmm(lhs, rhs, group_sizes, cfg, transpose_rhs), (lhs, rhs, group_sizes)


def _gmm_bwd(cfg, transpose_rhs, residuals, d_out):
    lhs, rhs, group_sizes = residuals
    d_lhs = gmm(d_out, rhs, group_sizes, cfg, not transpose_rhs)
    if transpose_rhs:
        d_rhs = tgmm(d_out, lhs, group_sizes, cfg)  # [E, n, k]
    else:
        d_rhs = tgmm(lhs, d_out, group_sizes, cfg)  # [E, k, n]
    return d_lhs, d_rhs, None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def tgmm(lhs, rhs, group_sizes, cfg: OpConfig):
    """``[m, k] x [m, n] -> [E, k, n]``: ``lhs[rows of g].T @ rhs[rows of g]``."""
    return _transposed(lhs, rhs, group_sizes, cfg)


def _tgmm_fwd(lhs, rhs, group_sizes, cfg):
    return tgmm(lhs, rhs, group_sizes, cfg), (lhs, rhs, group_sizes)


def _tgmm_bwd(cfg, residuals, d_out):
    lhs, rhs, group_sizes = residuals
    d_lhs = gmm(rhs, d_out, group_sizes, cfg, True)  # rhs[rows of g] @ d_out[g].T
    d_rhs = gmm(lhs, d_out, group_sizes, cfg, False)  # lhs[rows of g] @ d_out[g]
    return d_lhs, d_rhs, None


tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)
