"""Paged attention: query tokens attending to a KV cache stored in fixed-size pages.

    out = capibara.kernels.paged_attention(q, k_pages, v_pages, lengths, page_table)
    # q [B, Hq, D]: one new token per sequence (decode) -> [B, Hq, D]

    out = capibara.kernels.paged_prefill_attention(q, k_pages, v_pages, lengths, page_table)
    # q [B, S, Hq, D]: the last S tokens of each sequence (chunked prefill, speculative
    # verification), causal within the chunk -> [B, S, Hq, D]

The cache: ``k_pages``/``v_pages [Hkv, P, page_size, D]`` are page pools shared by all
sequences; ``page_table[b, j]`` is the pool page holding tokens
``j*page_size .. (j+1)*page_size - 1`` of sequence ``b``; ``lengths[b]`` counts its
cached tokens, *including* the ones being queried (write them to the cache first).
Query ``j`` of a chunk of ``S`` sits at position ``lengths[b] - S + j``. Table entries
at or past ``ceil(lengths[b] / page_size)`` (and, with a sliding window, before the
window) are never used: they may hold anything, including out-of-range values.
A sequence with fewer than ``S`` new tokens can be left-padded: a query slot at a
negative position sees nothing and returns zeros, as does ``lengths[b] == 0``.

GQA/MQA: ``Hq`` is a multiple of ``Hkv``; query head ``h`` reads kv head
``h // (Hq // Hkv)`` (as ``jax.nn.dot_product_attention``), without repeating k/v.

Implementations (``implementation=``):
  * ``"reference"``: gather every page into a dense ``[B, Hkv, T, D]`` cache, then dense
    masked attention in f32 at ``Precision.HIGHEST``; the oracle.
  * ``"xla"``: one pass over the page table a few pages at a time with an online
    softmax (no dense copy of the cache); loops only over blocks some sequence needs.
    The GPU default, and CPU's where the native kernel is not built.
  * ``"native"``: a C++ kernel for XLA:CPU (``paged_attention.cc``, XLA FFI custom
    call): one call per layer, each task one (sequence, kv head, query tile) reading
    only the keys its queries see, online softmax in f32. f32 and bf16; compiled on
    first use with the local C++ compiler (``capibara.kernels.native_build``; without one
    ``native.reason()`` says why and CPU runs ``"xla"``). The CPU default. Not a
    Pallas kernel (Pallas does not target CPUs).
  * ``"pallas"``: Mosaic TPU kernel, page table and lengths by scalar prefetch, pages
    outside a sequence's range never fetched. The TPU default; ``interpret=True`` runs
    it in the Pallas TPU interpreter anywhere. Checked on CPU in interpret mode and by
    TPU lowering (``lowering_cases``); not yet run on TPU hardware.

Not differentiable through ``"xla"``/``"pallas"`` (an inference op; the loop bounds
depend on ``lengths``).

Checked values (``checks``): a length outside ``[0, pages_per_seq * page_size]`` or a
table entry in use outside ``[0, P)`` raises ``ValueError`` (sequence, slot, value)
when ``lengths`` and ``page_table`` are concrete; traced, the same check runs under
``jax.experimental.checkify`` and is free otherwise::

    from jax.experimental import checkify
    err, out = jax.jit(checkify.checkify(step))(params, batch)  # step calls the ops
    err.throw()

Unchecked, such values are clipped into range: never a read outside the pools.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from capibara.kernels import _mesh, _platform
from capibara.kernels.bit_views import from_bits
from capibara.kernels.paged_attention import checks, native, pallas_tpu, reference, xla
from capibara.kernels.paged_attention.common import bytes_accessed, flops

__all__ = [
    "BlockSizes",
    "bytes_accessed",
    "flops",
    "paged_attention",
    "paged_prefill_attention",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Pages processed per step; both are clamped to ``pages_per_seq``.

    Attributes:
      pages_per_block: pages per grid step of the Pallas kernel (one DMA each; more
        pages per step amortize the step overhead and feed the MXU larger tiles).
      xla_pages_per_block: pages gathered per loop step of the ``"xla"`` path (small,
        so a step's ``[Hkv, B, tokens, D]`` gather stays in cache).

    Any ``numbers.Integral`` (``np.int64(4)``) is taken and stored as an ``int``; a
    non-integer (``1.5``, ``True``) raises ``TypeError``, a non-positive ``ValueError``.
    """

    pages_per_block: int = 8
    xla_pages_per_block: int = 4

    def __post_init__(self):
        for name in ("pages_per_block", "xla_pages_per_block"):
            value = checks.static_int(name, getattr(self, name), op="BlockSizes")
            object.__setattr__(self, name, value)

    @classmethod
    def get_default(cls) -> BlockSizes:
        return cls()


