"""capibara.kernels.dot_product_attention against jax.nn.dot_product_attention itself.

jax.nn's own argument combinations (broadcast mask/bias shapes, GQA/MQA, lengths,
windows, is_causal with T != S, unbatched inputs, return_residual) x dtypes, values
and gradients, under jit and vmap; each case also says whether it must run our kernels
or jax.nn's xla fallback (a spy on the fallback checks which one ran).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara.kernels import attention_compat, dot_product_attention
from capibara.kernels.flash_attention import BlockSizes
from capibara.kernels.testing import assert_close

# 8-wide tiles: T, S of 13..21 span several tiles, so top-left causal/window skipping runs.
BLOCKS = BlockSizes(block_q=8, block_k=8, xla_block_q=8, xla_block_k=8)
B, N, K, H = 2, 4, 2, 16
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def _mask(rng, shape, p=0.7):
    return jnp.asarray(rng.random(shape) < p)


def _case(name, t=13, s=21, n=N, k=K, unbatched=False, **spec):
    return pytest.param((t, s, n, k, unbatched, spec), id=name)


# spec entries: kernel (bool: the call must reach our kernels), mask/bias: shape to draw,
# q_lens / kv_lens: per-batch lengths, everything else is passed to both functions.
CASES = [
    _case("plain-t=s", t=16, s=16, kernel=True),
    _case("gqa-t<s", kernel=True),
    _case("mqa-causal-t<s", k=1, is_causal=True, kernel=True),
    _case("causal-t<s", is_causal=True, kernel=True),
    _case("causal-t>s", t=21, s=13, is_causal=True, kernel=True),
    _case("window-(3,1)", local_window_size=(3, 1), kernel=True),
    _case("window-int-2", local_window_size=2, kernel=True),
    _case(
        "causal-window-(4,0)-t>s", t=21, s=13, is_causal=True, local_window_size=(4, 0), kernel=True
    ),
    _case("window-empty-rows-t>s", t=21, s=9, local_window_size=(1, 0), kernel=True),
    _case("window-negative-(-2,3)", local_window_size=(-2, 3), kernel=True),
    _case("q-lengths", q_lens=(13, 6), kernel=True),
    _case("kv-lengths-with-0", kv_lens=(0, 9), kernel=True),
    _case(
        "lengths-causal-window",
        q_lens=(4, 13),
        kv_lens=(21, 7),
        is_causal=True,
        local_window_size=(5, 2),
        kernel=True,
    ),
    _case("mask-key-pad-[B,1,1,S]", mask=(B, 1, 1, 21), kernel=True),
    _case("mask-key-pad-[1,1,1,S]", mask=(1, 1, 1, 21), is_causal=True, kernel=True),
    _case("mask-[S]", mask=(21,), kernel=True),
    _case("mask-query-[B,1,T,1]", mask=(B, 1, 13, 1), kv_lens=(15, 21), kernel=True),
    _case("mask-batch-[B,1,1,1]", mask=(B, 1, 1, 1), kernel=True),
    _case("mask-dense-[B,1,T,S]", mask=(B, 1, 13, 21), kernel=False),
    _case("mask-heads-[1,N,T,S]-causal", mask=(1, N, 13, 21), is_causal=True, kernel=False),
    _case("mask-heads-[B,N,1,S]", mask=(B, N, 1, 21), kernel=False),
    _case("mask-2d-[T,S]", mask=(13, 21), kernel=False),
    _case("bias-[B,N,T,S]", bias=(B, N, 13, 21), kernel=False),
    _case(
        "bias-[1,1,T,S]-mask-lengths",
        bias=(1, 1, 13, 21),
        mask=(B, 1, 1, 21),
        kv_lens=(20, 3),
        kernel=False,
    ),
    _case(
        "bias-[B,1,1,S]-causal-window",
        bias=(B, 1, 1, 21),
        is_causal=True,
        local_window_size=(3, 0),
        kernel=False,
    ),
    _case("scale-0.3", scale=0.3, kernel=True),
    _case("unbatched-causal", unbatched=True, is_causal=True, kernel=True),
    _case("unbatched-mask-[N,T,S]", unbatched=True, mask=(N, 13, 21), kernel=False),
    _case("unbatched-window", t=21, s=13, unbatched=True, local_window_size=(2, 2), kernel=True),
]


def _inputs(case, dtype, seed=0):
    t, s, n, k, unbatched, spec = case
    rng = np.random.default_rng(seed)
    lead = () if unbatched else (B,)
    q, kk, v = (
        jnp.asarray(rng.standard_normal(lead + shape), dtype)
        for shape in ((t, n, H), (s, k, H), (s, k, H))
    )
    kwargs = {
        key: val for key, val in spec.items() if key in ("is_causal", "local_window_size", "scale")
    }
    bias = mask = None
    if "mask" in spec:
        mask = _mask(rng, spec["mask"])
    if "bias" in spec:
        bias = jnp.asarray(rng.standard_normal(spec["bias"]), dtype)
    if "q_lens" in spec:
        kwargs["query_seq_lengths"] = jnp.asarray(spec["q_lens"], jnp.int32)
    if "kv_lens" in spec:
        kwargs["key_value_seq_lengths"] = jnp.asarray(spec["kv_lens"], jnp.int32)
    return (q, kk, v, bias, mask), kwargs, spec["kernel"]


def _ours(impl, **kwargs):
    return functools.partial(
        dot_product_attention,
        implementation=impl,
        interpret=impl == "pallas",
        block_sizes=BLOCKS,
        **kwargs,
    )


@pytest.fixture
def fallback_calls(monkeypatch):
    """Counts the calls that went to jax.nn's xla path instead of our kernels."""
    calls = []
    real = attention_compat._jax_nn

    def spy(*args, **kwargs):
        calls.append(kwargs["implementation"])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_compat, "_jax_nn", spy)
    return calls


