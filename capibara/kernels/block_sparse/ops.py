"""``custom_vjp`` wiring: forward and both gradients are block-sparse kernels.

``_matmul(x, blocks, config)`` works on padded 2-D operands. Its backward computes
``dx = dy @ w.T`` through the transposed layout and ``dblocks`` only at the stored
blocks, with the same backend (``xla`` or ``pallas``) as the forward.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from capibara.kernels.block_sparse import pallas_tpu, xla
from capibara.kernels.block_sparse.layout import BlockLayout
from capibara.kernels.block_sparse.matrix import densify


@dataclasses.dataclass(frozen=True)
class OpConfig:
    """Static arguments of one block-sparse product (hashable)."""

    layout: BlockLayout
    backend: str  # "xla" | "pallas"
    block_m: int  # row tile of the Pallas kernels; rows are padded to it
    interpret: bool = False


def _forward(x, blocks, cfg: OpConfig):
    layout = cfg.layout
    if layout.nnz == 0:
        return jnp.zeros((x.shape[0], layout.padded_shape[1]), x.dtype)
    if cfg.backend == "pallas":
        return pallas_tpu.matmul(x, blocks, layout, block_m=cfg.block_m, interpret=cfg.interpret)
    # Both xla routes accumulate in f32 and return x.dtype.
    if xla.dense_is_faster(layout, x.dtype):
        return xla.matmul_dense_columns(x, blocks, layout)
    return xla.matmul(x, blocks, layout)


def _input_grad(dy, blocks, cfg: OpConfig):
    layout = cfg.layout
    if layout.nnz == 0:
        return jnp.zeros((dy.shape[0], layout.padded_shape[0]), dy.dtype)
    if cfg.backend == "pallas":
        return pallas_tpu.matmul_transposed(
            dy, blocks, layout, block_m=cfg.block_m, interpret=cfg.interpret
        )
    if xla.dense_is_faster(layout, dy.dtype):
        out = jnp.dot(dy, densify(blocks, layout).T, preferred_element_type=jnp.float32)
    else:
        out = xla.matmul_transposed(dy, blocks, layout)
    return out.astype(dy.dtype)


def _weight_grad(x, dy, blocks_dtype, cfg: OpConfig):
    layout = cfg.layout
    bk, bn = layout.block_shape
    if layout.nnz == 0:
        return jnp.zeros((0, bk, bn), blocks_dtype)
    if cfg.backend == "pallas":
        return pallas_tpu.weight_grad(
            x, dy, layout, block_m=cfg.block_m, out_dtype=blocks_dtype, interpret=cfg.interpret
        )
    return xla.weight_grad(x, dy, layout).astype(blocks_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, blocks: jax.Array, cfg: OpConfig) -> jax.Array:
    """Padded ``x [M, Kp] @ w -> [M, Np]``; ``M`` a multiple of ``cfg.block_m`` for pallas."""
    return _forward(x, blocks, cfg)


def _matmul_fwd(x, blocks, cfg):
    return _forward(x, blocks, cfg), (x, blocks)


def _matmul_bwd(cfg, residuals, dy):
    x, blocks = residuals
    return _input_grad(dy, blocks, cfg).astype(x.dtype), _weight_grad(x, dy, blocks.dtype, cfg)


matmul.defvjp(_matmul_fwd, _matmul_bwd)