def _validate(op, q, k_pages, v_pages, lengths, page_table):
    """Shapes and dtypes (the values are ``checks``'s)."""
    for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{op}: {name} must be floating point, got {name}.dtype={x.dtype}")
    if not q.dtype == k_pages.dtype == v_pages.dtype:
        raise TypeError(
            f"{op}: q, k_pages and v_pages must share a dtype, got "
            f"{q.dtype=}, {k_pages.dtype=}, {v_pages.dtype=}"
        )
    for name, x in (("lengths", lengths), ("page_table", page_table)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{op}: {name} must be an integer array, got {name}.dtype={x.dtype}")
    if k_pages.ndim != 4:
        raise ValueError(
            f"{op}: k_pages must be [Hkv, P, page_size, D], got k_pages.shape={k_pages.shape}"
        )
    if v_pages.shape != k_pages.shape:
        raise ValueError(
            f"{op}: k_pages and v_pages must have the same shape, got "
            f"{k_pages.shape=}, {v_pages.shape=}"
        )
    batch, _, num_q_heads, head_dim = q.shape
    num_kv_heads, _, _, kv_head_dim = k_pages.shape
    if head_dim != kv_head_dim:
        raise ValueError(
            f"{op}: q and k_pages must share head_dim, got {q.shape=}, {k_pages.shape=}"
        )
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"{op}: the number of query heads must be a multiple of the kv heads, got "
            f"{num_q_heads=}, {num_kv_heads=}"
        )
    if lengths.shape != (batch,):
        raise ValueError(f"{op}: lengths must be [B]={batch}, got lengths.shape={lengths.shape}")
    if page_table.ndim != 2 or page_table.shape[0] != batch:
        raise ValueError(
            f"{op}: page_table must be [B={batch}, pages_per_seq], got {page_table.shape=}"
        )


def _static_options(op, scale, logits_soft_cap, sliding_window, interpret):
    """The static arguments type-checked and as Python scalars."""
    scale = checks.static_real("scale", scale, op=op)
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite or None, got {scale=}")
    logits_soft_cap = checks.static_real("logits_soft_cap", logits_soft_cap, op=op)
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"{op}: logits_soft_cap must be positive or None, got {logits_soft_cap=}")
    sliding_window = checks.static_int("sliding_window", sliding_window, op=op, allow_none=True)
    interpret = checks.static_bool("interpret", interpret, op=op)
    return scale, logits_soft_cap, sliding_window, interpret


def _is_concrete(x) -> bool:
    """A value whose entries the host can read now (not a tracer, not split over hosts)."""
    if isinstance(x, jax.core.Tracer):
        return False
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def _checked_table(op, lengths, page_table, *, num_pages, page_size, num_queries, window):
    """``(lengths, page_table)`` as int32 jax arrays, their values checked (``checks``) and
    clipped into range (``[0, capacity]``, ``[0, P)``): memory-safe even unchecked."""
    pages_per_seq = jnp.shape(page_table)[-1]
    capacity = pages_per_seq * page_size
    rule = dict(
        num_pages=num_pages, page_size=page_size, num_queries=num_queries, sliding_window=window
    )
    concrete = _is_concrete(lengths), _is_concrete(page_table)
    if concrete[0]:
        # Read on the host before the int32 cast, which would wrap an int64 2**32 + 3 to 3.
        lengths = np.asarray(lengths)
        page_table = np.asarray(page_table) if concrete[1] else page_table
        checks.check_concrete(
            op,
            lengths,
            page_table if concrete[1] else None,
            pages_per_seq=pages_per_seq,
            **rule,
        )
    if concrete[0] and concrete[1]:
        lengths = np.clip(lengths, 0, capacity)
        page_table = np.clip(page_table, 0, max(num_pages - 1, 0))
    else:
        lengths = checks.checked_lengths(op, jnp.asarray(lengths), page_table, **rule)
        lengths = jnp.clip(lengths, 0, capacity)
        page_table = jnp.clip(page_table, 0, max(num_pages - 1, 0))
    return jnp.asarray(lengths).astype(jnp.int32), jnp.asarray(page_table).astype(jnp.int32)


