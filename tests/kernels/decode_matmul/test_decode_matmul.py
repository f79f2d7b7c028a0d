"""decode_matmul: every implementation against the f32 reference, routing, gradients.

The native kernel (``decode_matmul.cc``) must be available wherever the CPU has
AVX512-BF16 and a C++ compiler is on PATH: there its tests run, and a failed build
fails them instead of skipping. Its inputs are exact bf16 values and it sums in f32,
so it is held to the f32 tolerance (scaled by sqrt(K), the size of the sums).
"""

from __future__ import annotations

import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara.kernels import decode_matmul, native_build
from capibara.kernels.decode_matmul import native
from capibara.kernels.testing import assert_close


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


NATIVE_EXPECTED = (
    jax.default_backend() == "cpu"
    and _cpu_has_avx512_bf16()
    and any(map(shutil.which, native_build.COMPILERS))
)
needs_native = pytest.mark.skipif(
    not NATIVE_EXPECTED, reason="no AVX512-BF16 CPU with a C++ compiler: XLA's dot runs instead"
)


def test_native_builds_where_expected():
    assert native.available() == NATIVE_EXPECTED, native.reason()


def _operands(m, k, n, transposed, dtype=jnp.bfloat16, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((n, k) if transposed else (k, n)), dtype)
    return x, w


# (M, K, N): rows across the 8-row register block, K odd and off the 32-wide vectors,
# N off the 32-column vectors, rows 4 KiB apart (N = 2048: the small row groups), and
# up to 8 rows of x past 16 KiB (nk shares each x load between two weight rows).
SHAPES = [
    (1, 1, 1),
    (1, 768, 2048),
    (2, 17, 5),
    (3, 100, 37),
    (5, 31, 65),
    (7, 64, 96),
    (8, 768, 256),
    (8, 2048, 67),
    (5, 1701, 9),
    (9, 33, 70),
    (16, 130, 48),
    (20, 2048, 40),
]


