"""Argument checks of ``flash_attention`` (and ``attention_compat``): every bad value
raises at trace time with its name and value, every good one comes out normalized.

Normalizing means: array-likes (lists, numpy) become ``jax.Array``s as in ``jax.nn``;
numpy integer scalars (any ``numbers.Integral`` but ``bool``) become ``int``; numpy
floats become ``float``; ``numpy.bool_`` becomes ``bool``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from capibara.kernels.flash_attention.masks import MaskSpec

ALIGNMENTS = ("bottom_right", "top_left")


def as_bool(name: str, value) -> bool:
    """``value`` as a ``bool``; ``TypeError`` naming it for anything else (``"yes"``, 1)."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {name}={value!r} ({type(value).__name__})")


def as_int(name: str, value) -> int:
    """An ``int`` (numpy integer scalars too, never ``bool``); ``TypeError`` otherwise."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"{name} must be an int, got {name}={value!r} ({type(value).__name__})")


def as_float(name: str, value) -> float:
    """A finite ``float`` from a Python/numpy real or a concrete 0-d array."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {name}={value!r}")
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static number, got a traced value: {name}={value}")
    if not isinstance(value, numbers.Real) and not _is_real_scalar_array(value):
        raise TypeError(f"{name} must be a real number, got {name}={value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {name}={value}")
    return value


def _is_real_scalar_array(value) -> bool:
    """A concrete 0-d numpy/jax array of a real dtype."""
    dtype = getattr(value, "dtype", None)
    return (
        dtype is not None
        and getattr(value, "ndim", None) == 0
        and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
    )


def as_array(name: str, value) -> jax.Array:
    """``jnp.asarray`` with the argument's name in the error."""
    try:
        return jnp.asarray(value)
    except TypeError as e:
        raise TypeError(f"{name} must be an array, got {name}={value!r}") from e


def window(name: str, value) -> tuple[int, int] | None:
    """``jax.nn``'s ``local_window_size``: an int ``w`` (= ``(w, w)``) or ``(left, right)``."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value), int(value)
    if isinstance(value, tuple | list) and len(value) == 2:
        return as_int(f"{name}[0]", value[0]), as_int(f"{name}[1]", value[1])
    raise TypeError(f"{name} must be an int or a (left, right) pair of ints, got {name}={value!r}")


def scale(value) -> float | jax.Array | None:
    """``None``, a static ``float``, or a traced scalar (applied to ``q`` by the caller)."""
    if value is None:
        return None
    if isinstance(value, jax.core.Tracer):
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.number):
            raise ValueError(
                f"scale must be a real scalar, got scale with {value.shape=}, {value.dtype=}"
            )
        return value
    return as_float("scale", value)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """``flash_attention``'s inputs flattened to one batch dim.

    ``q [B, S, Hq, D]``, ``k [B, T, Hkv, D]``, ``v [B, T, Hkv, Dv]``, segments ``[B, S]``,
    ``[B, T]`` int32 or ``None``; ``lead`` is the caller's leading (batch) shape, ``()`` for
    rank-3 inputs.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_seg: jax.Array | None
    kv_seg: jax.Array | None
    lead: tuple[int, ...]


def inputs(q, k, v, segment_ids) -> Inputs:
    """Checks shapes and dtypes of ``q [..., S, Hq, D]``, ``k [..., T, Hkv, D]``,
    ``v [..., T, Hkv, Dv]`` and ``segment_ids`` (``[..., S]``, ``[..., T]``), and flattens the
    leading dims into one batch dim."""
    q, k, v = as_array("q", q), as_array("k", k), as_array("v", v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim < 3:
            raise ValueError(
                f"{name} must be [..., seq, heads, head_dim] (rank >= 3: [batch, seq, heads, "
                f"head_dim] or unbatched [seq, heads, head_dim]), got {name}.shape={x.shape}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.ndim == k.ndim == v.ndim:
        raise ValueError(f"q, k, v must have the same rank, got {q.shape=}, {k.shape=}, {v.shape=}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"k and v must have the same shape (but for v's head dim), got {k.shape=}, {v.shape=}"
        )
    lead = q.shape[:-3]
    if k.shape[:-3] != lead or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must agree on batch and head_dim, got {q.shape=}, {k.shape=}")
    (s, hq, d), (t, hkv, _), dv = q.shape[-3:], k.shape[-3:], v.shape[-1]
    if 0 in (s, t, hq, hkv, d, dv):
        raise ValueError(f"empty dimension in {q.shape=}, {k.shape=} or {v.shape=}")
    if hq % hkv:
        raise ValueError(f"query heads must be a multiple of kv heads, got Hq={hq}, Hkv={hkv}")
    q_seg = kv_seg = None
    if segment_ids is not None:
        if not (isinstance(segment_ids, tuple | list) and len(segment_ids) == 2):
            raise TypeError(
                "segment_ids must be a pair (q_segments [..., S], kv_segments [..., T]), "
                f"got segment_ids={segment_ids!r}"
            )
        q_seg = as_array("segment_ids[0]", segment_ids[0])
        kv_seg = as_array("segment_ids[1]", segment_ids[1])
        if q_seg.shape != (*lead, s) or kv_seg.shape != (*lead, t):
            raise ValueError(
                f"segment_ids must be [..., S]={(*lead, s)} and [..., T]={(*lead, t)}, "
                f"got {q_seg.shape=}, {kv_seg.shape=}"
            )
        if not (
            jnp.issubdtype(q_seg.dtype, jnp.integer) and jnp.issubdtype(kv_seg.dtype, jnp.integer)
        ):
            raise TypeError(f"segment_ids must be integers, got {q_seg.dtype}, {kv_seg.dtype}")
    b = math.prod(lead)
    q, k, v = (x.reshape(b, *x.shape[-3:]) for x in (q, k, v))
    if q_seg is not None:
        q_seg = q_seg.reshape(b, s).astype(jnp.int32)
        kv_seg = kv_seg.reshape(b, t).astype(jnp.int32)
    return Inputs(q, k, v, q_seg, kv_seg, lead)


def mask_spec(
    s: int,
    t: int,
    *,
    causal,
    sliding_window,
    local_window_size,
    alignment,
) -> MaskSpec:
    """The ``MaskSpec`` of the mask flags, each checked."""
    causal = as_bool("causal", causal)
    if sliding_window is not None:
        sliding_window = as_int("sliding_window", sliding_window)
        if sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive int, got {sliding_window=}")
    local_window = window("local_window_size", local_window_size)
    if sliding_window is not None and local_window is not None:
        raise ValueError(
            f"give sliding_window or local_window_size, not both: {sliding_window=}, "
            f"{local_window_size=}"
        )
    if not isinstance(alignment, str) or alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment=!r}")
    return MaskSpec(
        q_len=s,
        kv_len=t,
        causal=causal,
        sliding_window=sliding_window,
        local_window=local_window,
        q_offset=0 if alignment == "top_left" else None,
    )
