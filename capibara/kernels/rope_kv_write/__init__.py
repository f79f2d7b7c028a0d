"""RoPE and KV-cache write: a serving step's q and k rotated, its k and v stored.

    q, k_pages, v_pages = capibara.kernels.rope_kv_write(
        q, k, v, cos, sin, k_pages, v_pages, write_pages, write_offsets)

The step between the q/k/v projections and paged attention (what vLLM does with its
``rotary_embedding`` and ``reshape_and_cache`` kernels): token ``i``'s q and k are
rotated by RoPE (half-split layout, as Hugging Face Llama) with ``cos[i], sin[i]``,
and its rotated k and its v are written at slot ``write_offsets[i]`` of page
``write_pages[i]`` of every kv head's pool. The rotation is computed in f32 and
rounded to q's / k's dtype (then k and v to the pools'), as the unfused layer does.

Implementations (``implementation=``):
  * ``"reference"`` / ``"xla"``: the rotation as ``jax.numpy``, the writes as an
    indexed set (16-bit pools scattered as their ``uint16`` bits, which XLA:CPU
    keeps in place). One function: it is both the oracle and the portable path.
  * ``"native"``: a C++ kernel for XLA:CPU (``rope_kv_write.cc``, XLA FFI custom call)
    that writes the pools in place (aliased outputs). f32 and bf16. Built on first use
    (``capibara.kernels.native_build``); without a compiler ``native.reason()`` says why.
  ``None`` picks ``"native"`` on CPU when it is available and the step has at most
  ``MAX_NATIVE_TOKENS`` tokens (a decode step of a few sequences), ``"xla"`` otherwise
  and elsewhere (decided at lowering). The native kernel is one thread: for the
  ``small`` model's 12 layers (``make bench K=rope_kv_write``'s shapes) it took 0.052
  ms against XLA's 0.081 at 8 tokens, 0.127 against 0.108 at 32, 0.479 against 0.159
  at 128. Not a Pallas kernel: on TPU/GPU this is XLA's fusion and scatter. Forward
  only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from capibara.kernels import _mesh, _platform
from capibara.kernels.rope_kv_write import native, reference

__all__ = ["IMPLEMENTATIONS", "MAX_NATIVE_TOKENS", "rope_kv_write"]

IMPLEMENTATIONS = ("native", "xla", "reference")
# Tokens up to which implementation=None runs the native kernel on CPU (measured
# crossover with XLA's multi-threaded fusion and scatter: between 8 and 32).
MAX_NATIVE_TOKENS = 16


def rope_kv_write(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    write_pages: jax.Array,
    write_offsets: jax.Array,
    *,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotates ``q`` and ``k`` by RoPE and writes ``k`` and ``v`` into the pools.

    Args:
      q: ``[N, Hq, D]`` queries of the step's ``N`` tokens (``D`` even), or any
        ``[..., Hq, D]`` whose leading dims hold the ``N`` tokens in order (e.g.
        ``[N, 1, Hq, D]``, which paged attention takes as is).
      k, v: ``[N, Hkv, D]``.
      cos, sin: f32 ``[N, D / 2]``: the RoPE angles' cosines and sines per token.
      k_pages, v_pages: ``[Hkv, P, page_size, D]`` pools, f32 or bf16 (or bf16 as its
        ``uint16`` bits, how the engine stores them); donate them under ``jit`` so the
        update stays in place.
      write_pages, write_offsets: int32 ``[N]``: the page and the slot in it of each
        token's k and v. Slots out of range are skipped; when several tokens share a
        slot, which one lands there is unspecified.
      implementation: ``None`` (best here, see the module docstring), ``"native"``,
        ``"xla"`` or ``"reference"``.

    Returns:
      ``(q rotated, q's shape and dtype, k_pages, v_pages)``, the pools in their
      dtype with the step's tokens written.
    """
    args = (q, k, v, cos, sin, k_pages, v_pages, write_pages, write_offsets)
    _validate(*args)
    impls = {"xla": reference.rope_kv_write, "reference": reference.rope_kv_write}
    if implementation == "native" or (implementation is None and k.shape[0] <= MAX_NATIVE_TOKENS):
        why_not = _native_unusable(q, k, v, k_pages, v_pages)
        if why_not is None:
            impls["native"] = native.rope_kv_write
        elif implementation == "native":
            raise ValueError(f"rope_kv_write: implementation='native' unavailable: {why_not}")
    run = _platform.dispatch("rope_kv_write", implementation, False, impls)
    tokens = (None,) * (q.ndim - 2)
    pool = ("kv_heads", None, None, None)
    # Heads split over the model axis; the tokens and the write slots are replicated
    # (a pool shard must receive every token's k and v for its heads).
    return _mesh.run_per_shard(
        "rope_kv_write",
        run,
        args,
        (
            (*tokens, "heads", None),
            (None, "kv_heads", None),
            (None, "kv_heads", None),
            (None, None),
            (None, None),
            pool,
            pool,
            (None,),
            (None,),
        ),
        ((*tokens, "heads", None), pool, pool),
        attention=False,
    )


def _validate(q, k, v, cos, sin, k_pages, v_pages, write_pages, write_offsets) -> None:
    if q.ndim < 2 or k.ndim != 3 or v.shape != k.shape:
        raise ValueError(
            f"rope_kv_write: q must be [..., Hq, D], k and v [N, Hkv, D]: got {q.shape=} "
            f"{k.shape=} {v.shape=}"
        )
    n, hkv, d = k.shape
    if math.prod(q.shape[:-2]) != n or q.shape[-1] != d or d % 2:
        raise ValueError(
            f"rope_kv_write: q {q.shape} and k {k.shape} need the same N tokens and even D"
        )
    if cos.shape != (n, d // 2) or sin.shape != cos.shape:
        raise ValueError(
            f"rope_kv_write: cos and sin must be [N, D/2] = {(n, d // 2)}, got "
            f"{cos.shape=} {sin.shape=}"
        )
    if k_pages.ndim != 4 or v_pages.shape != k_pages.shape or k_pages.shape[0] != hkv:
        raise ValueError(
            f"rope_kv_write: pools must be [Hkv={hkv}, P, page_size, D={d}], got "
            f"{k_pages.shape=} {v_pages.shape=}"
        )
    if k_pages.shape[3] != d:
        raise ValueError(f"rope_kv_write: pools' D={k_pages.shape[3]} != {d}")
    if write_pages.shape != (n,) or write_offsets.shape != (n,):
        raise ValueError(
            f"rope_kv_write: write_pages and write_offsets must be [N={n}], got "
            f"{write_pages.shape=} {write_offsets.shape=}"
        )
    for name, a in (("write_pages", write_pages), ("write_offsets", write_offsets)):
        if a.dtype != jnp.int32:
            raise TypeError(f"rope_kv_write: {name} must be int32, got {a.dtype}")
    for name, a in (("cos", cos), ("sin", sin)):
        if a.dtype != jnp.float32:
            raise TypeError(f"rope_kv_write: {name} must be float32, got {a.dtype}")


def _native_unusable(q, k, v, k_pages, v_pages) -> str | None:
    """Why the native kernel cannot take these inputs here (None: it can)."""
    if any(a.dtype not in native.DTYPES for a in (q, k, v)) or any(
        p.dtype not in native.POOL_DTYPES for p in (k_pages, v_pages)
    ):
        dtypes = ", ".join(str(a.dtype) for a in (q, k, v, k_pages, v_pages))
        return f"it takes f32 or bf16 (pools also uint16 bits), got {dtypes}"
    return native.reason()