def paged_prefill_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    page_table: jax.Array,
    *,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    sliding_window: int | None = None,
    implementation: str | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """The last ``S`` tokens of each sequence attend, causally, to its paged cache.

    Args:
      q: ``[B, S, Hq, D]``; query ``j`` sits at position ``lengths[b] - S + j``.
      k_pages, v_pages: ``[Hkv, P, page_size, D]`` page pools, same dtype as ``q``;
        16-bit pools may be passed as their ``uint16`` bits (``capibara.kernels.bit_views.to_bits``,
        how a serving engine keeps them on CPU): XLA:CPU copies a whole pool to
        hand a bf16 view of stored bits, or bits of a bf16 pool, to the native kernel.
      lengths: ``int[B]`` cached tokens per sequence, the ``S`` queried ones included;
        ``0 <= lengths[b] <= pages_per_seq * page_size`` (see "Checked values").
      page_table: ``int[B, pages_per_seq]`` pool page of each page of each sequence;
        an entry in use (a page some query reads: column ``j < ceil(lengths[b] /
        page_size)``, and with a sliding window not wholly before the earliest query's
        window) must be in ``[0, P)``; the others may hold anything and are never used.
      scale: logit scale (a real number); ``None`` = ``1/sqrt(D)``.
      logits_soft_cap: ``c > 0``: logits become ``c·tanh(logits/c)`` (after scaling).
      sliding_window: ``w > 0`` (an integer): a query at position ``p`` sees keys
        ``p-w+1 .. p``.
      implementation: ``None`` (best for the platform, chosen at lowering),
        ``"pallas"``, ``"native"`` (CPU), ``"xla"`` or ``"reference"``.
      interpret: run the Pallas kernel in the Pallas TPU interpreter (a bool).
      block_sizes: ``BlockSizes``; ``None`` = default.

    Arrays may be anything ``jnp.asarray`` takes (lists, numpy); integer scalars any
    ``numbers.Integral`` (``np.int64(4)``), real ones any ``numbers.Real``. A wrong type
    raises ``TypeError``, a bad shape or static value ``ValueError``.

    Checked values: with concrete ``lengths`` and ``page_table`` (not traced), a length
    outside ``[0, capacity]`` or an in-use entry outside ``[0, P)`` raises ``ValueError``
    naming the sequence, the slot (table column) and the value, before anything runs
    (device arrays are read back to the host for it). Traced (under ``jit``), the same
    check runs only under ``jax.experimental.checkify`` and costs nothing otherwise::

        checked = jax.jit(checkify.checkify(step))  # step calls paged_attention
        err, out = checked(q, k_pages, v_pages, lengths, page_table)
        err.throw()  # JaxRuntimeError (a ValueError): "... sequence 1, slot 2: ..."

    (``errors=checkify.user_checks``, the default, or ``index_checks``). Unchecked,
    out-of-range values are clipped into range, so no call reads outside the pools.

    Returns:
      ``[B, S, Hq, D]`` in ``q.dtype`` (f32 softmax and accumulation); zeros for a query
      that sees no key.
    """
    q = jnp.asarray(q)
    if q.ndim != 4:
        raise ValueError(f"paged_prefill_attention: q must be [B, S, Hq, D], got q.shape={q.shape}")
    return _attention(
        "paged_prefill_attention",
        q,
        k_pages,
        v_pages,
        lengths,
        page_table,
        scale=scale,
        logits_soft_cap=logits_soft_cap,
        sliding_window=sliding_window,
        implementation=implementation,
        interpret=interpret,
        block_sizes=block_sizes,
    )


def _attention(
    op,
    q,
    k_pages,
    v_pages,
    lengths,
    page_table,
    *,
    scale,
    logits_soft_cap,
    sliding_window,
    implementation,
    interpret,
    block_sizes,
):
    """Both entry points: ``q [B, S, Hq, D]`` -> ``[B, S, Hq, D]``."""
    k_pages, v_pages = jnp.asarray(k_pages), jnp.asarray(v_pages)
    # The integer arrays stay as given until their values are checked (on the host
    # when concrete); jnp.asarray only for the dtype and shape checks.
    if not isinstance(lengths, jax.Array | np.ndarray):
        lengths = np.asarray(lengths)
    if not isinstance(page_table, jax.Array | np.ndarray):
        page_table = np.asarray(page_table)
    k_float, v_float = _float_view(k_pages, q.dtype), _float_view(v_pages, q.dtype)
    _validate(op, q, k_float, v_float, lengths, page_table)
    scale, logits_soft_cap, sliding_window, interpret = _static_options(
        op, scale, logits_soft_cap, sliding_window, interpret
    )
    block_sizes = block_sizes or BlockSizes.get_default()
    if not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"{op}: block_sizes must be BlockSizes, got {type(block_sizes).__name__}")
    _, num_pages, page_size, _ = k_float.shape
    lengths, page_table = _checked_table(
        op,
        lengths,
        page_table,
        num_pages=num_pages,
        page_size=page_size,
        num_queries=q.shape[1],
        window=sliding_window,
    )
    options = {
        "scale": float(q.shape[-1] ** -0.5 if scale is None else scale),
        "logits_soft_cap": logits_soft_cap,
        "sliding_window": sliding_window,
    }
    # The pools as given (bf16 may come as uint16 bits) go to the native kernel; the
    # float view to everything else (a bitcast that cancels inside the program).
    impls = {
        "pallas": _on_float_pools(
            functools.partial(
                pallas_tpu.paged_attention,
                pages_per_block=block_sizes.pages_per_block,
                interpret=interpret,
                **options,
            )
        ),
        "xla": _on_float_pools(
            functools.partial(
                xla.paged_attention, pages_per_block=block_sizes.xla_pages_per_block, **options
            )
        ),
        "reference": _on_float_pools(functools.partial(reference.paged_attention, **options)),
    }
    if implementation == "native" or (implementation is None and not interpret):
        why_not = _native_unusable(q.dtype)
        if why_not is None:
            impls["native"] = functools.partial(native.paged_attention, **options)
        elif implementation == "native":
            raise ValueError(f"{op}: implementation='native' unavailable: {why_not}")
    run = _platform.dispatch(op, implementation, interpret, impls)
    pool = ("kv_heads", None, None, None)
    return _mesh.run_per_shard(
        op,
        run,
        (q, k_pages, v_pages, lengths, page_table),
        (("batch", None, "heads", None), pool, pool, ("batch",), ("batch", None)),
        ("batch", None, "heads", None),
    )