@needs_native
@pytest.mark.parametrize("transposed", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_native_matches_reference(shape, transposed):
    m, k, n = shape
    x, w = _operands(m, k, n, transposed)
    got = jax.jit(
        lambda x, w: decode_matmul(x, w, w_transposed=transposed, implementation="native")
    )(x, w)
    want = decode_matmul(x, w, w_transposed=transposed, implementation="reference")
    assert got.dtype == jnp.float32 and got.shape == (m, n)
    assert_close(got, want, jnp.float32, scale=math.sqrt(k))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("m", [1, 3, 12])
def test_xla_and_default_match_reference(m, transposed, dtype):
    x, w = _operands(m, 96, 40, transposed, dtype, seed=m)
    want = decode_matmul(x, w, w_transposed=transposed, implementation="reference")
    for impl in ("xla", None):
        got = jax.jit(
            lambda x, w, impl=impl: decode_matmul(
                x, w, w_transposed=transposed, implementation=impl
            )
        )(x, w)
        assert_close(got, want, jnp.float32, scale=math.sqrt(96), err_msg=str(impl))


def test_leading_dims_are_rows():
    x, w = _operands(6, 40, 24, False)
    x3 = x.reshape(2, 3, 40)
    got = decode_matmul(x3, w)
    want = decode_matmul(x, w, implementation="reference").reshape(2, 3, 24)
    assert_close(got, want, jnp.float32, scale=math.sqrt(40))


def _hlo(x, w, **kw):
    return jax.jit(lambda x, w: decode_matmul(x, w, **kw)).lower(x, w).as_text()


@needs_native
@pytest.mark.parametrize("transposed", [False, True], ids=["kn", "nk"])
def test_default_routes_few_bf16_rows_to_the_native_kernel(transposed):
    from capibara.kernels.decode_matmul import max_native_rows

    most = max_native_rows(transposed)
    x, w = _operands(most, 64, 32, transposed)
    assert native.TARGET in _hlo(x, w, w_transposed=transposed)
    x, w = _operands(most + 1, 64, 32, transposed)
    assert native.TARGET not in _hlo(x, w, w_transposed=transposed)  # XLA's GEMM
    x, w = _operands(2, 64, 32, False, jnp.float32)
    assert native.TARGET not in _hlo(x, w)  # f32 weights: XLA's dot
    x, w = _operands(2, 64, 32, False)
    assert native.TARGET not in _hlo(x, w, implementation="xla")


@needs_native
def test_default_exports_xla_for_other_platforms():
    x, w = _operands(2, 64, 32, False)
    exported = jax.export.export(jax.jit(decode_matmul), platforms=["tpu"])(x, w)
    assert native.TARGET not in exported.mlir_module()


@needs_native
def test_explicit_native_refuses_to_lower_for_tpu():
    x, w = _operands(2, 64, 32, False)
    f = jax.jit(lambda x, w: decode_matmul(x, w, implementation="native"))
    with pytest.raises(ValueError, match=r"native.*cpu only"):
        jax.export.export(f, platforms=["tpu"])(x, w)


@needs_native
@pytest.mark.parametrize("transposed", [False, True], ids=["kn", "nk"])
def test_native_gradients_match_reference(transposed):
    x, w = _operands(3, 48, 20, transposed, seed=3)
    cot = jnp.asarray(np.random.default_rng(4).standard_normal((3, 20)), jnp.float32)

    def loss(impl):
        def f(x, w):
            return jnp.sum(decode_matmul(x, w, w_transposed=transposed, implementation=impl) * cot)

        return jax.grad(f, argnums=(0, 1))(x, w)

    for got, want in zip(loss("native"), loss("reference"), strict=True):
        assert got.dtype == jnp.bfloat16
        assert_close(got, want, jnp.bfloat16, grad=True, scale=math.sqrt(20))


@needs_native
def test_native_under_vmap_and_concurrent_calls():
    """vmap runs the kernel per batch element; independent calls in one program may
    run at the same time on XLA's threads (each also schedules work on the pool)."""
    xs, w = _operands(12, 64, 300, False)
    xs = xs.reshape(4, 3, 64)
    got = jax.jit(jax.vmap(lambda x: decode_matmul(x, w, implementation="native")))(xs)
    want = decode_matmul(xs, w, implementation="reference")
    assert_close(got, want, jnp.float32, scale=8.0)

    ws = [_operands(1, 64, 300, False, seed=s)[1] for s in range(6)]

    @jax.jit
    def independent(x, ws):
        return [decode_matmul(x, w, implementation="native") for w in ws]

    x = xs[0]
    for got, w_i in zip(independent(x, ws), ws, strict=True):
        assert_close(got, decode_matmul(x, w_i, implementation="reference"), jnp.float32, scale=8.0)


def test_errors_name_the_bad_values():
    x, w = _operands(2, 16, 8, False)
    with pytest.raises(ValueError, match="implementation='pallas'"):
        decode_matmul(x, w, implementation="pallas")
    with pytest.raises(ValueError, match="does not contract"):
        decode_matmul(x[:, :15], w)
    with pytest.raises(ValueError, match="w 2-D"):
        decode_matmul(x, w[None])
    with pytest.raises(TypeError, match="floating"):
        decode_matmul(x.astype(jnp.int32), w)
    with pytest.raises(ValueError, match="bf16 x and w"):
        decode_matmul(x.astype(jnp.float32), w.astype(jnp.float32), implementation="native")


def test_missing_compiler_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(native_build.shutil, "which", lambda name: None)
    with pytest.raises(native_build.Unavailable, match="no C\\+\\+ compiler"):
        native_build.build(native.SOURCE)


def test_failed_build_is_reported_with_the_compiler_output(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if not any(map(shutil.which, native_build.COMPILERS)):
        pytest.skip("no C++ compiler on this machine")
    with pytest.raises(native_build.Unavailable, match=r"failed on broken\.cc"):
        native_build.build(broken)


def test_an_included_package_header_is_part_of_the_cache_key(monkeypatch, tmp_path):
    if not any(map(shutil.which, native_build.COMPILERS)):
        pytest.skip("no C++ compiler on this machine")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "native").mkdir()
    header = tmp_path / "native" / "value.h"
    source = tmp_path / "op" / "op.cc"
    source.parent.mkdir()
    source.write_text('#include "../native/value.h"\nextern "C" int value() { return VALUE; }\n')
    assert native_build.local_headers(source) == []  # a header not there is left out
    header.write_text("#define VALUE 1\n")
    assert native_build.local_headers(source) == [header.resolve()]
    first = native_build.build(source)
    header.write_text("#define VALUE 2\n")
    second = native_build.build(source)
    assert first != second and first.exists() and second.exists()