def _check(got, want, dtype, *, grad=False, err_msg=""):
    """The dtype's tolerance, relative to the values' magnitude (``testing.tolerance``'s
    ``scale``): outputs reach |3| here, where one bf16 ulp (both sides round) is 0.016."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.dtype)
    scale = max(1.0, float(jnp.max(jnp.abs(want.astype(jnp.float32)))))
    assert_close(got, want, dtype, grad=grad, scale=scale, err_msg=err_msg)


def _check_residual(got, want, dtype):
    got, want = np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
    # Rows that see nothing: jax.nn's large negative (-inf in f16), exactly.
    masked = want < -1e30
    np.testing.assert_array_equal(got[masked], want[masked])
    # The lse of a row grows with its logits (|lse| up to ~5 here): tolerance relative to 5.
    assert_close(got[~masked], want[~masked], dtype, scale=5.0, err_msg="residual")


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", CASES)
def test_xla_matches_jax_nn(case, dtype, fallback_calls):
    dtype = DTYPES[dtype]
    args, kwargs, kernel = _inputs(case, dtype)
    want, want_res = jax.nn.dot_product_attention(*args, return_residual=True, **kwargs)
    got, res = jax.jit(_ours("xla", return_residual=True, **kwargs))(*args)
    assert fallback_calls == ([] if kernel else ["xla"])
    _check(got, want, dtype)
    _check_residual(res, want_res, dtype)
    assert res.shape == want_res.shape and res.dtype == want_res.dtype


# The Pallas interpreter is slow: every kernel-path case once, in f32.
@pytest.mark.parametrize("case", [c for c in CASES if c.values[0][5]["kernel"]])
@pytest.mark.parametrize("impl", ["pallas", "reference"])
def test_pallas_and_reference_match_jax_nn(impl, case, fallback_calls):
    args, kwargs, _ = _inputs(case, jnp.float32)
    want, want_res = jax.nn.dot_product_attention(*args, return_residual=True, **kwargs)
    got, res = _ours(impl, return_residual=True, **kwargs)(*args)
    assert fallback_calls == []
    _check(got, want, jnp.float32)
    _check_residual(res, want_res, jnp.float32)


GRAD_CASES = [
    ("xla", "gqa-t<s"),
    ("xla", "causal-t>s"),
    ("xla", "lengths-causal-window"),
    ("xla", "kv-lengths-with-0"),
    ("xla", "mask-query-[B,1,T,1]"),
    ("xla", "window-empty-rows-t>s"),
    ("xla", "bias-[1,1,T,S]-mask-lengths"),
    ("xla", "unbatched-causal"),
    ("pallas", "lengths-causal-window"),
    ("pallas", "window-empty-rows-t>s"),
    ("reference", "kv-lengths-with-0"),
]


@pytest.mark.parametrize(
    ("impl", "name"), [pytest.param(i, n, id=f"{i}-{n}") for i, n in GRAD_CASES]
)
def test_gradients_match_jax_nn(impl, name):
    case = next(c for c in CASES if c.id == name).values[0]
    (q, k, v, bias, mask), kwargs, _ = _inputs(case, jnp.float32, seed=1)
    cot = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
    diff = (0, 1, 2) if bias is None else (0, 1, 2, 3)

    def loss(fn):
        def f(q, k, v, bias):
            return jnp.sum(fn(q, k, v, bias, mask) * cot)

        return jax.jit(jax.grad(f, argnums=diff))

    want = loss(functools.partial(jax.nn.dot_product_attention, **kwargs))(q, k, v, bias)
    got = loss(_ours(impl, **kwargs))(q, k, v, bias)
    for name, g, w in zip("qkvb", got, want, strict=False):
        _check(g, w, jnp.float32, grad=True, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_traced_scale_values_and_gradient(impl):
    (q, k, v, _, _), _, _ = _inputs(CASES[3].values[0], jnp.float32)

    def loss(fn, scale):
        return jnp.sum(fn(q, k, v, is_causal=True, scale=scale) ** 2)

    ours = functools.partial(
        dot_product_attention, implementation=impl, interpret=impl == "pallas", block_sizes=BLOCKS
    )
    for f in (ours, jax.nn.dot_product_attention):
        assert jax.jit(functools.partial(loss, f))(0.2).shape == ()
    got = jax.jit(jax.value_and_grad(functools.partial(loss, ours)))(0.2)
    want = jax.jit(jax.value_and_grad(functools.partial(loss, jax.nn.dot_product_attention)))(0.2)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5)


def test_vmap_matches_jax_nn():
    (q, k, v, _, _), _, _ = _inputs(CASES[1].values[0], jnp.float32)
    lens = jnp.asarray([[5, 21], [13, 2]], jnp.int32)  # [vmap, B]
    qs, ks, vs = (jnp.stack([x, x[::-1] * 0.5]) for x in (q, k, v))

    def run(fn):
        def one(q, k, v, kv_lens):
            return fn(q, k, v, is_causal=True, key_value_seq_lengths=kv_lens)

        return jax.vmap(one)(qs, ks, vs, lens)

    want = run(jax.nn.dot_product_attention)
    _check(jax.jit(lambda: run(_ours("xla")))(), want, jnp.float32)
    _check(run(_ours("pallas")), want, jnp.float32)


def test_cudnn_off_gpu_and_bad_arguments_raise():
    (q, k, v, _, _), _, _ = _inputs(CASES[1].values[0], jnp.float32)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match=r"cudnn.*CUDA GPU"):
            dot_product_attention(q, k, v, implementation="cudnn")
    bad = [
        (dict(implementation="triton"), ValueError, "implementation='triton'"),
        (dict(is_causal="yes"), TypeError, "is_causal='yes'"),
        (dict(local_window_size="3"), TypeError, "local_window_size='3'"),
        (dict(local_window_size=(3, 1.5)), TypeError, r"local_window_size\[1\]=1.5"),
        (dict(mask=jnp.ones((B, 1, 1, 21), jnp.float32)), ValueError, "mask must be bool"),
        (dict(mask=jnp.ones((B, 3, 1, 21), bool)), ValueError, r"mask.shape=\(2, 3, 1, 21\)"),
        (dict(bias=jnp.ones((B, 1, 13, 20))), ValueError, r"bias.shape=\(2, 1, 13, 20\)"),
        (dict(query_seq_lengths=jnp.ones((B,), jnp.int16)), ValueError, "query_seq_lengths"),
        (dict(key_value_seq_lengths=jnp.ones((3,), jnp.int32)), ValueError, r"\(B,\)=\(2,\)"),
        (dict(return_residual=1), TypeError, "return_residual=1"),
        (dict(scale="big"), TypeError, "scale='big'"),
    ]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            dot_product_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="value must match key"):
        dot_product_attention(q, k, v[..., :8])
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        dot_product_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="same rank"):
        dot_product_attention(q[0], k, v)


def test_array_likes_and_numpy_window():
    (q, k, v, _, _), _, _ = _inputs(CASES[0].values[0], jnp.float32)
    want = jax.nn.dot_product_attention(q, k, v, local_window_size=(2, 1))
    got = dot_product_attention(
        np.asarray(q).tolist(), np.asarray(k), v, local_window_size=(np.int64(2), np.int32(1))
    )
    _check(got, want, jnp.float32)
