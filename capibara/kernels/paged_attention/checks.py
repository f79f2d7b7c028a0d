"""Checks of what the shapes cannot say: the values in ``lengths`` and ``page_table``,
and the types of the static arguments.

The contract (``common`` has the masking rule): ``0 <= lengths[b] <= capacity`` with
``capacity = pages_per_seq * page_size``, and every table entry *in use* names a pool
page, ``0 <= page_table[b, j] < P``. An entry is in use when some query of the call
reads its tokens: column ``j`` with ``first <= j < ceil(lengths[b] / page_size)``,
where ``first`` is 0, or with a sliding window the page of the first key the earliest
query still sees (``common.live_range``). Other entries may hold anything.

Two ways a violation is reported, never silently computed on:

1. Concrete ``lengths`` and ``page_table`` (numpy, lists, ``jax.Array`` outside a
   trace): ``check_concrete`` raises ``ValueError`` on the host before anything runs.
2. Traced values (under ``jit``, ``vmap``, ``scan``): the op routes ``lengths``
   through ``check_p``, a primitive that lowers to nothing (its output is its
   ``lengths`` operand) and so costs nothing, but that ``jax.experimental.checkify``
   knows: under ``checkify.checkify(f)`` (errors ``user_checks``, the default, or
   ``index_checks``) it adds the same check as a functional error, raised by
   ``err.throw()``. A primitive rather than ``checkify.check``: a ``check`` must be
   functionalized (an op calling it would fail under a plain ``jit``), and a
   ``debug_check`` puts an effect in every program that uses the op, which makes jit
   dispatch take the token path (a 4-element jit call: ~30 us -> ~700 us on the
   2-core host), paid by every unchecked serving step.

Unchecked traced calls stay memory-safe whatever the values: the op clips the lengths
into ``[0, capacity]`` and the table into ``[0, P)`` before any implementation reads
them (each implementation clips the table again), so a bad entry reads some page of
the pool, never outside it.

NOTE: the checkify rule uses ``jax._src.checkify`` (``error_checks``, ``assert_func``,
``FailedCheckError``): there is no public way to teach checkify a primitive. jax is
pinned (pyproject.toml); ``test_paged_checks`` fails if these move.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import checkify as _checkify
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from capibara.kernels.paged_attention import common

# -- static arguments ------------------------------------------------------------------


def static_int(name: str, value, *, op: str, allow_none: bool = False) -> int | None:
    """``value`` as a positive Python ``int`` (any ``numbers.Integral`` but bool)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool | np.bool_):
        kind = "a positive int or None" if allow_none else "a positive int"
        raise TypeError(f"{op}: {name} must be {kind}, got {name}={value!r}")
    if value <= 0:
        raise ValueError(f"{op}: {name} must be positive, got {name}={value!r}")
    return int(value)


def static_real(name: str, value, *, op: str) -> float | None:
    """``value`` (a ``numbers.Real`` but bool, or None) as a Python ``float``."""
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool | np.bool_):
        raise TypeError(f"{op}: {name} must be a real number or None, got {name}={value!r}")
    return float(value)


