"""paged_attention / paged_prefill_attention: every implementation against the reference.

The reference itself is checked against a float64 loop over the masking rule. Caches
come from ``paged_inputs.make_cache``: unwritten pool slots are NaN and unused table
entries garbage, so reading either shows up as NaN or an out-of-bounds index. The
Pallas kernel runs in the TPU interpreter (slow): each shape once per dtype, each
flag combination on two shapes, with small blocks so that sequences span several.
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
from paged_inputs import contiguous_cache, make_cache

from capibara.kernels import native_build, paged_attention, paged_prefill_attention
from capibara.kernels.paged_attention import BlockSizes, native, pallas_tpu
from capibara.kernels.testing import assert_close

NATIVE_EXPECTED = jax.default_backend() == "cpu" and any(map(shutil.which, native_build.COMPILERS))

# Two pages per Pallas step, three per XLA step: several blocks per sequence.
BLOCKS = BlockSizes(pages_per_block=2, xla_pages_per_block=3)

IMPLS = {
    "xla": dict(implementation="xla"),
    "pallas-interpret": dict(implementation="pallas", interpret=True),
}
if NATIVE_EXPECTED:
    IMPLS["native"] = dict(implementation="native")

# name -> (S, Hq, Hkv, D, page_size, pages_per_seq, lengths). S = 1 runs the decode
# entry point; lengths include 0, 1, page multiples, full tables and S > length.
SHAPES = {
    "decode-h=2/2-d=64-p=8": (1, 2, 2, 64, 8, 6, [13, 1, 48]),
    "decode-h=4/2-d=80-p=16": (1, 4, 2, 80, 16, 4, [0, 33, 16, 7]),
    "decode-h=8/1-d=128-p=8": (1, 8, 1, 128, 8, 5, [40, 5]),
    "chunk=3-h=4/2-d=64-p=8": (3, 4, 2, 64, 8, 5, [2, 21, 40]),
    "chunk=5-h=8/8-d=64-p=8": (5, 8, 8, 64, 8, 3, [17, 24]),
}
# The native kernel's tiling: 16 queries and 64 keys per step, D in vectors of 16 (a
# scalar path for other D). Not run in the slow interpreter: its blocks are above.
TILING_SHAPES = {
    "decode-h=6/2-d=24-p=8-keys=95": (1, 6, 2, 24, 8, 12, [0, 95, 33, 7]),
    "chunk=20-h=4/1-d=32-p=16-keys=127": (20, 4, 1, 32, 16, 8, [20, 100, 127, 5]),
    "chunk=17-h=2/2-d=128-p=16-keys=70": (17, 2, 2, 128, 16, 5, [70, 17]),
}
SHAPES_ALL = {**SHAPES, **TILING_SHAPES}

# name -> (sliding_window, logits_soft_cap)
FLAGS = {
    "window=6": (6, None),
    "softcap=2": (None, 2.0),
    "window=11-softcap=5": (11, 5.0),
}

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def problem(shape_name, dtype, seed=0, **kw):
    s, hq, hkv, d, page_size, pages_per_seq, lengths = SHAPES_ALL[shape_name]
    return make_cache(
        np.random.default_rng(seed),
        lengths=lengths,
        num_queries=s,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        dtype=dtype,
        **kw,
    )


def ready(x):
    # Wait for every interpret-mode kernel before dispatching anything else: jax
    # 0.10.2's TPU interpreter runs jnp arithmetic inside an io_callback at its final
    # barrier (SharedMemory.update_clocks_for_device_barrier), which can deadlock
    # against ops dispatched meanwhile from the main thread on a 2-core host.
    return jax.block_until_ready(x)


def call(q, *cache, **kw):
    """Decode entry point for S = 1, the chunk entry point otherwise; -> [B, S, Hq, D]."""
    if q.shape[1] == 1:
        return ready(paged_attention(q[:, 0], *cache, **kw)[:, None])
    return ready(paged_prefill_attention(q, *cache, **kw))


def flag_kwargs(flags):
    """``(sliding_window, logits_soft_cap)`` as keyword arguments of ``check``."""
    return dict(zip(("sliding_window", "logits_soft_cap"), flags, strict=True))


def check(shape_name, dtype, impl_kw, *, sliding_window=None, logits_soft_cap=None, **kw):
    q, *cache = problem(shape_name, dtype, **kw)
    flags = dict(sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
    run = jax.jit(functools.partial(call, block_sizes=BLOCKS, **flags, **impl_kw))
    out = ready(run(q, *cache))
    expected = call(q, *cache, implementation="reference", **flags)
    assert out.shape == q.shape
    assert out.dtype == dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert_close(out, expected, dtype)
    return out, expected


# -- the oracle ------------------------------------------------------------------------


def loop_attention(q, k, v, lengths, *, scale, sliding_window, logits_soft_cap):
    """float64 loops over the masking rule of ``capibara.kernels.paged_attention.common``."""
    b, s, hq, _ = q.shape
    g = hq // k.shape[2]
    out = np.zeros(q.shape, np.float64)
    for bi in range(b):
        for j in range(s):
            pos = lengths[bi] - s + j
            lo = 0 if sliding_window is None else pos - sliding_window + 1
            keys = [t for t in range(max(lo, 0), min(pos + 1, lengths[bi]))]
            if not keys:
                continue
            for h in range(hq):
                kk = k[bi, keys, h // g].astype(np.float64)
                logits = kk @ q[bi, j, h].astype(np.float64) * scale
                if logits_soft_cap is not None:
                    logits = logits_soft_cap * np.tanh(logits / logits_soft_cap)
                p = np.exp(logits - logits.max())
                out[bi, j, h] = p @ v[bi, keys, h // g].astype(np.float64) / p.sum()
    return out


@pytest.mark.parametrize("flags", [(None, None), *FLAGS.values()], ids=["plain", *FLAGS])
@pytest.mark.parametrize("shape_name", ["decode-h=4/2-d=80-p=16", "chunk=3-h=4/2-d=64-p=8"])
def test_reference_matches_loops(shape_name, flags):
    sliding_window, logits_soft_cap = flags
    q, k_pages, v_pages, lengths, table = problem(shape_name, np.float32)
    k, v = contiguous_cache(k_pages, v_pages, lengths, table)
    flags = dict(sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
    out = call(q, k_pages, v_pages, lengths, table, implementation="reference", **flags)
    expected = loop_attention(q, k, v, lengths, scale=q.shape[-1] ** -0.5, **flags)
    assert_close(out, expected, jnp.float32)


# -- implementations against the reference ---------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(impl, shape_name, dtype):
    check(shape_name, dtype, IMPLS[impl])


@pytest.mark.parametrize(
    "flags", [(None, None), (9, None), (None, 3.0)], ids=["plain", "window=9", "softcap=3"]
)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("shape_name", TILING_SHAPES)
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "pallas-interpret"])
def test_many_tiles_match_reference(impl, shape_name, dtype, flags):
    check(shape_name, dtype, IMPLS[impl], **flag_kwargs(flags))


def _flag_cases():
    # The interpreter is slow: bf16 Pallas runs only the combined flags.
    for impl in IMPLS:
        for shape_name in ["decode-h=2/2-d=64-p=8", "chunk=3-h=4/2-d=64-p=8"]:
            for flags in FLAGS:
                for dtype_name, dtype in DTYPES.items():
                    fast = impl in ("xla", "native")
                    if fast or dtype_name == "f32" or flags == "window=11-softcap=5":
                        case_id = f"{impl}-{shape_name}-{flags}-{dtype_name}"
                        yield pytest.param(impl, shape_name, flags, dtype, id=case_id)


@pytest.mark.parametrize("impl,shape_name,flags,dtype", list(_flag_cases()))
def test_flags_match_reference(impl, shape_name, flags, dtype):
    check(shape_name, dtype, IMPLS[impl], **flag_kwargs(FLAGS[flags]))


def test_auto_implementation_matches_reference():
    check("chunk=3-h=4/2-d=64-p=8", jnp.float32, {}, sliding_window=6)


# -- the native kernel: where it builds, what runs it ------------------------------------


def test_native_builds_where_expected():
    assert native.available() == NATIVE_EXPECTED, native.reason()


def _hlo(dtype, **kw):
    q, *cache = problem("decode-h=4/2-d=80-p=16", dtype)
    fn = jax.jit(functools.partial(paged_attention, **kw))
    return fn.lower(q[:, 0], *cache).as_text()


@pytest.mark.skipif(not NATIVE_EXPECTED, reason="no C++ compiler: the xla path runs on CPU")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_default_runs_the_native_kernel_on_cpu(dtype):
    assert native.TARGET in _hlo(dtype)
    assert native.TARGET not in _hlo(dtype, implementation="xla")


def test_default_runs_xla_for_dtypes_the_native_kernel_lacks():
    assert native.TARGET not in _hlo(jnp.float16)
    check("decode-h=4/2-d=80-p=16", jnp.float16, {})


@pytest.mark.skipif(not NATIVE_EXPECTED, reason="no C++ compiler: the xla path runs on CPU")
def test_native_under_vmap_matches_per_item_calls():
    q, k_pages, v_pages, lengths, table = problem("chunk=3-h=4/2-d=64-p=8", jnp.float32)
    run = functools.partial(paged_prefill_attention, implementation="native")
    stacked = jax.vmap(run, in_axes=(0, None, None, 0, None))(
        jnp.stack([q, q[::-1]]), k_pages, v_pages, jnp.stack([lengths, lengths - 1]), table
    )
    assert_close(stacked[0], run(q, k_pages, v_pages, lengths, table), jnp.float32)
    assert_close(stacked[1], run(q[::-1], k_pages, v_pages, lengths - 1, table), jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_evicted_pages_before_the_window_are_never_used(impl):
    # Pages wholly before every query's window are "freed": NaN pool, garbage table.
    s, window = 3, 7
    lengths = np.array(SHAPES["chunk=3-h=4/2-d=64-p=8"][-1])
    evicted = np.maximum(lengths - s - window + 1, 0)
    out, _ = check(
        "chunk=3-h=4/2-d=64-p=8",
        jnp.float32,
        IMPLS[impl],
        sliding_window=window,
        evicted_before=evicted,
    )
    assert np.abs(np.asarray(out[2])).max() > 0  # the long sequence did attend


@pytest.mark.parametrize("pages_per_block", [1, 3, 100], ids=lambda n: f"ppb={n}")
@pytest.mark.parametrize("impl", IMPLS)
def test_block_sizes_that_do_not_divide_the_table(impl, pages_per_block):
    q, *cache = problem("decode-h=2/2-d=64-p=8", jnp.float32)
    blocks = BlockSizes(pages_per_block=pages_per_block, xla_pages_per_block=pages_per_block)
    out = ready(paged_attention(q[:, 0], *cache, block_sizes=blocks, **IMPLS[impl]))
    assert_close(out, paged_attention(q[:, 0], *cache, implementation="reference"), jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_sequences_give_zeros(impl):
    q, k_pages, v_pages, _, table = problem("decode-h=4/2-d=80-p=16", jnp.float32)
    lengths = np.zeros(len(table), np.int32)
    out = ready(paged_attention(q[:, 0], k_pages, v_pages, lengths, table, **IMPLS[impl]))
    np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_chunk_equals_one_decode_step_per_query(impl):
    # Query j of a chunk is the decode step of a sequence that ends at it: a peer
    # identity between the two entry points, independent of the reference.
    q, k_pages, v_pages, lengths, table = problem("chunk=3-h=4/2-d=64-p=8", jnp.float32)
    s = q.shape[1]
    kw = dict(sliding_window=6, logits_soft_cap=5.0, block_sizes=BLOCKS, **IMPLS[impl])
    chunk = ready(paged_prefill_attention(q, k_pages, v_pages, lengths, table, **kw))
    for j in range(s):
        steps = np.maximum(lengths - s + 1 + j, 0).astype(np.int32)
        decode = ready(paged_attention(q[:, j], k_pages, v_pages, steps, table, **kw))
        assert_close(chunk[:, j], decode, jnp.float32, err_msg=f"query {j}")


# -- the Pallas page schedule ------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 5, 20], ids=lambda w: f"window={w}")
@pytest.mark.parametrize("pages_per_block", [1, 3, 4])
def test_pallas_fetches_only_live_pages_once(pages_per_block, window):
    # Replays the Pallas pipeline's rule: a slot issues a DMA when its block index
    # differs from the previous grid step's (including across sequences).
    page_size, pages_per_seq, num_queries = 4, 10, 2
    static = dict(
        pages_per_block=pages_per_block,
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        num_queries=num_queries,
        sliding_window=window,
    )
    num_blocks = -(-pages_per_seq // pages_per_block)
    steps = jnp.arange(num_blocks)[:, None]
    slots = jnp.arange(pages_per_block)[None, :]
    schedule = jax.jit(jax.vmap(lambda n: pallas_tpu.logical_page(steps, slots, n, **static)))
    lengths = np.arange(pages_per_seq * page_size + 1)
    pages = np.asarray(schedule(jnp.asarray(lengths, jnp.int32)))  # [len, block, slot]
    for n, held in zip(lengths, pages, strict=True):
        lo = 0 if window is None else max(n - num_queries - window + 1, 0)
        live = set(range(lo // page_size, -(-n // page_size))) or {0}
        assert set(held.ravel()) <= live, (n, held)
        fetches = 1 + (held[1:] != held[:-1]).sum(axis=0)  # per slot
        # Each live page is fetched once; only sequences shorter than a block
        # fetch (their last page) into the spare slots as well.
        assert fetches.sum() == max(len(live), pages_per_block), (n, held)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "pallas-interpret"])
def test_bf16_pools_as_uint16_bits_give_the_same_output(impl):
    q, k_pages, v_pages, lengths, table = problem("chunk=3-h=4/2-d=64-p=8", jnp.bfloat16)
    run = jax.jit(functools.partial(paged_prefill_attention, **IMPLS[impl]))
    bits = [jax.lax.bitcast_convert_type(p, jnp.uint16) for p in (k_pages, v_pages)]
    np.testing.assert_array_equal(
        np.asarray(run(q, *bits, lengths, table), np.float32),
        np.asarray(run(q, k_pages, v_pages, lengths, table), np.float32),
    )
