"""quantized_matmul and QuantizedWeight: round-trip bounds, GGUF blocks bit-exact with
the ``gguf`` package, every implementation against the dequantize-then-f32 reference,
gradients, bad input."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from capibara.kernels import QuantizedWeight, quantize, quantized_matmul
from capibara.kernels.quantized_matmul import BlockSizes, from_gguf, native, pallas_tpu

# (bits, group, zero_point): int8 per channel and per group, int4 Q4_1- and Q4_0-like.
FORMATS = [(8, None, None), (8, 64, None), (4, 32, True), (4, 64, False), (4, 128, True)]


def _ids(fmt):
    bits, group, zp = fmt
    return f"int{bits}-g{group or 'K'}" + ("" if zp is None else ("-min" if zp else "-sym"))


def _weight(seed, k, n):
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS, ids=_ids)
def test_round_trip_error_is_within_half_a_step(fmt):
    bits, group, zp = fmt
    w = _weight(0, 256, 96)
    qw = quantize(w, bits, group, zero_point=zp)
    err = np.abs(np.asarray(qw.dequantize()) - w)
    g = qw.group
    step = np.abs(np.repeat(np.asarray(qw.scales), g, axis=0))  # [K, N]: the element's step
    bound = step if (bits == 4 and not zp) else step / 2
    assert np.all(err <= bound * (1 + 1e-5) + 1e-7), float((err / bound).max())
    # And the bound is tight enough to mean something: the error is not ~0 either.
    assert err.max() > 0.1 * bound.max()


@pytest.mark.parametrize("quant_type", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_load_bit_exact(quant_type):
    t = GGMLQuantizationType[quant_type]
    n, k = 40, 192
    w = _weight(1, n, k)  # GGUF rows: [out, in]
    raw = quants.quantize(w, t)
    qw = from_gguf(raw, quant_type, (n, k))
    assert qw.shape == (k, n)
    want = quants.dequantize(raw, t).T  # gguf's own decoder
    got = np.asarray(qw.dequantize())
    assert got.view(np.uint32).tolist() == np.ascontiguousarray(want).view(np.uint32).tolist()


def test_gguf_refuses_a_quant_type_without_a_layout():
    with pytest.raises(ValueError, match="Q5_K"):
        from_gguf(np.zeros(10, np.uint8), "Q5_K", (1, 256))


IMPLS = [("xla", {}), ("pallas", {"interpret": True}), ("native", {})]


def test_the_native_kernel_builds_wherever_a_compiler_is():
    # Portable vector code: a failed build is a failure, not a skip.
    if any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        assert native.available(), native.reason()


# (M, K, N): decode rows, non-multiples of the tiles, K past FULL_K (8-group tiles + pad).
SHAPES = [(1, 256, 128), (5, 384, 200), (33, 2560, 136)]


# Every format at every shape on xla; on the (slower) interpreted kernel the > FULL_K
# tiling runs for one grouped format and per channel.
CASES = [
    (shape, fmt, impl)
    for shape in SHAPES
    for fmt in FORMATS
    for impl in ("xla", "native", "pallas")
    if impl != "pallas" or shape[1] <= 2048 or fmt in (FORMATS[0], FORMATS[2])
]


@pytest.mark.parametrize(
    "shape,fmt,impl",
    CASES,
    ids=["x".join(map(str, s)) + f"-{_ids(f)}-{i}" for s, f, i in CASES],
)
def test_matches_the_reference(shape, fmt, impl):
    m, k, n = shape
    bits, group, zp = fmt
    kw = {"interpret": True} if impl == "pallas" else {}
    if impl == "native" and m > 16:
        m = 16  # decode rows: the kernel's use
    qw = quantize(_weight(2, k, n), bits, group, zero_point=zp)
    x = jax.random.normal(jax.random.key(3), (m, k))
    want = quantized_matmul(x, qw, implementation="reference")
    got = quantized_matmul(x, qw, implementation=impl, **kw)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=2e-5 * np.sqrt(k), rtol=1e-5)


@pytest.mark.parametrize("impl,kw", IMPLS, ids=[i for i, _ in IMPLS])
def test_bf16_activations(impl, kw):
    qw = quantize(_weight(4, 384, 256), 4, 32)
    x = jax.random.normal(jax.random.key(5), (2, 3, 384)).astype(jnp.bfloat16)
    got = quantized_matmul(x, qw, implementation=impl, **kw)
    assert got.shape == (2, 3, 256) and got.dtype == jnp.bfloat16
    want = quantized_matmul(x, qw, implementation="reference")  # f32 math, rounded
    # bf16 weights on the MXU: relative error of a K-long sum of bf16 products.
    scale = float(jnp.abs(want.astype(jnp.float32)).max())
    err = float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max())
    assert err <= 2e-2 * scale, (err, scale)
    f32 = quantized_matmul(x, qw, implementation=impl, preferred_element_type=jnp.float32, **kw)
    assert f32.dtype == jnp.float32


@pytest.mark.parametrize("impl,kw", IMPLS, ids=[i for i, _ in IMPLS])
def test_gradient_in_x_and_none_for_the_weight(impl, kw):
    qw = quantize(_weight(6, 256, 128), 8)
    x = jax.random.normal(jax.random.key(7), (4, 256))

    cot = jax.random.normal(jax.random.key(8), (4, 128))

    def loss(x, qw, impl, kw):  # linear in y: dx = cot @ Wᵀ, no rounding amplified
        return jnp.sum(cot * quantized_matmul(x, qw, implementation=impl, **kw))

    want = jax.grad(loss)(x, qw, "reference", {})
    got, dw = jax.grad(loss, argnums=(0, 1), allow_int=True)(x, qw, impl, kw)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    assert float(jnp.abs(dw.scales).max()) == 0.0


def test_jit_and_vmap_over_activations():
    qw = quantize(_weight(8, 128, 128), 4, 32)
    xs = jax.random.normal(jax.random.key(9), (3, 2, 128))
    f = jax.jit(
        jax.vmap(lambda x: quantized_matmul(x, qw, implementation="pallas", interpret=True))
    )
    want = jnp.stack([quantized_matmul(x, qw, implementation="reference") for x in xs])
    np.testing.assert_allclose(f(xs), want, atol=1e-4, rtol=1e-5)


def test_vmap_over_stacked_weights():
    # Per-layer weights stacked on a leading axis (lax.scan / vmap over layers).
    ws = [quantize(_weight(12 + i, 128, 128), 8) for i in range(2)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *ws)
    x = jax.random.normal(jax.random.key(13), (3, 128))
    f = jax.vmap(lambda w: quantized_matmul(x, w, implementation="pallas", interpret=True))
    want = jnp.stack([quantized_matmul(x, w, implementation="reference") for w in ws])
    np.testing.assert_allclose(f(stacked), want, atol=1e-4, rtol=1e-5)


def test_the_packed_weight_streams_fewer_bytes():
    w = _weight(10, 4096, 256)
    assert quantize(w, 8).nbytes < 0.27 * w.size * 4  # int8 + one f32 scale per column
    # int4 + f32 scale and min per 32: 0.5 + 8/32 bytes a value (a third of bf16's 2).
    assert quantize(w, 4, 32).nbytes == w.size // 2 + 2 * (w.size // 32) * 4


def test_the_default_runs_the_native_kernel_for_decode_rows_on_cpu():
    qw = quantize(_weight(14, 128, 64), 4, 32)
    few = jax.jit(lambda x: quantized_matmul(x, qw)).lower(jnp.ones((2, 128))).as_text()
    many = jax.jit(lambda x: quantized_matmul(x, qw)).lower(jnp.ones((64, 128))).as_text()
    assert native.TARGET in few and native.TARGET not in many


def test_bad_input_names_the_value():
    qw = quantize(_weight(11, 64, 32), 8)
    with pytest.raises(ValueError, match=r"\[\.\.\., 48\]"):
        quantized_matmul(jnp.ones((2, 48)), qw)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        quantized_matmul(jnp.ones((2, 64)), jnp.ones((64, 32)))
    with pytest.raises(ValueError, match="bits"):
        quantize(_weight(0, 64, 32), 3)
    with pytest.raises(ValueError, match="group=48"):
        quantize(_weight(0, 64, 32), 4, 48)
    with pytest.raises(TypeError, match="group"):
        quantize(_weight(0, 64, 32), 4, 32.0)
    with pytest.raises(ValueError, match="implementation='fast'"):
        quantized_matmul(jnp.ones((2, 64)), qw, implementation="fast")
    with pytest.raises(ValueError, match="block_n"):
        BlockSizes(block_n=100)
    with pytest.raises(ValueError, match="int8"):
        QuantizedWeight(jnp.zeros((64, 32), jnp.uint8), qw.scales, None, 8, 64, 0, (64, 32))


def test_tiles_follow_the_groups():
    p = pallas_tpu.plan(1, 4096, 1024, 32, jnp.bfloat16, BlockSizes())
    assert (p.mode, p.bk, p.bm) == ("group", 256, 16)  # 8 groups a K tile
    p = pallas_tpu.plan(7, 576, 1536, 32, jnp.float32, BlockSizes())
    assert (p.mode, p.bk, p.k_pad) == ("group", 576, 576)  # all of K in one tile
    p = pallas_tpu.plan(7, 576, 1536, 576, jnp.float32, BlockSizes())
    assert (p.mode, p.bk, p.k_pad) == ("channel", 512, 1024)