def _on_float_pools(fn):
    """``fn`` taking the pools as floats, called with the pools as given."""

    def call(q, k_pages, v_pages, *rest):
        return fn(q, _float_view(k_pages, q.dtype), _float_view(v_pages, q.dtype), *rest)

    return call


def _float_view(pool, dtype):
    """``pool`` as ``dtype``: a 16-bit pool passed as its ``uint16`` bits is viewed back."""
    if pool.dtype == jnp.uint16 and jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2:
        return from_bits(pool, dtype)
    return pool


def _native_unusable(dtype) -> str | None:
    """Why the native kernel cannot serve inputs of ``dtype`` here (None: it can)."""
    if dtype not in native.DTYPES:
        return f"it takes f32 or bf16, got {dtype}"
    return native.reason()


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    page_table: jax.Array,
    *,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    sliding_window: int | None = None,
    implementation: str | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Decode: one new token per sequence attends to its paged cache.

    Args:
      q: ``[B, Hq, D]``, the token at position ``lengths[b] - 1``.
      k_pages, v_pages, lengths, page_table, scale, logits_soft_cap, sliding_window,
        implementation, interpret, block_sizes: as in ``paged_prefill_attention``,
        the value checks included: a bad length or in-use table entry raises
        ``ValueError`` for concrete inputs, and under ``checkify.checkify`` when traced.

    Returns:
      ``[B, Hq, D]`` in ``q.dtype``; zeros where ``lengths[b] == 0``.
    """
    q = jnp.asarray(q)
    if q.ndim != 3:
        raise ValueError(f"paged_attention: q must be [B, Hq, D], got q.shape={q.shape}")
    out = _attention(
        "paged_attention",
        q[:, None],
        k_pages,
        v_pages,
        lengths,
        page_table,
        scale=scale,
        logits_soft_cap=logits_soft_cap,
        sliding_window=sliding_window,
        implementation=implementation,
        interpret=interpret,
        block_sizes=block_sizes,
    )
    return out[:, 0]


def lowering_cases():
    """The Pallas kernel exported for TPU: bf16 GQA decode, f32 MHA decode with D = 80
    and 8-token pages, and a windowed, soft-capped f32 chunk of 4 queries (see
    ``capibara.kernels.lowering``)."""
    from capibara.kernels.lowering import LoweringCase

    def pages(dtype):
        return jax.ShapeDtypeStruct((2, 64, 16, 128), dtype)

    lengths = jax.ShapeDtypeStruct((4,), jnp.int32)
    table = jax.ShapeDtypeStruct((4, 16), jnp.int32)
    decode = functools.partial(paged_attention, implementation="pallas")
    chunk = functools.partial(
        paged_prefill_attention,
        implementation="pallas",
        sliding_window=100,
        logits_soft_cap=30.0,
        block_sizes=BlockSizes(pages_per_block=4),
    )
    bf16, f32 = jnp.bfloat16, jnp.float32
    mha_pages = jax.ShapeDtypeStruct((4, 64, 8, 80), f32)  # page 8, D = 80
    return [
        LoweringCase(
            "paged_attention.decode",
            decode,
            (jax.ShapeDtypeStruct((4, 8, 128), bf16), pages(bf16), pages(bf16), lengths, table),
        ),
        LoweringCase(
            "paged_attention.decode(mha,d=80,f32)",
            decode,
            (jax.ShapeDtypeStruct((4, 4, 80), f32), mha_pages, mha_pages, lengths, table),
        ),
        LoweringCase(
            "paged_attention.chunk(window,cap)",
            chunk,
            (jax.ShapeDtypeStruct((4, 4, 8, 128), f32), pages(f32), pages(f32), lengths, table),
        ),
    ]
