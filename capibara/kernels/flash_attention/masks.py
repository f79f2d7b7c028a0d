"""Which (query, key) pairs attend, and the logit soft-cap: shared by every implementation.

Positions are *absolute key positions*. A query row ``i`` of ``S`` sits at key position
``i + offset`` with ``offset = T - S`` (causal aligned bottom-right, as prefill onto a
cache needs: the last query sees the last key). Query ``i`` sees key ``j`` iff

* ``j < T`` (padding is never seen),
* causal: ``j <= i + offset``,
* ``sliding_window = w``: ``j > i + offset - w`` (the last ``w`` keys), and, when not
  causal, also ``j < i + offset + w`` (a symmetric local window),
* segment ids: ``q_segments[i] == kv_segments[j]``.

The same rules at element granularity (``visible``) and at range granularity
(``key_range``, ``block_needs_mask``) let implementations skip fully masked blocks
statically and drop the element mask from blocks that are fully visible. Paged
attention reuses ``visible`` and ``soft_cap`` with ``offset = length - 1``.

API (stable): ``MaskSpec``, ``visible``, ``key_range``, ``block_needs_mask``,
``soft_cap``, ``soft_cap_grad``, ``MASK_VALUE``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

# Masked logits are -inf; the online softmax guards rows whose max is still -inf, so a
# row with nothing to attend to produces exp(-inf) = 0 everywhere and a zero output.
MASK_VALUE = -jnp.inf


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaskSpec:
    """Static structure of the mask (hashable: a jit-static argument).

    Attributes:
      q_len: ``S``, number of query rows (unpadded).
      kv_len: ``T``, number of keys (unpadded).
      causal: query ``i`` sees keys ``j <= i + T - S``.
      sliding_window: ``w`` or ``None``; see the module docstring.
    """

    q_len: int
    kv_len: int
    causal: bool = False
    sliding_window: int | None = None

    def __post_init__(self):
        if self.q_len < 0 or self.kv_len < 0:
            raise ValueError(f"lengths must be >= 0, got {self.q_len=}, {self.kv_len=}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive int, got {self.sliding_window=}")

    @property
    def offset(self) -> int:
        """Key position of query row 0 (``T - S``; negative when ``S > T``)."""
        return self.kv_len - self.q_len

    @property
    def is_structured(self) -> bool:
        """Whether causal/window masking can make whole blocks invisible."""
        return self.causal or self.sliding_window is not None


def visible(spec: MaskSpec, q_pos, k_pos, q_seg=None, k_seg=None):
    """Boolean mask, broadcasting ``q_pos [..., M, 1]`` against ``k_pos [..., 1, N]``.

    Args:
      spec: the mask structure.
      q_pos: int32 query row indices (0-based, before adding ``spec.offset``).
      k_pos: int32 key indices.
      q_seg, k_seg: optional segment ids broadcastable like ``q_pos`` / ``k_pos``.

    Returns:
      bool array of the broadcast shape; ``True`` where the query attends the key.
    """
    q_abs = q_pos + spec.offset
    ok = k_pos < spec.kv_len
    if spec.causal:
        ok = ok & (k_pos <= q_abs)
    if spec.sliding_window is not None:
        w = spec.sliding_window
        ok = ok & (k_pos > q_abs - w)
        if not spec.causal:
            ok = ok & (k_pos < q_abs + w)
    if q_seg is not None:
        ok = ok & (q_seg == k_seg)
    return ok


def key_range(spec: MaskSpec, q_start: int, q_end: int) -> tuple[int, int]:
    """Host-side: the keys ``[lo, hi)`` any query row in ``[q_start, q_end)`` may see.

    Keys outside are masked for every row of the range, so they need not be computed.
    ``lo >= hi`` means the whole range of rows sees nothing (rows return zeros).
    """
    if q_end <= q_start:
        return 0, 0
    first, last = q_start + spec.offset, q_end - 1 + spec.offset
    lo, hi = 0, spec.kv_len
    if spec.causal:
        hi = min(hi, last + 1)
    if spec.sliding_window is not None:
        w = spec.sliding_window
        lo = max(lo, first - w + 1)
        if not spec.causal:
            hi = min(hi, last + w)
    return lo, max(lo, hi)


def block_needs_mask(
    spec: MaskSpec, q_start: int, q_end: int, k_start: int, k_end: int, *, segments: bool
) -> bool:
    """Host-side: whether some pair in rows ``[q_start, q_end)`` x keys ``[k_start, k_end)``
    is masked (otherwise the block runs without the element mask)."""
    if segments or k_end > spec.kv_len:
        return True
    lo_first, hi_first = key_range(spec, q_start, q_start + 1)
    lo_last, hi_last = key_range(spec, q_end - 1, q_end)
    # Causal/window bounds move monotonically with the row: the first and last rows
    # bound the whole range.
    return not (max(lo_first, lo_last) <= k_start and k_end <= min(hi_first, hi_last))


def soft_cap(s, cap: float | None):
    """``cap * tanh(s / cap)`` (identity for ``cap=None``); ``s`` in f32."""
    if cap is None:
        return s
    return cap * jnp.tanh(s / cap)


def soft_cap_grad(ds, s_capped, cap: float | None):
    """Chain rule through ``soft_cap``: ``ds * (1 - tanh²)``, from the *capped* logits."""
    if cap is None:
        return ds
    t = s_capped / cap
    return ds * (1.0 - t * t)


def block_visible(spec: MaskSpec, q_start: int, q_end: int, k_start: int, k_end: int) -> bool:
    """Host-side: whether block rows ``[q_start, q_end)`` x keys ``[k_start, k_end)`` has any
    visible pair under causal/window (segments are data, so not known here)."""
    lo, hi = key_range(spec, q_start, q_end)
    return max(lo, k_start) < min(hi, k_end)


__all__ = [
    "MASK_VALUE",
    "MaskSpec",
    "block_needs_mask",
    "block_visible",
    "key_range",
    "soft_cap",
    "soft_cap_grad",
    "visible",
]
