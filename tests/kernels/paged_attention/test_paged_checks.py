"""Values the shapes cannot check: out-of-range lengths and in-use page-table entries.

Concrete inputs raise ``ValueError`` before anything runs; traced ones are checked
under ``jax.experimental.checkify`` and otherwise clipped, never read out of bounds
(the Pallas TPU interpreter raises on an out-of-bounds read). Every implementation,
both entry points.
"""

from __future__ import annotations

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from paged_inputs import make_cache

from capibara.kernels import native_build, paged_attention, paged_prefill_attention
from capibara.kernels.paged_attention import BlockSizes, checks
from capibara.kernels.testing import assert_close

NATIVE_EXPECTED = jax.default_backend() == "cpu" and any(map(shutil.which, native_build.COMPILERS))
IMPLS = {
    "reference": dict(implementation="reference"),
    "xla": dict(implementation="xla"),
    "pallas-interpret": dict(implementation="pallas", interpret=True),
}
if NATIVE_EXPECTED:
    IMPLS["native"] = dict(implementation="native")
BLOCKS = BlockSizes(pages_per_block=2, xla_pages_per_block=2)

# Three sequences, 8-token pages, 6 table slots (capacity 48): slots in use are
# [0, 2) for 13 tokens, [0, 1) for 1, [0, 6) for 48.
PAGE, SLOTS, LENGTHS = 8, 6, [13, 1, 48]


def cache(num_queries=1, seed=0):
    """``(q, k_pages, v_pages, lengths, table)``; unused slots hold garbage already."""
    q, k, v, lengths, table = make_cache(
        np.random.default_rng(seed),
        lengths=LENGTHS,
        num_queries=num_queries,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=32,
        page_size=PAGE,
        pages_per_seq=SLOTS,
        dtype=np.float32,
    )
    return q, k, v, lengths, table


def entry(num_queries):
    """The entry point for ``num_queries`` (decode takes ``q [B, Hq, D]``)."""
    if num_queries == 1:
        return lambda q, *a, **kw: paged_attention(q[:, 0], *a, **kw)[:, None]
    return paged_prefill_attention


def with_entry(table, b, j, value):
    table = table.copy()
    table[b, j] = value
    return table


ENTRIES = {"decode": 1, "prefill": 3}
BAD_ENTRIES = {
    "past-the-pool": (2, 3, 100),
    "minus-one": (0, 1, -1),
    "exactly-P": (2, 5, "P"),
}


# -- concrete inputs: ValueError before anything runs ----------------------------------


@pytest.mark.parametrize("bad", BAD_ENTRIES)
@pytest.mark.parametrize("entry_name", ENTRIES)
@pytest.mark.parametrize("impl", IMPLS)
def test_concrete_bad_entry_raises(impl, entry_name, bad):
    q, k, v, lengths, table = cache(ENTRIES[entry_name])
    b, j, value = BAD_ENTRIES[bad]
    value = k.shape[1] if value == "P" else value
    table = with_entry(table, b, j, value)
    match = rf"sequence {b}, slot {j}: page_table\[{b}, {j}\] = {value} is outside"
    with pytest.raises(ValueError, match=match):
        entry(ENTRIES[entry_name])(q, k, v, lengths, table, **IMPLS[impl])


@pytest.mark.parametrize("length", [49, 1000, -1])
@pytest.mark.parametrize("entry_name", ENTRIES)
def test_concrete_bad_length_raises(entry_name, length):
    q, k, v, lengths, table = cache(ENTRIES[entry_name])
    lengths = lengths.copy()
    lengths[1] = length
    match = rf"sequence 1 has lengths\[1\] = {length}, outside \[0, 48\] .*6 \* 8"
    with pytest.raises(ValueError, match=match):
        entry(ENTRIES[entry_name])(q, k, v, lengths, table, implementation="xla")


def test_device_arrays_and_lists_are_checked_too():
    q, k, v, lengths, table = cache()
    table = with_entry(table, 2, 3, 100)
    for as_input in (jnp.asarray, lambda x: x.tolist()):
        with pytest.raises(ValueError, match=r"page_table\[2, 3\] = 100"):
            paged_attention(q[:, 0], k, v, as_input(lengths), as_input(table))


def test_int64_entries_are_checked_before_the_int32_cast():
    # 2**32 + p wraps to p in int32: checked on the host's int64 values.
    q, k, v, lengths, table = cache()
    value = 2**32 + int(table[0, 0])
    table = with_entry(table.astype(np.int64), 0, 0, value)
    with pytest.raises(ValueError, match=rf"page_table\[0, 0\] = {value} is outside"):
        paged_attention(q[:, 0], k, v, lengths, table, implementation="xla")


