"""Flash attention as Mosaic TPU Pallas kernels: forward, dq, and dk/dv.

Only the visible tiles run. ``schedule()`` lists, on the host, the (query tile, key
tile) pairs that causal/window masking leaves at least partly visible, each with
flags (FIRST/LAST of its output tile, VALID, MASK = needs the element mask). The list
reaches the kernels by scalar prefetch and the grid walks it, so a fully masked tile
is neither fetched nor multiplied; tiles inside the triangle run without the element
mask. The cost estimates count exactly the listed tiles.

Layout inside: heads-major ``q [B, Hq, Sp, D]``, ``k [B, Hkv, Tp, D]``, ``v [B, Hkv, Tp,
Dv]`` (S, T padded to the tiles; D and Dv whole, so any head dims work, and ``Dv`` may
differ from ``D``). GQA: the k/v index maps read kv head ``h // G``; dk/dv of a kv
head accumulate over its ``G`` query heads in the grid (an inner grid axis), so k/v
are never repeated. Softmax statistics are f32 and, as in
JAX's own kernels, lane-replicated ``[.., 128]`` so they tile on TPU.

Verified here only in the Pallas TPU interpreter (``interpret=True``) and by exporting
for TPU from a CPU host (``lowering_cases``); not yet run on TPU hardware, and the
default tiles (512) are untuned.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from capibara.kernels import _platform
from capibara.kernels.flash_attention import masks

LANES = 128
FIRST, LAST, VALID, MASK = 1, 2, 4, 8
_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # "md,nd->mn"
_TN = (((0,), (0,)), ((), ()))  # "mn,md->nd"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Host-side tile list (numpy int32 arrays of one length, ``num_steps``)."""

    q_tiles: np.ndarray
    k_tiles: np.ndarray
    flags: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.flags)

    @property
    def num_valid(self) -> int:
        return int(((self.flags & VALID) != 0).sum())


def schedule(
    spec: masks.MaskSpec, block_q: int, block_k: int, *, segments: bool, by_key: bool = False
) -> Schedule:
    """Visible (query tile, key tile) pairs, grouped by query tile (or key tile, ``by_key``).

    NOTE: every output tile (query tiles; key tiles when ``by_key``) appears at least
    once -- if it sees nothing, as one step without VALID -- so it is written (zeros).
    """
    nq = -(-spec.q_len // block_q)
    nk = -(-spec.kv_len // block_k)

    def pair(i, j):
        a, b = i * block_q, min((i + 1) * block_q, spec.q_len)
        lo, hi = j * block_k, (j + 1) * block_k
        if not masks.block_visible(spec, a, b, lo, hi):
            return None
        return MASK if masks.block_needs_mask(spec, a, b, lo, hi, segments=segments) else 0

    rows = []
    outer, inner = (nk, nq) if by_key else (nq, nk)
    for o in range(outer):
        steps = []
        for n in range(inner):
            i, j = (n, o) if by_key else (o, n)
            flag = pair(i, j)
            if flag is not None:
                steps.append([i, j, VALID | flag])
        if not steps:
            steps = [[0, o, 0] if by_key else [o, 0, 0]]
        steps[0][2] |= FIRST
        steps[-1][2] |= LAST
        rows.extend(steps)
    q_tiles, k_tiles, flags = (np.asarray(c, np.int32) for c in zip(*rows, strict=True))
    return Schedule(q_tiles, k_tiles, flags)


def _logits(q_tile, k_tile, q, k, seg_refs, *, spec, scale, cap, block_q, block_k, masked):
    """Capped logits ``[bq, bk]`` (f32) and their masked copy (-inf where hidden)."""
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=_F32) * scale
    s = masks.soft_cap(s, cap)
    if not masked:
        return s, s
    shape = (block_q, block_k)
    q_pos = q_tile * block_q + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    k_pos = k_tile * block_k + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    if seg_refs:
        q_seg_ref, k_seg_ref = seg_refs
        keep = masks.visible(spec, q_pos, k_pos, q_seg_ref[...][:, :1], k_seg_ref[...])
    else:
        keep = masks.visible(spec, q_pos, k_pos)
    return s, jnp.where(keep, s, masks.MASK_VALUE)


def _when_valid(flags, body):
    """Runs ``body(masked)`` for a VALID step, with the element mask only if MASK is set."""

    @pl.when(((flags & VALID) != 0) & ((flags & MASK) != 0))
    def _masked():
        body(True)

    @pl.when(((flags & VALID) != 0) & ((flags & MASK) == 0))
    def _unmasked():
        body(False)


def _forward_kernel(q_tiles_ref, k_tiles_ref, flags_ref, q_ref, k_ref, v_ref, *refs, **kw):
    """One (query tile, key tile) step of the online softmax."""
    *seg_refs, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    step = pl.program_id(2)
    flags = flags_ref[step]

    @pl.when((flags & FIRST) != 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, masks.MASK_VALUE)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def body(masked):
        _, s = _logits(
            q_tiles_ref[step],
            k_tiles_ref[step],
            q_ref[...],
            k_ref[...],
            seg_refs,
            masked=masked,
            **kw,
        )
        m_prev = m_ref[...]  # [bq, 128], lanes equal
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        # Rows that have seen only -inf so far shift by 0: exp(-inf) = 0, no NaN.
        m_safe = jnp.where(m_next == masks.MASK_VALUE, 0.0, m_next)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe[:, :1])
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = jax.lax.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=_F32)
        acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv
        m_ref[...] = m_next

    _when_valid(flags, body)

    @pl.when((flags & LAST) != 0)
    def _store():
        denom = l_ref[...]
        empty = denom == 0.0  # the row saw no key: output 0, lse +inf (so bwd p = 0)
        o_ref[...] = (acc_ref[...] / jnp.where(empty, 1.0, denom)[:, :1]).astype(o_ref.dtype)
        m_safe = jnp.where(empty, 0.0, m_ref[...])
        lse_ref[...] = jnp.where(empty, jnp.inf, m_safe + jnp.log(jnp.where(empty, 1.0, denom)))


