"""``QuantizedWeight``: an int8 or int4 weight ``[K, N]`` with per-group scales (and mins).

A column ``n`` of the weight is cut along ``K`` into groups of ``group`` rows; group
``g`` dequantizes as

    w[g·group + i, n] = scales[g, n] · (q[g·group + i, n] - offset) + mins[g, n]

with ``q`` the stored integers, ``offset`` 0 or 8 (int4 stored unsigned 0..15 around 8)
and ``mins`` absent (zero) in the symmetric formats. These are exactly GGUF's block
formats for ``group = 32``: Q8_0 (int8, no mins), Q4_0 (int4, offset 8), Q4_1 (int4,
offset 0, mins), so ``from_gguf`` moves their bytes into place without a float round
trip, and ``dequantize`` equals ``gguf.quants.dequantize`` bit for bit.

Storage (``values``):
  * 8 bits: ``int8 [K, N]``.
  * 4 bits: ``uint8 [K/2, N]``, two values a byte, in GGUF's order within each group:
    byte ``j`` of a group holds row ``j`` in its low nibble and row ``j + group/2`` in
    its high nibble. Unpacking a group's ``[group/2, N]`` bytes is ``(low, high)``
    stacked -- no interleave, which suits the TPU's sublane layout.
``scales`` and ``mins`` are f32 ``[K / group, N]`` (GGUF's f16 scales widen exactly).
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np

BITS = (4, 8)
GROUPS = (32, 64, 128)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized ``[K, N]`` weight (see the module docstring for the layout).

    Attributes:
      values: ``int8 [K, N]`` (8 bits) or ``uint8 [K/2, N]`` (4 bits, packed).
      scales: f32 ``[K / group, N]``.
      mins: f32 ``[K / group, N]`` or ``None``.
      (Each may lead with the same extra dims, e.g. ``[layers, ...]`` for weights stacked
      for ``lax.scan``; the ops take one ``[K, N]`` weight: scan or vmap over the rest.)
      bits: 8 or 4. group: rows per scale (``K`` for per-channel). offset: 0 or 8.
      shape: the dequantized ``(K, N)``.
    """

    values: jax.Array
    scales: jax.Array
    mins: jax.Array | None
    bits: int = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))
    offset: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got bits={self.bits!r}")
        k, n = self.shape
        if self.group <= 0 or k % self.group:
            raise ValueError(f"group must divide K={k}, got group={self.group}")
        if self.bits == 4 and self.group % 2:
            raise ValueError(f"4-bit groups pack two rows a byte: group must be even, got {self}")
        if self.offset not in (0, 8) or (self.bits == 8 and self.offset):
            raise ValueError(f"offset must be 0 (or 8 for 4 bits), got offset={self.offset}")
        if not _is_abstract(self.values):
            want = (k // 2, n) if self.bits == 4 else (k, n)
            dtype = jnp.uint8 if self.bits == 4 else jnp.int8
            # Leading dims are allowed: per-layer weights stacked for scan / vmap.
            if tuple(self.values.shape[-2:]) != want or self.values.dtype != dtype:
                raise ValueError(
                    f"{self.bits}-bit values must be {jnp.dtype(dtype).name}{list(want)}, got "
                    f"{self.values.dtype}{list(self.values.shape)}"
                )
            for name in ("scales", "mins"):
                x = getattr(self, name)
                if x is not None and tuple(x.shape[-2:]) != (k // self.group, n):
                    raise ValueError(
                        f"{name} must be [K/group, N]={[k // self.group, n]}, got {list(x.shape)}"
                    )

    @property
    def num_groups(self) -> int:
        return self.shape[0] // self.group

    def unpacked(self) -> jax.Array:
        """The stored integers ``q`` as int32 ``[K, N]`` (4-bit values unpacked)."""
        if self.bits == 8:
            return self.values.astype(jnp.int32)
        return unpack_int4(self.values, self.group)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The weight ``[K, N]``: ``scales · (q - offset) + mins`` in f32, then ``dtype``."""
        k, n = self.shape
        g = self.num_groups
        q = (self.unpacked() - self.offset).astype(jnp.float32).reshape(g, self.group, n)
        w = q * self.scales[:, None, :]
        if self.mins is not None:
            w = w + self.mins[:, None, :]
        return w.reshape(k, n).astype(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes stored: values, scales and mins (what a matmul streams)."""
        total = self.values.size * self.values.dtype.itemsize + self.scales.size * 4
        return total + (0 if self.mins is None else self.mins.size * 4)


def _is_abstract(x) -> bool:
    """Leaves that are not stored values: JAX rebuilds the pytree with placeholders,
    shape structs and cotangents (float0 for the integers) under its transforms."""
    if not isinstance(x, jax.Array | np.ndarray):
        return True
    return x.dtype == jax.dtypes.float0


def unpack_int4(values: jax.Array, group: int) -> jax.Array:
    """``uint8 [K/2, N]`` -> int32 ``[K, N]`` in 0..15 (GGUF's order within each group)."""
    half, n = values.shape
    v = values.astype(jnp.int32).reshape(half * 2 // group, group // 2, n)
    return jnp.concatenate([v & 15, v >> 4], axis=1).reshape(half * 2, n)


def pack_int4(q: jax.Array, group: int) -> jax.Array:
    """``unpack_int4``'s inverse: ints in 0..15 ``[K, N]`` -> uint8 ``[K/2, N]``."""
    k, n = q.shape
    q = q.astype(jnp.uint8).reshape(k // group, 2, group // 2, n)
    return (q[:, 0] | (q[:, 1] << 4)).reshape(k // 2, n)


def _as_int(name: str, value) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"{name} must be an int, got {name}={value!r}")


def quantize(w, bits: int = 8, group: int | None = None, *, zero_point: bool | None = None):
    """Quantizes a float weight ``[K, N]`` (round to nearest).

    Args:
      w: ``[K, N]`` float weight (contraction rows ``K``, as ``x @ w``).
      bits: 8 (symmetric, ``q ∈ [-127, 127]``) or 4.
      group: rows per scale; ``None`` = per output channel (one group of ``K``) for 8
        bits, 32 for 4 bits. Must divide ``K``.
      zero_point: 4 bits only: ``True`` (default) stores a min per group (Q4_1's
        ``scale · q + min``, ``q ∈ 0..15``), ``False`` is symmetric (Q4_0's
        ``scale · (q - 8)``).

    Returns:
      A ``QuantizedWeight``. Error bound per element (tested), plus f32 rounding:
      ``|w - dequantize| <= scale / 2`` for 8 bits (``scale = absmax / 127``) and 4 bits
      with a zero point (``(max - min) / 15``); ``<= scale`` symmetric 4 bits
      (``scale = absmax / 8``: the grid is ``[-8, 7]``, so a value near ``+absmax``
      clips to 7).
    """
    bits = _as_int("bits", bits)
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got bits={bits}")
    w = jnp.asarray(w)
    if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"w must be a float [K, N] matrix, got {w.dtype}{list(w.shape)}")
    k, n = w.shape
    group = (k if bits == 8 else 32) if group is None else _as_int("group", group)
    if group <= 0 or k % group:
        raise ValueError(f"group must be a positive divisor of K={k}, got group={group}")
    if zero_point is not None and bits == 8:
        raise ValueError("zero_point is for 4 bits (8-bit weights are symmetric)")
    wg = w.astype(jnp.float32).reshape(k // group, group, n)
    if bits == 8:
        scale = jnp.max(jnp.abs(wg), axis=1) / 127.0
        inv = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)
        q = jnp.clip(jnp.round(wg * inv[:, None]), -127, 127).astype(jnp.int8)
        return QuantizedWeight(q.reshape(k, n), scale, None, 8, group, 0, (k, n))
    if group % 2:
        raise ValueError(f"4-bit groups pack two rows a byte: group must be even, got {group}")
    if zero_point is None or zero_point:
        lo, hi = jnp.min(wg, axis=1), jnp.max(wg, axis=1)
        scale = (hi - lo) / 15.0
        inv = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)
        q = jnp.clip(jnp.round((wg - lo[:, None]) * inv[:, None]), 0, 15)
        packed = pack_int4(q.reshape(k, n), group)
        return QuantizedWeight(packed, scale, lo, 4, group, 0, (k, n))
    # Symmetric: the value of largest magnitude maps to -8 (Q4_0's convention), so the
    # grid is [-8, 7] · scale with scale = -signed_absmax / 8.
    idx = jnp.argmax(jnp.abs(wg), axis=1)
    extreme = jnp.take_along_axis(wg, idx[:, None], axis=1)[:, 0]
    scale = extreme / -8.0
    inv = jnp.where(scale != 0, 1.0 / jnp.where(scale != 0, scale, 1.0), 0.0)
    q = jnp.clip(jnp.round(wg * inv[:, None]) + 8, 0, 15)
    packed = pack_int4(q.reshape(k, n), group)
    return QuantizedWeight(packed, scale, None, 4, group, 8, (k, n))


# GGUF block formats this layout holds as is: name -> (bits, offset, has_mins, bytes/block).
GGUF_FORMATS = {"Q8_0": (8, 0, False, 34), "Q4_0": (4, 8, False, 18), "Q4_1": (4, 0, True, 20)}
GGUF_BLOCK = 32


def from_gguf(raw: np.ndarray, quant_type: str, shape: tuple[int, int]) -> QuantizedWeight:
    """A GGUF tensor's blocks as a ``QuantizedWeight`` for ``x @ W.T``.

    Args:
      raw: the tensor's bytes (``uint8``, any shape holding ``N · K / 32`` blocks), as
        ``gguf.GGUFReader`` gives them.
      quant_type: ``"Q8_0"``, ``"Q4_0"`` or ``"Q4_1"`` (``GGMLQuantizationType.name``).
      shape: ``(N, K)`` in row-major order (GGUF's ``ne`` reversed): ``N`` rows of ``K``
        contiguous values, blocks of 32 along ``K``.

    Returns:
      The ``[K, N]`` weight (transposed: GGUF stores ``out × in``), bytes moved only.
    """
    if quant_type not in GGUF_FORMATS:
        raise ValueError(
            f"GGUF quant type {quant_type!r} has no QuantizedWeight layout (supported: "
            + ", ".join(GGUF_FORMATS)
            + "); dequantize it to float instead"
        )
    bits, offset, has_mins, block_bytes = GGUF_FORMATS[quant_type]
    n, k = (int(x) for x in shape)
    if k % GGUF_BLOCK:
        raise ValueError(f"GGUF rows must be whole blocks of {GGUF_BLOCK}, got K={k}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // GGUF_BLOCK, block_bytes)
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32).T
    head = 4 if has_mins else 2
    mins = (
        blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32).T if has_mins else None
    )
    qs = blocks[..., head:]  # [N, K/32, 32 int8 or 16 packed bytes]
    values = qs.view(np.int8).reshape(n, k).T if bits == 8 else qs.reshape(n, k // 2).T
    return QuantizedWeight(
        jnp.asarray(np.ascontiguousarray(values)),
        jnp.asarray(np.ascontiguousarray(scales)),
        None if mins is None else jnp.asarray(np.ascontiguousarray(mins)),
        bits,
        GGUF_BLOCK,
        offset,
        (k, n),
    )
