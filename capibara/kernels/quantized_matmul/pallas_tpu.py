"""``x @ W`` for a ``QuantizedWeight`` as a Mosaic TPU Pallas kernel.

Grid ``(M tiles, N tiles, K tiles)``, the K axis innermost reducing into a VMEM f32
accumulator. The weight crosses HBM packed (int8, or two int4 a byte) with its f32
scales; each tile is rebuilt in VMEM:

* ``"channel"`` tiles (per-channel weights): one scale row for every tile, so
  ``acc += (x @ (q - offset)) · scales (+ rowsum(x) · mins)`` -- the
  integers convert exactly to the MXU dtype and the scales apply to the
  ``[bm, bn]`` product, not the ``[bk, bn]`` weight.
* ``"group"`` tiles (several groups per K tile): ``w = scales · (q - offset) + mins``
  per group in f32, rounded to the MXU dtype, then one dot. A K tile holds all of
  ``K`` when ``K <= FULL_K`` (the scales' block is then the whole group axis), else
  8 groups (so the scales' block is 8 sublanes); ``K`` is padded to whole tiles.

int4 bytes unpack as ``(low nibbles, high nibbles)`` of each group stacked along the
sublanes: the layout of ``weights.py`` makes that the natural row order, with no lane
shuffles. Activations ``f32`` multiply in f32, ``bf16`` in bf16; accumulation is f32.

Verified here only in the Pallas TPU interpreter (``interpret=True``) and by export
for TPU (``make lower``); never run on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from capibara.kernels import _platform

FULL_K = 2048  # K up to which one K tile holds every group
_F32 = jnp.float32


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tiles: ``block_m`` rows (multiple of 8; 16 for 16-bit activations),
    ``block_n`` columns (multiple of 128), ``block_k`` (multiple of 128) for per-channel
    weights only -- grouped weights tile ``K`` by their groups (module docstring).
    Each is clamped to its (rounded-up) problem dimension."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 512

    def __post_init__(self):
        for name, m in (("block_m", 8), ("block_n", 128), ("block_k", 128)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % m:
                raise ValueError(f"{name} must be a positive multiple of {m}, got {name}={value!r}")


@dataclasses.dataclass(frozen=True)
class _Plan:
    mode: str  # "channel" | "group"
    bm: int
    bn: int
    bk: int
    m_pad: int
    n_pad: int
    k_pad: int


def plan(m: int, k: int, n: int, group: int, x_dtype, blocks: BlockSizes) -> _Plan:
    sub = 16 if jnp.dtype(x_dtype).itemsize == 2 else 8
    bm = min(_round_up(blocks.block_m, sub), _round_up(m, sub))
    bn = min(blocks.block_n, _round_up(n, 128))
    if group >= k:  # per channel: any K tile lies in the one group
        bk = min(blocks.block_k, _round_up(k, 128))
        mode = "channel"
    elif k <= FULL_K:
        bk, mode = k, "group"
    else:
        bk, mode = 8 * group, "group"
    return _Plan(mode, bm, bn, bk, _round_up(m, bm), _round_up(n, bn), _round_up(k, bk))


def _kernel(x_ref, v_ref, s_ref, *rest, mode, bits, group, offset, has_mins, cdt):
    m_ref = rest[0] if has_mins else None
    o_ref, acc_ref = rest[-2:]
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    v = v_ref[...].astype(jnp.int32)
    if bits == 4:
        half, bn = v.shape
        v = v.reshape(2 * half // group, group // 2, bn)
        v = jnp.concatenate([v & 15, v >> 4], axis=1).reshape(2 * half, bn)
    x = x_ref[...]
    if mode == "channel":
        q = (v - offset).astype(cdt)
        y = jnp.dot(x.astype(cdt), q, preferred_element_type=_F32) * s_ref[...]
        if has_mins:
            y = y + jnp.sum(x.astype(_F32), axis=1, keepdims=True) * m_ref[...]
    else:
        bk, bn = v.shape
        g = bk // group
        w = (v - offset).astype(_F32).reshape(g, group, bn) * s_ref[...][:, None, :]
        if has_mins:
            w = w + m_ref[...][:, None, :]
        y = jnp.dot(x.astype(cdt), w.reshape(bk, bn).astype(cdt), preferred_element_type=_F32)
    acc_ref[...] += y

    @pl.when(kk == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def matmul(x, w, out_dtype, *, blocks: BlockSizes, interpret=False):
    """``x [M, K] @ W [K, N]`` -> ``[M, N]`` in ``out_dtype``."""
    m, k = x.shape
    n = w.shape[1]
    p = plan(m, k, n, w.group, x.dtype, blocks)
    cdt = jnp.bfloat16 if x.dtype == jnp.bfloat16 else _F32
    rows_per_byte = 2 if w.bits == 4 else 1
    x = jnp.pad(x, ((0, p.m_pad - m), (0, p.k_pad - k)))
    values = jnp.pad(w.values, ((0, (p.k_pad - k) // rows_per_byte), (0, p.n_pad - n)))
    g_pad = p.k_pad // w.group if p.mode == "group" else w.num_groups
    stats = [w.scales] + ([w.mins] if w.mins is not None else [])
    stats = [jnp.pad(s, ((0, g_pad - s.shape[0]), (0, p.n_pad - n))) for s in stats]

    if p.mode == "channel":  # one group: every K tile reads scale row 0
        stat_block = (1, p.bn)

        def stat_index(i, j, kk):
            return 0, j

    else:
        stat_block = (p.bk // w.group, p.bn)

        def stat_index(i, j, kk):
            return kk, j

    grid = (p.m_pad // p.bm, p.n_pad // p.bn, p.k_pad // p.bk)
    kernel = functools.partial(
        _kernel,
        mode=p.mode,
        bits=w.bits,
        group=w.group,
        offset=w.offset,
        has_mins=w.mins is not None,
        cdt=cdt,
    )
    weight_bytes = values.size + sum(s.size for s in stats) * 4
    out = _platform.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((p.m_pad, p.n_pad), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=grid,
            in_specs=[
                pl.BlockSpec((p.bm, p.bk), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((p.bk // rows_per_byte, p.bn), lambda i, j, kk: (kk, j)),
                *[pl.BlockSpec(stat_block, stat_index) for _ in stats],
            ],
            out_specs=pl.BlockSpec((p.bm, p.bn), lambda i, j, kk: (i, j)),
            scratch_shapes=[pltpu.VMEM((p.bm, p.bn), _F32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * p.m_pad * p.n_pad * p.k_pad,
            transcendentals=0,
            bytes_accessed=x.size * x.dtype.itemsize * grid[1]
            + weight_bytes * grid[0]
            + p.m_pad * p.n_pad * jnp.dtype(out_dtype).itemsize,
        ),
        interpret=_platform.interpret_params(interpret),
    )(x, values, *stats)
    return out[:m, :n]