def _padded_inputs(q, k, v, q_seg, kv_seg, block_q, block_k):
    """Heads-major, padded operands and (when segmented) lane/sublane-shaped segment ids."""
    (_, s, _, _), t = q.shape, k.shape[1]
    sp, tp = -(-s // block_q) * block_q, -(-t // block_k) * block_k
    qt = jnp.pad(q, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kt = jnp.pad(k, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    vt = jnp.pad(v, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    segs = ()
    if q_seg is not None:
        qs = jnp.pad(q_seg, ((0, 0), (0, sp - s)))
        ks = jnp.pad(kv_seg, ((0, 0), (0, tp - t)))
        segs = (jnp.broadcast_to(qs[:, :, None], (*qs.shape, LANES)), ks[:, None, :])
    return qt, kt, vt, segs


def _seg_specs(segs, q_index, k_index, block_q, block_k):
    """BlockSpecs of the segment ids: ``[B, Sp, 128]`` by query tile, ``[B, 1, Tp]`` by key."""
    if not segs:
        return []

    def q_seg_tile(*idx):  # q_seg[b, q tile]
        b, _, qi = q_index(*idx)[:3]
        return b, qi, 0

    def k_seg_tile(*idx):  # kv_seg[b, :, key tile]
        b, _, kj = k_index(*idx)[:3]
        return b, 0, kj

    return [
        pl.BlockSpec((None, block_q, LANES), q_seg_tile),
        pl.BlockSpec((None, 1, block_k), k_seg_tile),
    ]


def lse_from_tiles(lse, s):
    """``lse [B, Hq, Sp, 128] -> [B, S, Hq]`` (the public layout)."""
    return lse[:, :, :s, 0].transpose(0, 2, 1)


def forward(q, k, v, q_seg, kv_seg, *, spec, scale, cap, block_q, block_k, interpret=False):
    """Returns ``(out [B, S, Hq, Dv], lse [B, Hq, Sp, 128] f32)``."""
    bsz, s, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    g = hq // hkv
    qt, kt, vt, segs = _padded_inputs(q, k, v, q_seg, kv_seg, block_q, block_k)
    sp = qt.shape[2]
    sched = schedule(spec, block_q, block_k, segments=bool(segs))

    def q_tile(b, h, i, qi, kj, fl):  # q[b, h, q tile of step i]
        return b, h, qi[i], 0

    def kv_tile(b, h, i, qi, kj, fl):  # k[b, h // G, key tile of step i]
        return b, jax.lax.div(h, g), kj[i], 0  # lax.div: floor_divide needs sign, not on TPU

    kw = dict(spec=spec, scale=scale, cap=cap, block_q=block_q, block_k=block_k)
    tiles = sched.num_valid * bsz * hq
    out, lse = _platform.pallas_call(
        functools.partial(_forward_kernel, **kw),
        out_shape=(
            jax.ShapeDtypeStruct((bsz, hq, sp, dv), q.dtype),
            jax.ShapeDtypeStruct((bsz, hq, sp, LANES), _F32),
        ),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(bsz, hq, sched.num_steps),
            in_specs=[
                pl.BlockSpec((None, None, block_q, d), q_tile),
                pl.BlockSpec((None, None, block_k, d), kv_tile),
                pl.BlockSpec((None, None, block_k, dv), kv_tile),
                *_seg_specs(segs, q_tile, kv_tile, block_q, block_k),
            ],
            out_specs=[
                pl.BlockSpec((None, None, block_q, dv), q_tile),
                pl.BlockSpec((None, None, block_q, LANES), q_tile),
            ],
            scratch_shapes=[
                pltpu.VMEM((block_q, LANES), _F32),  # running max m
                pltpu.VMEM((block_q, LANES), _F32),  # running denominator l
                pltpu.VMEM((block_q, dv), _F32),  # unnormalized output
            ],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * block_q * block_k * (d + dv) * tiles,
            transcendentals=block_q * block_k * tiles,
            bytes_accessed=(qt.size + kt.size + vt.size + bsz * hq * sp * dv) * q.dtype.itemsize,
        ),
        interpret=_platform.interpret_params(interpret),
    )(sched.q_tiles, sched.k_tiles, sched.flags, qt, kt, vt, *segs)
    return out[:, :, :s].transpose(0, 2, 1, 3), lse


def _dq_kernel(
    q_tiles_ref,
    k_tiles_ref,
    flags_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *refs,
    **kw,
):
    """``dq += (p ∘ (do·vᵀ - δ)) · k · scale`` over the visible key tiles of one query tile."""
    *seg_refs, dq_ref, acc_ref = refs
    step = pl.program_id(2)
    flags = flags_ref[step]

    @pl.when((flags & FIRST) != 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def body(masked):
        k = k_ref[...]
        s, s_masked = _logits(
            q_tiles_ref[step], k_tiles_ref[step], q_ref[...], k, seg_refs, masked=masked, **kw
        )
        p = jnp.exp(s_masked - lse_ref[...][:, :1])
        dp = jax.lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=_F32)
        ds = masks.soft_cap_grad(p * (dp - delta_ref[...][:, :1]), s, kw["cap"])
        acc_ref[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=_F32)

    _when_valid(flags, body)

    @pl.when((flags & LAST) != 0)
    def _store():
        dq_ref[...] = (acc_ref[...] * kw["scale"]).astype(dq_ref.dtype)


def _dkv_kernel(
    q_tiles_ref,
    k_tiles_ref,
    flags_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *refs,
    **kw,
):
    """``dv += pᵀ·do``, ``dk += dsᵀ·q · scale`` over the visible query tiles and the G
    query heads (grid axis 3) of one key tile."""
    *seg_refs, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs
    step, head = pl.program_id(2), pl.program_id(3)
    flags = flags_ref[step]

    @pl.when(((flags & FIRST) != 0) & (head == 0))
    def _init():
        dk_acc_ref[...] = jnp.zeros_like(dk_acc_ref)
        dv_acc_ref[...] = jnp.zeros_like(dv_acc_ref)

    def body(masked):
        q, do = q_ref[...], do_ref[...]
        s, s_masked = _logits(
            q_tiles_ref[step], k_tiles_ref[step], q, k_ref[...], seg_refs, masked=masked, **kw
        )
        p = jnp.exp(s_masked - lse_ref[...][:, :1])
        dv_acc_ref[...] += jax.lax.dot_general(
            p.astype(do.dtype), do, _TN, preferred_element_type=_F32
        )
        dp = jax.lax.dot_general(do, v_ref[...], _NT, preferred_element_type=_F32)
        ds = masks.soft_cap_grad(p * (dp - delta_ref[...][:, :1]), s, kw["cap"])
        dk_acc_ref[...] += jax.lax.dot_general(
            ds.astype(q.dtype), q, _TN, preferred_element_type=_F32
        )

    _when_valid(flags, body)

    @pl.when(((flags & LAST) != 0) & (head == pl.num_programs(3) - 1))
    def _store():
        dk_ref[...] = (dk_acc_ref[...] * kw["scale"]).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def backward(
    q,
    k,
    v,
    q_seg,
    kv_seg,
    out,
    lse,
    dout,
    dlse=None,
    *,
    spec,
    scale,
    cap,
    block_q,
    block_k,
    interpret=False,
):
    """``(dq, dk, dv)`` from the saved ``lse [B, Hq, Sp, 128]``; two kernels.

    dq walks the query-major schedule (grid ``(B, Hq, steps)``); dk/dv walk the key-major
    one with the G query heads of a kv head innermost (grid ``(B, Hkv, steps, G)``).
    The lse cotangent ``dlse [B, S, Hq]`` (if any) enters through ``δ -= dlse``.
    """
    bsz, s, hq, d = q.shape
    t, hkv, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    qt, kt, vt, segs = _padded_inputs(q, k, v, q_seg, kv_seg, block_q, block_k)
    sp = qt.shape[2]
    dot_ = jnp.pad(dout, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    # δ = rowsum(do ∘ o): one cheap XLA reduction, lane-replicated like lse.
    delta = jnp.einsum("bshd,bshd->bhs", dout.astype(_F32), out.astype(_F32))
    if dlse is not None:
        delta = delta - dlse.astype(_F32).transpose(0, 2, 1)
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, sp - s)))
    delta = jnp.broadcast_to(delta[..., None], (bsz, hq, sp, LANES))
    kw = dict(spec=spec, scale=scale, cap=cap, block_q=block_q, block_k=block_k)
    itemsize = q.dtype.itemsize
    params = _platform.interpret_params(interpret)

    # -- dq: grid (B, Hq, steps), query-major schedule -------------------------------
    sched = schedule(spec, block_q, block_k, segments=bool(segs))

    def q_tile(b, h, i, qi, kj, fl):  # q/do/lse/δ/dq[b, h, q tile of step i]
        return b, h, qi[i], 0

    def kv_tile(b, h, i, qi, kj, fl):  # k/v[b, h // G, key tile of step i]
        return b, jax.lax.div(h, g), kj[i], 0  # lax.div: floor_divide needs sign, not on TPU

    q_spec = pl.BlockSpec((None, None, block_q, d), q_tile)
    do_spec = pl.BlockSpec((None, None, block_q, dv_dim), q_tile)
    k_spec = pl.BlockSpec((None, None, block_k, d), kv_tile)
    v_spec = pl.BlockSpec((None, None, block_k, dv_dim), kv_tile)
    stat_spec = pl.BlockSpec((None, None, block_q, LANES), q_tile)
    tiles = sched.num_valid * bsz * hq
    dq = _platform.pallas_call(
        functools.partial(_dq_kernel, **kw),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(bsz, hq, sched.num_steps),
            in_specs=[
                q_spec,
                k_spec,
                v_spec,
                do_spec,
                stat_spec,
                stat_spec,
                *_seg_specs(segs, q_tile, kv_tile, block_q, block_k),
            ],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((block_q, d), _F32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * block_q * block_k * (2 * d + dv_dim) * tiles,
            transcendentals=block_q * block_k * tiles,
            bytes_accessed=(qt.size * 2 + dot_.size + kt.size + vt.size) * itemsize,
        ),
        interpret=params,
    )(sched.q_tiles, sched.k_tiles, sched.flags, qt, kt, vt, dot_, lse, delta, *segs)

    # -- dk, dv: grid (B, Hkv, steps, G), key-major schedule --------------------------
    sched_k = schedule(spec, block_q, block_k, segments=bool(segs), by_key=True)

    def q_tile_k(b, h, i, j, qi, kj, fl):  # q/do/lse/δ[b, query head j of kv head h, q tile]
        return b, h * g + j, qi[i], 0

    def kv_tile_k(b, h, i, j, qi, kj, fl):  # k/v/dk/dv[b, h, key tile of step i]
        return b, h, kj[i], 0

    q_spec = pl.BlockSpec((None, None, block_q, d), q_tile_k)
    do_spec = pl.BlockSpec((None, None, block_q, dv_dim), q_tile_k)
    k_spec = pl.BlockSpec((None, None, block_k, d), kv_tile_k)
    v_spec = pl.BlockSpec((None, None, block_k, dv_dim), kv_tile_k)
    stat_spec = pl.BlockSpec((None, None, block_q, LANES), q_tile_k)
    tiles = sched_k.num_valid * bsz * hq
    dk, dv = _platform.pallas_call(
        functools.partial(_dkv_kernel, **kw),
        out_shape=(
            jax.ShapeDtypeStruct(kt.shape, k.dtype),
            jax.ShapeDtypeStruct(vt.shape, v.dtype),
        ),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(bsz, hkv, sched_k.num_steps, g),
            in_specs=[
                q_spec,
                k_spec,
                v_spec,
                do_spec,
                stat_spec,
                stat_spec,
                *_seg_specs(segs, q_tile_k, kv_tile_k, block_q, block_k),
            ],
            out_specs=[k_spec, v_spec],
            scratch_shapes=[pltpu.VMEM((block_k, d), _F32), pltpu.VMEM((block_k, dv_dim), _F32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * block_q * block_k * (2 * d + 2 * dv_dim) * tiles,
            transcendentals=block_q * block_k * tiles,
            bytes_accessed=(qt.size + dot_.size + (kt.size + vt.size) * 2) * itemsize,
        ),
        interpret=params,
    )(sched_k.q_tiles, sched_k.k_tiles, sched_k.flags, qt, kt, vt, dot_, lse, delta, *segs)

    def unpad(x, n):
        return x[:, :, :n].transpose(0, 2, 1, 3)

    return unpad(dq, s), unpad(dk, t), unpad(dv, t)
