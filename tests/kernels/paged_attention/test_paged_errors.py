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
    "window=2.5": ({}, dict(sliding_window=2.5), ValueError, "sliding_window"),
    "softcap=0": ({}, dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap"),
    "scale=nan": ({}, dict(scale=float("nan")), ValueError, "scale"),
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


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
@pytest.mark.parametrize("field", ["pages_per_block", "xla_pages_per_block"])
def test_block_sizes_validated(field, value):
    with pytest.raises(ValueError, match=field):
        BlockSizes(**{field: value})


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
