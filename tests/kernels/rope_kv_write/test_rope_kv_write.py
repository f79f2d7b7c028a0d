"""rope_kv_write: the reference against a numpy loop, the native kernel against the
reference, in place under jit, errors, and export for another platform.

The native CPU kernel runs wherever a C++ compiler is on PATH (there a failed build
fails its tests rather than skipping them).
"""

from __future__ import annotations

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara.kernels import native_build, rope_kv_write
from capibara.kernels.bit_views import from_bits, to_bits
from capibara.kernels.rope_kv_write import MAX_NATIVE_TOKENS, native, reference
from capibara.kernels.testing import assert_close

NATIVE_EXPECTED = jax.default_backend() == "cpu" and any(map(shutil.which, native_build.COMPILERS))
IMPLS = ["xla", "reference"] + (["native"] if NATIVE_EXPECTED else [])
BF16, F32 = jnp.bfloat16, jnp.float32


def _inputs(n=7, hq=6, hkv=2, d=16, pages=5, page_size=4, dtype=BF16, pool="uint16", seed=0):
    """Random q/k/v, angles, pools; distinct slots, but (from 6 tokens) two tokens
    share one and a page and an offset are out of range each way (skipped)."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((n, hq, d)), dtype)
    k = jnp.asarray(rng.standard_normal((n, hkv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((n, hkv, d)), dtype)
    angles = rng.uniform(0, 2000, (n, d // 2)).astype(np.float32)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pool_dtype = BF16 if pool == "uint16" else pool
    k_pages, v_pages = (
        jnp.asarray(rng.standard_normal((hkv, pages, page_size, d)), pool_dtype) for _ in "kv"
    )
    if pool == "uint16":
        k_pages, v_pages = to_bits(k_pages), to_bits(v_pages)
    slots = rng.permutation(pages * page_size)[:n]  # distinct slots ...
    write_pages = (slots // page_size).astype(np.int32)
    write_offsets = (slots % page_size).astype(np.int32)
    if n >= 6:
        # ... but one shared by two tokens, and pages and offsets out of range:
        write_pages[1], write_offsets[1] = write_pages[0], write_offsets[0]
        write_pages[2], write_pages[3] = -1, pages
        write_offsets[4], write_offsets[5] = -1, page_size
    return q, k, v, cos, sin, k_pages, v_pages, jnp.asarray(write_pages), jnp.asarray(write_offsets)


def _floats(a):
    return np.asarray(from_bits(a, BF16) if a.dtype == jnp.uint16 else a, np.float32)


def _numpy_rope_kv_write(q, k, v, cos, sin, k_pages, v_pages, write_pages, write_offsets):
    """A float64 loop over tokens and heads, rounded where the op rounds."""

    def rnd(x, like):
        return np.asarray(jnp.asarray(x, jnp.float32).astype(like), np.float64)

    def rotate(x, i):
        x = np.asarray(x, np.float64)
        half = x.shape[-1] // 2
        c, s = np.float64(cos[i]), np.float64(sin[i])
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    qf, kf, vf = (_floats(a) for a in (q, k, v))
    cos, sin = np.asarray(cos), np.asarray(sin)
    pool_dtype = BF16 if k_pages.dtype == jnp.uint16 else k_pages.dtype
    k_out, v_out = _floats(k_pages).astype(np.float64), _floats(v_pages).astype(np.float64)
    q_out = np.stack([rnd(rotate(qf[i], i), q.dtype) for i in range(q.shape[0])])
    _, pages, page_size, _ = k_pages.shape
    for i, (p, o) in enumerate(
        zip(np.asarray(write_pages), np.asarray(write_offsets), strict=True)
    ):
        if 0 <= p < pages and 0 <= o < page_size:
            k_out[:, p, o] = rnd(rnd(rotate(kf[i], i), k.dtype), pool_dtype)
            v_out[:, p, o] = rnd(vf[i], pool_dtype)
    return q_out, k_out, v_out


def _shared_slot(write_pages, write_offsets):
    """``(page, offset)`` of the slot two tokens share (which one lands is unspecified)."""
    return int(write_pages[0]), int(write_offsets[0])


def _compare(got, want, args):
    """Within the tolerance of each output's dtype (f32 rotations fused by XLA differ
    from op-by-op ones in the last bit, which can also flip a bf16 rounding)."""
    p, o = _shared_slot(args[7], args[8])
    for g, w in zip(got, want, strict=True):
        dtype = BF16 if g.dtype == jnp.uint16 else g.dtype
        g, w = (
            _floats(g),
            np.asarray(
                _floats(w) if hasattr(w, "dtype") and w.dtype == jnp.uint16 else w, np.float32
            ),
        )
        if g.ndim == 4:  # a pool: leave out the shared slot
            g, w = g.copy(), w.copy()
            g[:, p, o] = w[:, p, o] = 0
        assert_close(g, w, dtype)


@pytest.mark.parametrize(
    "dtype,pool",
    [(BF16, "uint16"), (BF16, BF16), (F32, F32), (F32, BF16), (BF16, F32)],
    ids=["bf16-bits", "bf16", "f32", "f32-into-bf16", "bf16-into-f32"],
)
def test_reference_equals_a_numpy_loop(dtype, pool):
    args = _inputs(dtype=dtype, pool=pool)
    got = jax.jit(reference.rope_kv_write)(*args)
    _compare(got, _numpy_rope_kv_write(*args), args)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "dtype,pool",
    [(BF16, "uint16"), (BF16, BF16), (F32, F32), (F32, BF16), (BF16, F32)],
    ids=["bf16-bits", "bf16", "f32", "f32-into-bf16", "bf16-into-f32"],
)
@pytest.mark.parametrize(
    "shape",
    [(7, 6, 2, 16, 5, 4), (1, 4, 4, 8, 3, 2), (12, 12, 4, 64, 9, 16), (9, 8, 1, 128, 4, 8)],
    ids=["gqa", "one-token", "small-model", "d128-mqa"],
)
def test_every_implementation_equals_the_reference(impl, dtype, pool, shape):
    n, hq, hkv, d, pages, page_size = shape
    args = _inputs(n, hq, hkv, d, pages, page_size, dtype=dtype, pool=pool, seed=n)
    run = jax.jit(functools.partial(rope_kv_write, implementation=impl))
    got = run(*args)
    assert [a.dtype for a in got] == [args[0].dtype, args[5].dtype, args[6].dtype]
    _compare(got, reference.rope_kv_write(*args), args)


@pytest.mark.parametrize("impl", IMPLS)
def test_q_with_a_query_axis_keeps_its_shape(impl):
    args = list(_inputs())
    args[0] = args[0][:, None]  # [N, 1, Hq, D], as paged attention takes decode queries
    got = jax.jit(functools.partial(rope_kv_write, implementation=impl))(*args)
    want = reference.rope_kv_write(args[0][:, 0], *args[1:])
    assert got[0].shape == args[0].shape
    np.testing.assert_array_equal(_floats(got[0][:, 0]), _floats(want[0]))


def test_native_builds_where_expected():
    assert native.available() == NATIVE_EXPECTED, native.reason()


@pytest.mark.skipif(not NATIVE_EXPECTED, reason="no C++ compiler on PATH, or not a CPU backend")
def test_default_is_the_native_kernel_in_place_under_donation():
    args = _inputs(n=8, hq=12, hkv=4, d=64, pages=49, page_size=16)
    step = jax.jit(rope_kv_write, donate_argnums=(5, 6))
    hlo = step.lower(*args).compile().as_text()
    assert native.TARGET in hlo
    # No copy of a pool (u16[4,49,16,64]) around the in-place custom call.
    assert not [line for line in hlo.splitlines() if "copy" in line and "u16[4,49,16,64]" in line]
    assert (
        native.TARGET
        not in jax.jit(functools.partial(rope_kv_write, implementation="xla"))
        .lower(*args)
        .as_text()
    )


def test_default_runs_xla_past_the_native_token_limit():
    args = _inputs(n=MAX_NATIVE_TOKENS + 1, pages=8, page_size=4)
    assert native.TARGET not in jax.jit(rope_kv_write).lower(*args).as_text()


def test_default_runs_xla_for_dtypes_the_native_kernel_lacks():
    args = list(_inputs(dtype=jnp.float16, pool=jnp.float16))
    hlo = jax.jit(rope_kv_write).lower(*args).as_text()
    assert native.TARGET not in hlo
    with pytest.raises(ValueError, match="f32 or bf16"):
        rope_kv_write(*args, implementation="native")


def test_export_for_tpu_uses_xla_and_native_fails_at_lowering():
    args = _inputs()
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    exported = jax.export.export(jax.jit(rope_kv_write), platforms=["tpu"])(*specs)
    assert native.TARGET not in exported.mlir_module()
    if NATIVE_EXPECTED:
        native_only = jax.jit(functools.partial(rope_kv_write, implementation="native"))
        with pytest.raises(ValueError, match=r"native.*cpu only"):
            jax.export.export(native_only, platforms=["tpu"])(*specs)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: {0: a[0][0, 0]}, ValueError, "q must be"),
        (lambda a: {1: a[1][:, :1]}, ValueError, "k and v"),
        (lambda a: {0: a[0][..., :8], 1: a[1][..., :8], 2: a[2][..., :8]}, ValueError, "cos"),
        (lambda a: {3: a[3][:, :4]}, ValueError, "cos and sin"),
        (lambda a: {5: a[5][:1]}, ValueError, "pools"),
        (lambda a: {7: a[7][:3]}, ValueError, "write_pages"),
        (
            lambda a: {7: a[7].astype(jnp.int64 if jax.config.x64_enabled else jnp.int16)},
            TypeError,
            "int32",
        ),
        (lambda a: {3: a[3].astype(BF16)}, TypeError, "float32"),
    ],
    ids=[
        "q-rank",
        "k-shape",
        "odd-d-cos",
        "cos-shape",
        "pool-heads",
        "slots",
        "slot-dtype",
        "cos-dtype",
    ],
)
def test_bad_inputs_raise_before_anything_runs(change, error, match):
    args = list(_inputs())
    for i, value in change(args).items():
        args[i] = value
    with pytest.raises(error, match=match):
        rope_kv_write(*args)


def test_unknown_implementations_are_refused():
    with pytest.raises(ValueError, match="no Pallas kernel"):
        rope_kv_write(*_inputs(), implementation="pallas")
    with pytest.raises(ValueError, match="not one of"):
        rope_kv_write(*_inputs(), implementation="cuda")