@pytest.mark.parametrize("entry_name", ENTRIES)
def test_only_slots_in_use_count(entry_name):
    # Slot ceil(length / page) is the first unused one: garbage there is fine, and the
    # result is the one with a valid page there (unused slots are never read).
    s = ENTRIES[entry_name]
    q, k, v, lengths, table = cache(s)
    garbage = with_entry(with_entry(table, 0, 2, 10**6), 1, 1, -5)  # 13 -> 2 slots, 1 -> 1
    run = functools.partial(entry(s), implementation="xla")
    assert_close(run(q, k, v, lengths, garbage), run(q, k, v, lengths, table), jnp.float32)
    one_more = lengths.copy()
    one_more[0] = 17  # now slot 2 is in use
    with pytest.raises(ValueError, match=r"sequence 0, slot 2: page_table\[0, 2\] = 1000000"):
        run(q, k, v, one_more, garbage)


def test_slots_before_the_window_are_not_in_use():
    # Decode at position 47 with window 10 sees keys 38..47: slots 4 and 5 only.
    q, k, v, lengths, table = cache()
    evicted = table.copy()
    evicted[2, :4] = -1
    run = functools.partial(paged_attention, sliding_window=10, implementation="xla")
    assert_close(
        run(q[:, 0], k, v, lengths, evicted), run(q[:, 0], k, v, lengths, table), jnp.float32
    )
    with pytest.raises(ValueError, match=r"sequence 2, slot 4"):
        run(q[:, 0], k, v, lengths, with_entry(evicted, 2, 4, -1))


# -- traced inputs: free unless checkified, clipped, never out of bounds ---------------


@pytest.mark.parametrize("entry_name", ENTRIES)
@pytest.mark.parametrize("impl", IMPLS)
def test_traced_bad_values_are_clipped_the_same_everywhere(impl, entry_name):
    # Unchecked, a bad entry reads the page it is clipped to, a length past the table
    # counts as the capacity: every implementation agrees with the reference fed the
    # clipped values concretely (the xla path used to differ by 0.017 here).
    s = ENTRIES[entry_name]
    q, k, v, lengths, table = cache(s)
    num_pages = k.shape[1]
    bad_table = with_entry(with_entry(table, 2, 3, 100), 0, 1, -1)
    bad_lengths = lengths.copy()
    bad_lengths[2] = 60  # past the capacity, 48 = lengths[2]
    run = jax.jit(functools.partial(entry(s), block_sizes=BLOCKS, **IMPLS[impl]))
    out = jax.block_until_ready(run(q, k, v, bad_lengths, bad_table))
    clipped_table = with_entry(with_entry(table, 2, 3, num_pages - 1), 0, 1, 0)
    expected = entry(s)(q, k, v, lengths, clipped_table, implementation="reference")
    assert np.isfinite(np.asarray(out)).all()
    assert_close(out, expected, jnp.float32)


def checked(s, **kw):
    return jax.jit(checkify.checkify(functools.partial(entry(s), block_sizes=BLOCKS, **kw)))


@pytest.mark.parametrize("entry_name", ENTRIES)
@pytest.mark.parametrize("impl", IMPLS)
def test_checkify_catches_bad_entries_and_lengths(impl, entry_name):
    s = ENTRIES[entry_name]
    q, k, v, lengths, table = cache(s)
    run = checked(s, **IMPLS[impl])
    err, out = run(q, k, v, lengths, table)
    assert err.get() is None
    assert_close(out, entry(s)(q, k, v, lengths, table, implementation="reference"), jnp.float32)
    err, _ = run(q, k, v, lengths, with_entry(table, 2, 3, 100))
    assert "sequence 2, slot 3: page_table[2, 3] = 100 is outside" in err.get()
    with pytest.raises(checkify.JaxRuntimeError, match=r"page_table\[2, 3\] = 100"):
        err.throw()
    err, _ = run(q, k, v, np.array([13, 49, 48], np.int32), table)
    assert "sequence 1 has lengths[1] = 49, outside [0, 48]" in err.get()


def test_checkify_reports_the_first_bad_value_and_the_count():
    q, k, v, lengths, table = cache()
    bad = with_entry(with_entry(table, 2, 3, 100), 0, 1, -3)
    err, _ = checked(1, implementation="reference")(q, k, v, lengths, bad)
    assert "sequence 0, slot 1: page_table[0, 1] = -3" in err.get()
    assert "bad entries: 2" in err.get()
    # a bad length is reported before a bad entry
    err, _ = checked(1, implementation="reference")(q, k, v, np.array([13, 1, -2]), bad)
    assert "sequence 2 has lengths[2] = -2" in err.get()


