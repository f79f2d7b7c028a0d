"""flash_attention: every implementation against the materialized reference.

Values over shapes (S, T not multiples of the blocks, S = 1, S > T, Hq/Hkv in
{1, 2, 8}, D in {64, 80, 128}) x mask flags x dtypes, and gradients against
``jax.vjp`` of the reference with a random cotangent. The xla path runs the whole
grid; the Pallas kernels (TPU interpreter, slow) run every shape once and every flag
combination once, with small tiles so that several tiles and skipped tiles occur.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flash_inputs import make_qkv, make_segments

from capibara.kernels import flash_attention
from capibara.kernels.flash_attention import BlockSizes
from capibara.kernels.testing import assert_close

# Small tiles: interpret-mode shapes stay small yet span several tiles.
BLOCKS = BlockSizes(block_q=16, block_k=16, xla_block_q=16, xla_block_k=16)

# (B, S, T, Hq, Hkv, D)
SHAPES = {
    "s=1-t=37-h=8/1-d=64": (2, 1, 37, 8, 1, 64),
    "s=37-t=53-h=4/2-d=80": (1, 37, 53, 4, 2, 80),
    "s=53-t=37-h=2/2-d=128": (1, 53, 37, 2, 2, 128),
    "s=t=40-h=8/8-d=64": (2, 40, 40, 8, 8, 64),
}

# name -> (causal, sliding_window, logits_soft_cap, segments)
FLAGS = {
    "plain": (False, None, None, False),
    "causal": (True, None, None, False),
    "causal-window": (True, 9, None, False),
    "window": (False, 9, None, False),
    "softcap": (False, None, 2.0, False),
    "causal-segments": (True, None, None, True),
    "all": (True, 13, 3.0, True),
}


def _attend(shape, flags, dtype, seed=0):
    b, s, t, hq, hkv, d = shape
    causal, window, cap, segmented = flags
    q, k, v = make_qkv(seed, b, s, t, hq, hkv, d, dtype)
    kwargs = dict(causal=causal, sliding_window=window, logits_soft_cap=cap)
    if segmented:
        kwargs["segment_ids"] = make_segments(seed, b, s, t)
    return (q, k, v), kwargs


def _call(impl, kwargs):
    interpret = impl == "pallas"
    return functools.partial(
        flash_attention,
        implementation=impl,
        interpret=interpret,
        block_sizes=BLOCKS,
        **kwargs,
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_xla_matches_reference(shape, flags, dtype):
    (q, k, v), kwargs = _attend(shape, flags, dtype)
    expected = _call("reference", kwargs)(q, k, v)
    actual = jax.jit(_call("xla", kwargs))(q, k, v)
    assert actual.dtype == q.dtype and actual.shape == q.shape
    assert_close(actual, expected, dtype)


# Every shape once (causal) and every flag combination once (on one shape).
PALLAS_CASES = [
    pytest.param(SHAPES[s], FLAGS["causal"], dt, id=f"{s}-causal-{n}")
    for s, (dt, n) in zip(
        SHAPES,
        [(jnp.float32, "f32"), (jnp.bfloat16, "bf16"), (jnp.float32, "f32"), (jnp.float32, "f32")],
        strict=True,
    )
] + [
    pytest.param(SHAPES["s=37-t=53-h=4/2-d=80"], FLAGS[f], jnp.float32, id=f"s=37-t=53-{f}-f32")
    for f in FLAGS
    if f != "causal"
]


@pytest.mark.parametrize(("shape", "flags", "dtype"), PALLAS_CASES)
def test_pallas_matches_reference(shape, flags, dtype):
    (q, k, v), kwargs = _attend(shape, flags, dtype)
    expected = _call("reference", kwargs)(q, k, v)
    actual = _call("pallas", kwargs)(q, k, v)
    assert actual.dtype == q.dtype and actual.shape == q.shape
    assert_close(actual, expected, dtype)


def test_auto_implementation_matches_reference():
    (q, k, v), kwargs = _attend(SHAPES["s=37-t=53-h=4/2-d=80"], FLAGS["all"], jnp.float32)
    expected = _call("reference", kwargs)(q, k, v)
    actual = jax.jit(functools.partial(flash_attention, **kwargs))(q, k, v)
    assert_close(actual, expected, jnp.float32)


GRAD_CASES = [
    pytest.param("xla", SHAPES[s], FLAGS[f], id=f"xla-{s}-{f}")
    for s, f in [
        ("s=37-t=53-h=4/2-d=80", "all"),
        ("s=53-t=37-h=2/2-d=128", "causal"),
        ("s=1-t=37-h=8/1-d=64", "causal-window"),
        ("s=t=40-h=8/8-d=64", "softcap"),
        ("s=t=40-h=8/8-d=64", "window"),
    ]
] + [
    pytest.param("pallas", SHAPES[s], FLAGS[f], id=f"pallas-{s}-{f}")
    for s, f in [
        ("s=37-t=53-h=4/2-d=80", "all"),
        ("s=53-t=37-h=2/2-d=128", "causal"),
        ("s=1-t=37-h=8/1-d=64", "window"),
    ]
]


@pytest.mark.parametrize(("impl", "shape", "flags"), GRAD_CASES)
def test_gradients_match_reference_vjp(impl, shape, flags):
    (q, k, v), kwargs = _attend(shape, flags, jnp.float32, seed=3)
    cotangent = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
    out, vjp_ref = jax.vjp(_call("reference", kwargs), q, k, v)
    out_impl, vjp_impl = jax.vjp(_call(impl, kwargs), q, k, v)
    assert_close(out_impl, out, jnp.float32)
    for name, got, want in zip("qkv", vjp_impl(cotangent), vjp_ref(cotangent), strict=True):
        assert got.shape == want.shape, name
        assert_close(got, want, jnp.float32, grad=True, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_bf16_gradients(impl):
    shape, flags = SHAPES["s=37-t=53-h=4/2-d=80"], FLAGS["causal-window"]
    (q, k, v), kwargs = _attend(shape, flags, jnp.bfloat16, seed=5)
    cotangent = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape), jnp.bfloat16)
    _, vjp_ref = jax.vjp(_call("reference", kwargs), q, k, v)
    _, vjp_impl = jax.vjp(_call(impl, kwargs), q, k, v)
    for name, got, want in zip("qkv", vjp_impl(cotangent), vjp_ref(cotangent), strict=True):
        assert got.dtype == jnp.bfloat16
        scale = max(1.0, float(jnp.max(jnp.abs(want.astype(jnp.float32)))))
        assert_close(got, want, jnp.bfloat16, grad=True, scale=scale, err_msg=f"d{name}")
