"""paged_attention rejects bad input at trace time with a message naming the value."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara.kernels import paged_attention, paged_prefill_attention
from capibara.kernels.paged_attention import BlockSizes, native

B, HQ, HKV, D, P, PAGE, PPS = 2, 4, 2, 64, 6, 8, 3


def inputs(**overrides):
    args = dict(
        q=jnp.zeros((B, HQ, D), jnp.float32),
        k_pages=jnp.zeros((HKV, P, PAGE, D), jnp.float32),
        v_pages=jnp.zeros((HKV, P, PAGE, D), jnp.float32),
        lengths=jnp.array([3, 9], jnp.int32),
        page_table=jnp.zeros((B, PPS), jnp.int32),
    )
    args.update(overrides)
    return args


BAD = {
    "heads-not-divisible": (
        dict(q=jnp.zeros((B, 3, D), jnp.float32)),
        {},
        ValueError,
        "multiple of the kv heads",
    ),
    "head-dim-mismatch": (dict(q=jnp.zeros((B, HQ, 32))), {}, ValueError, "head_dim"),
    "k-v-shapes-differ": (
        dict(v_pages=jnp.zeros((HKV, P, PAGE, 32), jnp.float32)),
        {},
        ValueError,
        "same shape",
    ),
    "pages-rank": (dict(k_pages=jnp.zeros((P, PAGE, D))), {}, ValueError, "k_pages must be"),
    "q-rank": (dict(q=jnp.zeros((B, 1, HQ, D))), {}, ValueError, r"q must be \[B, Hq, D\]"),
    "lengths-shape": (dict(lengths=jnp.zeros((3,), jnp.int32)), {}, ValueError, "lengths"),
    "table-batch": (dict(page_table=jnp.zeros((3, PPS), jnp.int32)), {}, ValueError, "page_table"),
    "float-lengths": (dict(lengths=jnp.zeros((B,), jnp.float32)), {}, TypeError, "lengths"),
    "float-table": (dict(page_table=jnp.zeros((B, PPS))), {}, TypeError, "page_table"),
    "int-q": (dict(q=jnp.zeros((B, HQ, D), jnp.int32)), {}, TypeError, "floating"),
    "mixed-dtypes": (dict(q=jnp.zeros((B, HQ, D), jnp.bfloat16)), {}, TypeError, "share a dtype"),
    "window=0": ({}, dict(sliding_window=0), ValueError, "sliding_window"),
    "window=-3": ({}, dict(sliding_window=-3), ValueError, "sliding_window"),
    "window=2.5": ({}, dict(sliding_window=2.5), TypeError, "sliding_window"),
    "window=True": ({}, dict(sliding_window=True), TypeError, "sliding_window"),
    "window=array": ({}, dict(sliding_window=np.array([4])), TypeError, "sliding_window"),
    "softcap=0": ({}, dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap"),
    "softcap=-1": ({}, dict(logits_soft_cap=np.float32(-1)), ValueError, "logits_soft_cap"),
    "softcap=str": ({}, dict(logits_soft_cap="5"), TypeError, "logits_soft_cap"),
    "scale=nan": ({}, dict(scale=float("nan")), ValueError, "scale"),
    "scale=str": ({}, dict(scale="0.1"), TypeError, "scale"),
    "scale=True": ({}, dict(scale=True), TypeError, "scale"),
    "interpret=1": ({}, dict(interpret=1), TypeError, "interpret must be a bool"),
    "interpret=str": ({}, dict(interpret="yes"), TypeError, "interpret must be a bool"),
    "interpret=None": ({}, dict(interpret=None), TypeError, "interpret must be a bool"),
    "implementation": ({}, dict(implementation="cuda"), ValueError, "implementation"),
    "interpret-with-xla": (
        {},
        dict(implementation="xla", interpret=True),
        ValueError,
        "interpret",
    ),
    "block-sizes-type": ({}, dict(block_sizes={"pages_per_block": 2}), TypeError, "BlockSizes"),
    "interpret-with-native": (
        {},
        dict(implementation="native", interpret=True),
        ValueError,
        "interpret",
    ),
    "native-f16": (
        {n: jnp.zeros(a.shape, jnp.float16) for n, a in inputs().items() if n[0] in "qkv"},
        dict(implementation="native"),
        ValueError,
        "native.*f32 or bf16",
    ),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_raises(name):
    overrides, kwargs, error, match = BAD[name]
    with pytest.raises(error, match=match):
        paged_attention(**inputs(**overrides), **kwargs)


def test_prefill_wants_rank_4_queries():
    with pytest.raises(ValueError, match=r"q must be \[B, S, Hq, D\]"):
        paged_prefill_attention(**inputs())


@pytest.mark.parametrize("entry", ["decode", "prefill"])
@pytest.mark.parametrize("name", ["window=True", "interpret=1", "scale=str"])
def test_both_entry_points_name_themselves(name, entry):
    overrides, kwargs, error, _ = BAD[name]
    args = inputs(**overrides)
    op = paged_attention
    if entry == "prefill":
        op, args["q"] = paged_prefill_attention, args["q"][:, None]
    with pytest.raises(error, match=f"^{op.__name__}: "):
        op(**args, **kwargs)


@pytest.mark.parametrize(
    "value,error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)]
)
@pytest.mark.parametrize("field", ["pages_per_block", "xla_pages_per_block"])
def test_block_sizes_validated(field, value, error):
    with pytest.raises(error, match=field):
        BlockSizes(**{field: value})


def test_block_sizes_take_numpy_integers_as_ints():
    blocks = BlockSizes(pages_per_block=np.int64(2), xla_pages_per_block=np.int32(3))
    assert blocks == BlockSizes(pages_per_block=2, xla_pages_per_block=3)
    assert type(blocks.pages_per_block) is int and type(blocks.xla_pages_per_block) is int


def _problem():
    """A small random problem with every slot valid (lengths 13 and 20, 3 slots of 8)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, HQ, D)).astype(np.float32)
    k = rng.standard_normal((HKV, P, PAGE, D)).astype(np.float32)
    v = rng.standard_normal((HKV, P, PAGE, D)).astype(np.float32)
    return q, k, v, np.array([13, 20], np.int32), np.array([[4, 1, 0], [2, 5, 3]], np.int32)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_numpy_scalars_where_python_scalars_are_asked(impl):
    args = _problem()
    want = paged_attention(
        *args,
        scale=0.25,
        logits_soft_cap=3.0,
        sliding_window=7,
        implementation=impl,
        block_sizes=BlockSizes(xla_pages_per_block=2),
    )
    got = paged_attention(
        *args,
        scale=np.float32(0.25),
        logits_soft_cap=np.int64(3),
        sliding_window=np.int64(7),
        implementation=impl,
        interpret=np.bool_(False),
        block_sizes=BlockSizes(xla_pages_per_block=np.int64(2)),
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # a different window really changes the result (the values are used, not ignored)
    other = paged_attention(*args, sliding_window=np.int64(3), implementation=impl)
    assert np.abs(np.asarray(other) - np.asarray(want)).max() > 1e-3


@pytest.mark.parametrize("entry", ["decode", "prefill"])
def test_lists_convert_like_jax_numpy(entry):
    q, k, v, lengths, table = _problem()
    op = paged_attention
    if entry == "prefill":
        op, q = paged_prefill_attention, q[:, None]
    want = op(q, k, v, lengths, table, implementation="reference")
    as_lists = [x.tolist() for x in (q, k, v, lengths, table)]
    got = op(*as_lists, implementation="reference")
    assert got.dtype == jnp.asarray(as_lists[0]).dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(TypeError, match="lengths must be an integer array"):
        op(q, k, v, [13.0, 20.0], table, implementation="reference")


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="the kernel compiles on TPU")
def test_pallas_without_interpret_fails_at_lowering_off_tpu():
    with pytest.raises(ValueError, match="interpret=True"):
        np.asarray(paged_attention(**inputs(), implementation="pallas"))


@pytest.mark.skipif(not native.available(), reason="no C++ compiler: no native kernel to export")
def test_native_exported_for_tpu_fails_at_lowering():
    fn = jax.jit(lambda *a: paged_attention(*a, implementation="native"))
    with pytest.raises(ValueError, match=r"native.*cpu only"):
        jax.export.export(fn, platforms=["tpu"])(*inputs().values())


def test_native_unavailable_names_the_reason(monkeypatch):
    monkeypatch.setattr(native, "reason", lambda: "no C++ compiler on PATH")
    with pytest.raises(ValueError, match=r"native.*unavailable: no C\+\+ compiler"):
        paged_attention(**inputs(), implementation="native")