@pytest.mark.parametrize(
    "errors,caught",
    [
        (checkify.user_checks, True),
        (checkify.index_checks, True),
        (checkify.all_checks, True),
        (checkify.nan_checks, False),
    ],
    ids=["user", "index", "all", "nan-only"],
)
def test_checkify_error_sets(errors, caught):
    q, k, v, lengths, table = cache()
    fn = functools.partial(paged_attention, implementation="native" if NATIVE_EXPECTED else "xla")
    err, _ = jax.jit(checkify.checkify(fn, errors=errors))(
        q[:, 0], k, v, lengths, with_entry(table, 2, 3, 100)
    )
    assert (err.get() is not None) == caught, err.get()


def test_checkify_inside_scan_and_of_a_function_jitted_before():
    q, k, v, lengths, table = cache()
    bad = with_entry(table, 2, 3, 100)

    def two_layers(q, lengths, table):
        def layer(x, _):
            return paged_attention(x, k, v, lengths, table, implementation="xla"), None

        return jax.lax.scan(layer, q, None, length=2)[0]

    step = jax.jit(two_layers)
    step(q[:, 0], lengths, table)  # traced and cached unchecked first
    err, _ = checkify.checkify(step)(q[:, 0], lengths, bad)
    assert "page_table[2, 3] = 100" in err.get()
    err, _ = checkify.checkify(step)(q[:, 0], lengths, table)
    assert err.get() is None


def test_checkify_with_vmap():
    # checkify of vmap (reference: checkify cannot take the xla path's batched while
    # loop) and vmap of checkify (a jax bug with batched while bounds: no xla either).
    q, k, v, lengths, table = cache()
    qs = np.stack([q[:, 0], q[:, 0]])
    ls = np.stack([lengths, np.array([13, 9, 48], np.int32)])  # 9 tokens: slot 1 in use
    fn = functools.partial(paged_attention, implementation="reference")
    err, _ = jax.jit(checkify.checkify(jax.vmap(fn, in_axes=(0, None, None, 0, None))))(
        qs, k, v, ls, table
    )
    assert f"sequence 1, slot 1: page_table[1, 1] = {table[1, 1]}" in err.get()
    err, _ = jax.jit(jax.vmap(checkify.checkify(fn), in_axes=(0, None, None, 0, None)))(
        qs, k, v, ls, table
    )
    assert "at mapped index 1" in err.get() and "slot 1" in err.get()


def test_unchecked_programs_carry_no_effect_and_no_check():
    # Without checkify the check is free: no effect (that would send every jit call
    # down the token path) and nothing left in the compiled program.
    q, k, v, lengths, table = cache()
    fn = jax.jit(functools.partial(paged_attention, implementation="xla"))
    args = (q[:, 0], k, v, lengths, table)
    assert jax.make_jaxpr(fn)(*args).effects == set()
    assert checks.check_p.name in str(jax.make_jaxpr(fn)(*args))
    hlo = fn.lower(*args).as_text()
    assert "callback" not in hlo and "check" not in hlo


def test_vmap_without_checkify_matches_per_item_calls():
    q, k, v, lengths, table = cache()
    fn = functools.partial(paged_attention, implementation="xla")
    ls = np.stack([lengths, np.array([5, 0, 40], np.int32)])
    out = jax.vmap(fn, in_axes=(None, None, None, 0, None))(q[:, 0], k, v, ls, table)
    for i in range(2):
        assert_close(out[i], fn(q[:, 0], k, v, ls[i], table), jnp.float32)
    # unbatched lengths with a batched table (the check's batching keeps lengths whole)
    tables = np.stack([table, table[[0, 1, 2]]])
    out = jax.vmap(fn, in_axes=(None, None, None, None, 0))(q[:, 0], k, v, lengths, tables)
    assert_close(out[1], fn(q[:, 0], k, v, lengths, table), jnp.float32)


def test_grad_through_the_reference_ignores_the_check():
    q, k, v, lengths, table = cache()

    def loss(q, k, lengths, table):  # lengths and table traced: the check is in the program
        return paged_attention(q, k, v, lengths, table, implementation="reference").sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(q[:, 0], k, lengths, table)
    assert np.isfinite(np.asarray(grads[0])).all()
    live = np.asarray(grads[1])[:, table[2, :6]]  # sequence 2 reads all its pages
    assert np.isfinite(live).all() and np.abs(live).max() > 0


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "pallas-interpret"])
def test_an_empty_batch_checks_and_runs(impl):
    # B = 0: nothing to check (no argmax over nothing) and nothing to attend.
    k = np.zeros((2, 4, PAGE, 32), np.float32)
    q, lengths, table = np.zeros((0, 4, 32), np.float32), np.zeros(0, np.int32), np.zeros((0, 3))
    fn = functools.partial(paged_attention, **IMPLS[impl])
    err, out = jax.jit(checkify.checkify(fn))(q, k, k, lengths, table.astype(np.int32))
    assert err.get() is None and out.shape == (0, 4, 32)
    assert fn(q, k, k, lengths, table.astype(np.int32)).shape == (0, 4, 32)
