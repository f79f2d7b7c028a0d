"""Which (query, key) pairs attend, and the logit soft-cap: shared by every implementation.

Positions are *absolute key positions*. A query row ``i`` of ``S`` sits at key position
``p = i + offset``. By default ``offset = T - S`` (causal aligned bottom-right, as
prefill onto a cache needs: the last query sees the last key); ``q_offset=0`` aligns
top-left (``jax.nn.dot_product_attention``: query ``i`` is key position ``i``). Query
``i`` sees key ``j`` iff

* ``j < T`` (padding is never seen),
* ``j >= p - left`` and ``j <= p + right`` for the window bounds ``(left, right)``
  (``None`` = unbounded on that side), where
  causal gives ``right = 0``; ``sliding_window = w`` gives ``left = w - 1`` and, when
  not causal, ``right = w - 1`` (a symmetric local window); ``local_window = (l, r)``
  (``jax.nn``'s ``local_window_size``) gives ``left = l``, ``right = r`` (with causal,
  ``right = min(r, 0)``),
* segment ids: ``q_segments[i] == kv_segments[j]``.

The same rules at element granularity (``visible``) and at range granularity
(``key_range``, ``block_needs_mask``) let implementations skip fully masked blocks
statically and drop the element mask from blocks that are fully visible.

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
      causal: query at position ``p`` sees keys ``j <= p``.
      sliding_window: ``w`` or ``None``; see the module docstring.
      local_window: ``(left, right)`` or ``None`` (exclusive with ``sliding_window``):
        position ``p`` sees keys ``p - left <= j <= p + right``; any ints (an empty
        window is allowed: its rows see nothing).
      q_offset: key position of query row 0; ``None`` = ``T - S`` (bottom-right).
    """

    q_len: int
    kv_len: int
    causal: bool = False
    sliding_window: int | None = None
    local_window: tuple[int, int] | None = None
    q_offset: int | None = None

    def __post_init__(self):
        if self.q_len < 0 or self.kv_len < 0:
            raise ValueError(f"lengths must be >= 0, got {self.q_len=}, {self.kv_len=}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive int, got {self.sliding_window=}")
        if self.sliding_window is not None and self.local_window is not None:
            raise ValueError(
                f"give sliding_window or local_window, not both: {self.sliding_window=}, "
                f"{self.local_window=}"
            )
        if self.local_window is not None and not (
            isinstance(self.local_window, tuple)
            and len(self.local_window) == 2
            and all(isinstance(x, int) for x in self.local_window)
        ):
            raise ValueError(f"local_window must be a pair of ints, got {self.local_window=}")

    @property
    def offset(self) -> int:
        """Key position of query row 0 (``T - S`` unless ``q_offset`` is set)."""
        return self.kv_len - self.q_len if self.q_offset is None else self.q_offset

    @property
    def bounds(self) -> tuple[int | None, int | None]:
        """``(left, right)``: position ``p`` sees keys ``[p - left, p + right]``."""
        left = right = None
        if self.sliding_window is not None:
            left = right = self.sliding_window - 1
        if self.local_window is not None:
            left, right = self.local_window
        if self.causal:
            right = 0 if right is None else min(right, 0)
        return left, right

    @property
    def is_structured(self) -> bool:
        """Whether causal/window masking can make whole blocks invisible."""
        return self.bounds != (None, None)


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
    left, right = spec.bounds
    if right is not None:
        ok = ok & (k_pos <= q_abs + right)
    if left is not None:
        ok = ok & (k_pos >= q_abs - left)
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
    left, right = spec.bounds
    if left is not None and right is not None and left + right < 0:
        return 0, 0  # an empty window: every row sees nothing
    lo, hi = 0, spec.kv_len
    if right is not None:
        hi = min(hi, last + right + 1)
    if left is not None:
        lo = max(lo, first - left)
    lo = min(lo, spec.kv_len)
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
    # Window bounds move monotonically with the row: the first and last rows bound the
    # whole range.
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