def static_bool(name: str, value, *, op: str) -> bool:
    """``value`` (``bool`` or ``np.bool_``) as a Python ``bool``."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{op}: {name} must be a bool, got {name}={value!r}")
    return bool(value)


# -- the rule, for numpy (host) and jax.numpy (checkify) -------------------------------


def bad_values(lengths, page_table, *, num_pages, page_size, num_queries, sliding_window, xp):
    """``(bad_lengths [..., B], bad_entries [..., B, pages_per_seq])``: the lengths outside
    ``[0, capacity]`` and the in-use table entries outside ``[0, num_pages)``.

    Any leading dimensions (``vmap``) are batch dimensions of both. The entries in use
    are those of the lengths clipped into range (a bad length is reported on its own).
    """
    pages_per_seq = page_table.shape[-1]
    capacity = pages_per_seq * page_size
    bad_lengths = (lengths < 0) | (lengths > capacity)
    lo, hi = common.live_range(xp.clip(lengths, 0, capacity), num_queries, sliding_window, xp=xp)
    page = max(page_size, 1)  # empty pages: capacity 0, every length > 0 is bad already
    first = lo // page
    end = xp.where(hi > lo, -(-hi // page), first)  # nothing in use when empty
    cols = xp.arange(pages_per_seq).reshape((1,) * lengths.ndim + (pages_per_seq,))
    in_use = (cols >= first[..., None]) & (cols < end[..., None])
    bad_entries = in_use & ((page_table < 0) | (page_table >= num_pages))
    return bad_lengths, bad_entries


def _length_message(op, capacity, pages_per_seq, page_size):
    return (
        f"{op}: sequence {{}} has lengths[{{}}] = {{}}, outside [0, {capacity}] (the "
        f"capacity pages_per_seq * page_size = {pages_per_seq} * {page_size}; bad lengths: {{}})"
    )


def _entry_message(op, num_pages, page_size):
    return (
        f"{op}: sequence {{}}, slot {{}}: page_table[{{}}, {{}}] = {{}} is outside the pool's "
        f"pages [0, {num_pages}) and the slot is in use (lengths[{{}}] = {{}}, {page_size} "
        f"tokens a page; bad entries: {{}})"
    )


def check_concrete(
    op, lengths, page_table, *, pages_per_seq, num_pages, page_size, num_queries, sliding_window
):
    """Raises ``ValueError`` naming the first bad length, then the first bad in-use
    table entry; ``page_table=None`` (traced) checks the lengths only."""
    lengths = np.asarray(lengths)
    table = np.zeros((*lengths.shape, pages_per_seq), np.int64)
    if page_table is not None:
        table = np.asarray(page_table)
    bad_lengths, bad_entries = bad_values(
        lengths,
        table,
        num_pages=num_pages,
        page_size=page_size,
        num_queries=num_queries,
        sliding_window=sliding_window,
        xp=np,
    )
    if bad_lengths.any():
        b = int(np.flatnonzero(bad_lengths)[0])
        message = _length_message(op, pages_per_seq * page_size, pages_per_seq, page_size)
        raise ValueError(message.format(b, b, lengths[b], int(bad_lengths.sum())))
    if page_table is None:
        return
    if bad_entries.any():
        b, j = (int(i) for i in np.argwhere(bad_entries)[0])
        message = _entry_message(op, num_pages, page_size)
        raise ValueError(
            message.format(b, j, b, j, table[b, j], b, lengths[b], int(bad_entries.sum()))
        )


# -- traced values: a free primitive that checkify checks ------------------------------

check_p = Primitive("capibara_paged_attention_check")


def checked_lengths(op, lengths, page_table, *, num_pages, page_size, num_queries, sliding_window):
    """``lengths``, through ``check_p``: checked under ``checkify``, free otherwise."""
    return check_p.bind(
        lengths,
        page_table,
        op=op,
        num_pages=num_pages,
        page_size=page_size,
        num_queries=num_queries,
        sliding_window=sliding_window,
    )


check_p.def_impl(lambda lengths, page_table, **params: lengths)
# The operand's own aval (sharding and shard_map's varying axes included).
check_p.def_abstract_eval(lambda lengths, page_table, **params: lengths)
mlir.register_lowering(check_p, lambda ctx, lengths, page_table, **params: [lengths])


def _check_jvp(primals, tangents, **params):
    out = check_p.bind(*primals, **params)
    return out, ad.Zero(jax.typeof(out).to_tangent_aval())


ad.primitive_jvps[check_p] = _check_jvp


def _check_batch(args, dims, **params):
    """Leading batch dimensions on both operands; the output keeps ``lengths``'s."""
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    lengths, table = (batching.bdim_at_front(a, d, size) for a, d in zip(args, dims, strict=True))
    out = check_p.bind(lengths, table, **params)
    if dims[0] is None:  # unbatched lengths stay unbatched
        return out[0], None
    return out, 0


batching.primitive_batchers[check_p] = _check_batch


def _checkify_rule(error, enabled_errors, lengths, page_table, *, op, **params):
    """Adds a failed check (the first bad length, then the first bad entry) to ``error``."""
    wanted = {_checkify.FailedCheckError, _checkify.OOBError}
    if not wanted & set(enabled_errors):
        return error, lengths
    bad_lengths, bad_entries = bad_values(lengths, page_table, xp=jnp, **params)
    batch, pages_per_seq = page_table.shape[-2:]
    page_size = params["page_size"]
    traceback = _checkify.get_traceback()
    if bad_lengths.size == 0:  # no sequence: nothing to report
        return error, lengths

    i = jnp.argmax(bad_lengths.reshape(-1)).astype(jnp.int32)
    b = i % batch
    length = lengths.reshape(-1)[i].astype(jnp.int32)
    count = bad_lengths.sum(dtype=jnp.int32)
    message = _length_message(op, pages_per_seq * page_size, pages_per_seq, page_size)
    failure = _checkify.FailedCheckError(traceback, message, b, b, length, count)
    error = _checkify.assert_func(error, jnp.any(bad_lengths), failure)
    if bad_entries.size == 0:  # no slot
        return error, lengths

    i = jnp.argmax(bad_entries.reshape(-1)).astype(jnp.int32)
    b, j = i // pages_per_seq % batch, i % pages_per_seq
    entry = page_table.reshape(-1)[i]
    length = lengths.reshape(-1)[i // pages_per_seq].astype(jnp.int32)
    count = bad_entries.sum(dtype=jnp.int32)
    message = _entry_message(op, params["num_pages"], page_size)
    failure = _checkify.FailedCheckError(traceback, message, b, j, b, j, entry, b, length, count)
    error = _checkify.assert_func(error, jnp.any(bad_entries), failure)
    return error, lengths


_checkify.error_checks[check_p] = _checkify_rule
