"""Every implementation under strict jax configuration, against the reference.

``jax_numpy_rank_promotion="raise"`` (no implicit rank broadcasting: the xla and
reference paths used to fail with "Operands could not be broadcast together") and
``jax_enable_checks`` (jaxpr type checks, custom_vjp effect checks included). The
expected values are computed outside the strict context.
"""

from __future__ import annotations

import contextlib
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from paged_inputs import make_cache

from capibara.kernels import native_build, paged_attention, paged_prefill_attention
from capibara.kernels.paged_attention import BlockSizes
from capibara.kernels.testing import assert_close

NATIVE_EXPECTED = jax.default_backend() == "cpu" and any(map(shutil.which, native_build.COMPILERS))
IMPLS = {
    "reference": dict(implementation="reference"),
    "xla": dict(implementation="xla"),
    "pallas-interpret": dict(implementation="pallas", interpret=True),
    "auto": {},
}
if NATIVE_EXPECTED:
    IMPLS["native"] = dict(implementation="native")
BLOCKS = BlockSizes(pages_per_block=2, xla_pages_per_block=3)

# name -> (S, Hq, Hkv, lengths); page_size 8, 5 table slots
CASES = {
    "decode-h=4/2": (1, 4, 2, [13, 1, 40, 0]),
    "chunk=3-h=4/1": (3, 4, 1, [2, 21, 40]),
}
FLAGS = {"plain": {}, "window=6-softcap=5": dict(sliding_window=6, logits_soft_cap=5.0)}


@contextlib.contextmanager
def strict():
    with jax.numpy_rank_promotion("raise"), jax.enable_checks(True):
        yield


def test_the_strict_context_is_strict():
    with strict():
        assert jax.config.jax_numpy_rank_promotion == "raise"
        assert jax.config.jax_enable_checks
        with pytest.raises(ValueError, match="could not be broadcast"):
            jnp.ones(3) + jnp.ones((2, 1))


def problem(case, dtype=np.float32):
    s, hq, hkv, lengths = CASES[case]
    return make_cache(
        np.random.default_rng(1),
        lengths=lengths,
        num_queries=s,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=32,
        page_size=8,
        pages_per_seq=5,
        dtype=dtype,
    )


def run(q, *cache, **kw):
    if q.shape[1] == 1:
        return jax.block_until_ready(paged_attention(q[:, 0], *cache, **kw)[:, None])
    return jax.block_until_ready(paged_prefill_attention(q, *cache, **kw))


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_strict_config_matches_reference(impl, case, flags):
    q, *cache = problem(case)
    expected = run(q, *cache, implementation="reference", **FLAGS[flags])
    fn = functools.partial(run, block_sizes=BLOCKS, **FLAGS[flags], **IMPLS[impl])
    with strict():
        eager = fn(q, *cache)
        jitted = jax.jit(fn)(q, *cache)
    assert_close(eager, expected, jnp.float32)
    assert_close(jitted, expected, jnp.float32)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "pallas-interpret"])
def test_strict_config_bf16_and_bit_pools(impl):
    q, k, v, lengths, table = problem("chunk=3-h=4/1", jnp.bfloat16)
    expected = run(q, k, v, lengths, table, implementation="reference")
    bits = [jax.lax.bitcast_convert_type(p, jnp.uint16) for p in (k, v)]
    with strict():
        out = jax.jit(functools.partial(run, **IMPLS[impl]))(q, *bits, lengths, table)
    assert_close(out, expected, jnp.bfloat16)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "pallas-interpret"])
def test_strict_config_under_checkify_and_vmap(impl):
    q, k, v, lengths, table = problem("decode-h=4/2")
    fn = functools.partial(paged_attention, **IMPLS[impl])
    expected = fn(q[:, 0], k, v, lengths, table)
    with strict():
        err, out = jax.jit(checkify.checkify(fn))(q[:, 0], k, v, lengths, table)
        assert err.get() is None
        bad = table.copy()
        bad[2, 4] = 99
        err, _ = jax.jit(checkify.checkify(fn))(q[:, 0], k, v, lengths, bad)
        assert "page_table[2, 4] = 99" in err.get()
        batched = jax.vmap(fn, in_axes=(0, None, None, 0, None))(
            np.stack([q[:, 0]] * 2), k, v, np.stack([lengths] * 2), table
        )
    assert_close(out, expected, jnp.float32)
    assert_close(batched[1], expected, jnp.float32)
