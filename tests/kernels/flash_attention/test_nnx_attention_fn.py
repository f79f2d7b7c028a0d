"""nnx.MultiHeadAttention with attention_fn=nnx_attention_fn vs Flax's default, same params."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capibara.kernels import attention_compat, nnx_attention_fn
from capibara.kernels.flash_attention import BlockSizes
from capibara.kernels.testing import assert_close

BLOCKS = BlockSizes(block_q=8, block_k=8, xla_block_q=8, xla_block_k=8)
B, T, F = 2, 13, 32


def _modules(attention_fn, *, num_kv_heads=None, dropout_rate=0.0):
    def make(fn):
        kwargs = {} if fn is None else {"attention_fn": fn}
        return nnx.MultiHeadAttention(
            num_heads=4,
            in_features=F,
            num_kv_heads=num_kv_heads,
            dropout_rate=dropout_rate,
            decode=False,
            rngs=nnx.Rngs(0),
            **kwargs,
        )

    theirs, ours = make(None), make(attention_fn)
    nnx.update(ours, nnx.state(theirs, nnx.Param))  # same parameters, whatever the init
    return theirs, ours


def _x(lead=(B,)):
    return jnp.asarray(np.random.default_rng(0).standard_normal((*lead, T, F)), jnp.float32)


def _key_padding_mask():
    valid = jnp.arange(T)[None, :] < jnp.asarray([[T], [7]])
    return valid[:, None, None, :]  # [B, 1, 1, T]


CASES = {
    # name -> (call kwargs builder, reaches our kernels)
    "no-mask": (lambda x: {}, True),
    "is_causal": (lambda x: {"is_causal": True}, True),
    "make_causal_mask": (lambda x: {"mask": nnx.make_causal_mask(x[..., 0])}, False),
    "key-padding-mask": (lambda x: {"mask": _key_padding_mask()}, True),
    "causal-and-padding": (
        lambda x: {"mask": nnx.combine_masks(nnx.make_causal_mask(x[..., 0]), _key_padding_mask())},
        False,
    ),
}


@pytest.fixture
def fallback_calls(monkeypatch):
    calls = []
    real = attention_compat._jax_nn

    def spy(*args, **kwargs):
        calls.append(kwargs["implementation"])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_compat, "_jax_nn", spy)
    return calls


@pytest.mark.parametrize("gqa", [None, 2], ids=["mha", "gqa-kv=2"])
@pytest.mark.parametrize("name", CASES)
def test_multi_head_attention_matches_default(name, gqa, fallback_calls):
    build, kernel = CASES[name]
    theirs, ours = _modules(nnx_attention_fn, num_kv_heads=gqa)
    x = _x()
    kwargs = build(x)
    want = theirs(x, **kwargs)
    got = nnx.jit(lambda m, x: m(x, **kwargs))(ours, x)
    assert fallback_calls == ([] if kernel else ["xla"])
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_close(got, want, jnp.float32)


def test_pallas_interpret_and_several_batch_dims():
    fn = functools.partial(
        nnx_attention_fn, implementation="pallas", interpret=True, block_sizes=BLOCKS
    )
    theirs, ours = _modules(fn)
    x = _x(lead=(2, 2))
    assert_close(ours(x, is_causal=True), theirs(x, is_causal=True), jnp.float32)


def test_dropout_rate_when_deterministic_runs_the_kernels(fallback_calls):
    theirs, ours = _modules(nnx_attention_fn, dropout_rate=0.1)
    x = _x()
    mask = _key_padding_mask()
    want = theirs(x, mask=mask, deterministic=True)
    assert_close(ours(x, mask=mask, deterministic=True), want, jnp.float32)
    assert fallback_calls == []
    # Active dropout needs the weights: Flax's own function, same dropout draws.
    theirs, ours = _modules(nnx_attention_fn, dropout_rate=0.1)
    want = theirs(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    got = ours(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_gradients_match_default():
    theirs, ours = _modules(nnx_attention_fn)
    x = _x()

    def loss(m, x):
        return jnp.sum(jnp.sin(m(x, is_causal=True)))

    g_want = nnx.grad(loss)(theirs, x)
    g_got = nnx.jit(nnx.grad(loss))(ours, x)
    for w, g in zip(jax.tree.leaves(g_want), jax.tree.leaves(g_got), strict=True):
        assert_close(g, w, jnp.float32, grad=True)
