"""Fully masked rows, skipped tiles, and bad inputs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flash_inputs import make_qkv

from capibara.kernels import flash_attention
from capibara.kernels.flash_attention import BlockSizes, MaskSpec, masks, pallas_tpu, xla
from capibara.kernels.testing import assert_close

BLOCKS = BlockSizes(block_q=16, block_k=16, xla_block_q=16, xla_block_k=16)
IMPLS = [pytest.param("xla", id="xla"), pytest.param("pallas", id="pallas-interpret")]


def _call(impl, **kwargs):
    return functools.partial(
        flash_attention,
        implementation=impl,
        interpret=impl == "pallas",
        block_sizes=BLOCKS,
        **kwargs,
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_that_see_nothing_are_zero_with_finite_gradients(impl):
    # S > T causal: the first S - T queries sit before key 0. A query segment that no
    # key has (id 7) sees nothing either.
    b, s, t, hq, hkv, d = 1, 40, 24, 2, 1, 64
    q, k, v = make_qkv(0, b, s, t, hq, hkv, d)
    q_seg = jnp.zeros((b, s), jnp.int32).at[:, -3:].set(7)
    segs = (q_seg, jnp.zeros((b, t), jnp.int32))
    f = _call(impl, causal=True, segment_ids=segs)
    out, vjp = jax.vjp(f, q, k, v)
    np.testing.assert_array_equal(np.asarray(out[:, : s - t]), 0.0)
    np.testing.assert_array_equal(np.asarray(out[:, -3:]), 0.0)
    assert_close(out, _call("reference", causal=True, segment_ids=segs)(q, k, v), jnp.float32)
    dq, dk, dv = vjp(jnp.ones_like(out))
    for g in (dq, dk, dv):
        assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(dq[:, : s - t]), 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_tiles_are_never_computed(impl):
    # Causal window 8 over S = T = 64 with 16-wide tiles: keys 48..63 are outside every
    # tile of queries 0..15. Poison them with NaN: if any implementation multiplied
    # those tiles and masked afterwards, 0 * NaN would reach rows 0..15.
    b, s, hq, d = 1, 64, 2, 64
    q, k, v = make_qkv(1, b, s, s, hq, hq, d)
    f = _call(impl, causal=True, sliding_window=8)
    clean = f(q, k, v)
    poisoned = f(q, k.at[:, 48:].set(jnp.nan), v.at[:, 48:].set(jnp.nan))
    assert np.isfinite(np.asarray(poisoned[:, :16])).all()
    np.testing.assert_array_equal(np.asarray(poisoned[:, :16]), np.asarray(clean[:, :16]))


def test_cost_counts_only_visible_tiles():
    # Causal S = T = 4096: the xla path computes ~half the logits (the triangle plus the
    # diagonal chunks), the Pallas grid lists nq(nq+1)/2 of nq² tiles; a window cuts more.
    spec = MaskSpec(q_len=4096, kv_len=4096, causal=True)
    # xla: query block i (256 rows) runs key chunks 0..ceil(256(i+1)/512) of 512.
    chunks = sum(-(-256 * (i + 1) // 512) for i in range(16))
    assert xla.computed_logits(spec, 256, 512) == 256 * 512 * chunks < 0.6 * 4096 * 4096
    sched = pallas_tpu.schedule(spec, 512, 512, segments=False)
    assert sched.num_valid == 8 * 9 // 2
    # Only the 8 diagonal tiles need the element mask.
    assert int(((sched.flags & pallas_tpu.MASK) != 0).sum()) == 8
    windowed = MaskSpec(q_len=4096, kv_len=4096, causal=True, sliding_window=512)
    assert pallas_tpu.schedule(windowed, 512, 512, segments=False).num_valid == 8 + 7
    assert xla.computed_logits(windowed, 256, 512) < 0.25 * 4096 * 4096
    by_key = pallas_tpu.schedule(windowed, 512, 512, segments=False, by_key=True)
    assert by_key.num_valid == 8 + 7
    # S = 1024 queries on T = 4096 keys, causal: top-left (jax.nn) sees 1 + 2 key tiles,
    # bottom-right 7 + 8; both skip the rest.
    top_left = MaskSpec(q_len=1024, kv_len=4096, causal=True, q_offset=0)
    assert pallas_tpu.schedule(top_left, 512, 512, segments=False).num_valid == 1 + 2
    bottom_right = MaskSpec(q_len=1024, kv_len=4096, causal=True)
    assert pallas_tpu.schedule(bottom_right, 512, 512, segments=False).num_valid == 7 + 8
    assert xla.computed_logits(top_left, 256, 512) == 256 * 512 * (1 + 1 + 2 + 2)


def test_xla_memory_is_linear_in_sequence_length():
    # XLA's planned temporaries for S = T = 4096, one head: a small multiple of
    # rows x chunk, far below the 64 MiB of one materialized [S, T] f32 score matrix.
    s = 4096
    x = jax.ShapeDtypeStruct((1, s, 1, 64), jnp.float32)
    fn = jax.jit(functools.partial(flash_attention, causal=True, implementation="xla"))
    temp = fn.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
    assert temp < s * s * 4 / 8, temp
    grad = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2)))
    temp = grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
    assert temp < s * s * 4 / 8, temp


def test_mask_helpers_agree_with_elementwise_mask():
    # key_range / block_needs_mask (host) against visible (elementwise) on every block.
    for spec in [
        MaskSpec(q_len=23, kv_len=37, causal=True),
        MaskSpec(q_len=37, kv_len=23, causal=True, sliding_window=5),
        MaskSpec(q_len=30, kv_len=30, sliding_window=4),
        MaskSpec(q_len=37, kv_len=23, causal=True, q_offset=0, local_window=(5, 0)),
        MaskSpec(q_len=23, kv_len=37, q_offset=0, local_window=(3, 6)),
        MaskSpec(q_len=23, kv_len=37, causal=True, q_offset=0),
        MaskSpec(q_len=30, kv_len=30, local_window=(-2, 3)),
        MaskSpec(q_len=20, kv_len=30, local_window=(2, -3)),  # empty: sees nothing
    ]:
        keep = np.asarray(
            masks.visible(spec, jnp.arange(spec.q_len)[:, None], jnp.arange(spec.kv_len)[None])
        )
        for a in range(0, spec.q_len, 8):
            b = min(a + 8, spec.q_len)
            lo, hi = masks.key_range(spec, a, b)
            cols = np.nonzero(keep[a:b].any(axis=0))[0]
            assert (lo, hi) == ((cols[0], cols[-1] + 1) if len(cols) else (lo, lo))
            for c in range(0, spec.kv_len, 8):
                block = keep[a:b, c : c + 8]
                needs = masks.block_needs_mask(spec, a, b, c, c + 8, segments=False)
                assert needs == (not block.all() or c + 8 > spec.kv_len)
                assert masks.block_visible(spec, a, b, c, c + 8) == block.any()


def _qkv(s=8, t=8, hq=4, hkv=2, d=16):
    return make_qkv(0, 1, s, t, hq, hkv, d)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(sliding_window=0), ValueError, "sliding_window"),
        (dict(sliding_window=-3), ValueError, "sliding_window"),
        (dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap"),
        (dict(implementation="triton"), ValueError, "implementation"),
        (dict(implementation="xla", interpret=True), ValueError, "interpret"),
        (dict(block_sizes=(128, 128)), TypeError, "BlockSizes"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    q, k, v = _qkv()
    with pytest.raises(error, match=match):
        flash_attention(q, k, v, **kwargs)


def test_bad_shapes_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(*_qkv(hq=3, hkv=2))
    with pytest.raises(ValueError, match="same shape"):
        flash_attention(q, k, v[:, :5])
    with pytest.raises(ValueError, match="batch and head_dim"):
        flash_attention(q[..., :8], k, v)
    with pytest.raises(ValueError, match="same rank"):
        flash_attention(q[0], k, v)  # unbatched q, batched k/v
    with pytest.raises(ValueError, match="rank >= 3"):
        flash_attention(q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(TypeError, match="share a dtype"):
        flash_attention(q.astype(jnp.bfloat16), k, v)
    with pytest.raises(ValueError, match="segment_ids"):
        flash_attention(q, k, v, segment_ids=(jnp.zeros((1, 8), int), jnp.zeros((1, 7), int)))
    with pytest.raises(ValueError, match="block_q must be a positive multiple of 8"):
        BlockSizes(block_q=12)


def test_pallas_without_interpret_fails_at_lowering_on_cpu():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="interpret=True"):
        jax.jit(functools.partial(flash_attention, implementation="pallas"))(q, k, v)
