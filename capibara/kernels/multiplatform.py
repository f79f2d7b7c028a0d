"""Every op with ``implementation=None`` exported once for ``["tpu", "cpu"]``.

One artefact, the right kernel per platform: the TPU half holds the Mosaic kernels (or
XLA where an op has no Pallas kernel), the CPU half the xla / native path. ``make
lower`` prints a row per op; ``tests/kernels/test_multiplatform_export.py`` serializes
each artefact, deserializes it and runs its CPU half against the reference.

How: ``jax.lax.platform_dependent`` keeps one branch per platform, but lowers every
kept branch for all of the module's platforms, so a compiled ``pallas_call`` in the
TPU branch used to be lowered for CPU too and raised; the kernels bind through
``_platform.pallas_call``, whose lowering is per platform.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from capibara import kernels

PLATFORMS = ("tpu", "cpu")
# Our native CPU kernels are XLA FFI custom calls; jax.export only vouches for its own
# targets, so an artefact holding ours says so (and needs ``capibara`` imported where it
# is deserialized and run, which registers them).
NATIVE_TARGETS = ("capibara_decode_matmul", "capibara_paged_attention", "capibara_rope_kv_write")
DISABLED_CHECKS = tuple(jax.export.DisabledSafetyCheck.custom_call(t) for t in NATIVE_TARGETS)


@dataclasses.dataclass(frozen=True)
class MultiPlatformCase:
    """``op(*args)`` exported for ``PLATFORMS``; ``reference(*args)`` checks its CPU half.

    Attributes:
      mosaic: the TPU half must contain a Mosaic call (ops with a Pallas kernel).
    """

    name: str
    op: Callable
    reference: Callable
    args: tuple
    mosaic: bool


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape).astype(dtype)


def cases() -> list[MultiPlatformCase]:
    gmm_args = (_normal(3, (256, 128)), _normal(4, (4, 128, 128)), jnp.asarray([64, 0, 100, 50]))
    dense = np.asarray(_normal(5, (256, 256)))
    sparse = kernels.BlockSparseMatrix.from_dense(dense, (128, 128), mask=np.eye(2, dtype=bool))
    pages = (_normal(6, (2, 8, 16, 128)), _normal(7, (2, 8, 16, 128)))
    paged_args = (
        _normal(8, (2, 4, 128)),
        *pages,
        jnp.asarray([20, 33], jnp.int32),
        jnp.asarray([[0, 1, 2, 3], [4, 5, 6, 7]], jnp.int32),
    )

    def ref(op):
        return lambda *a: op(*a, implementation="reference")

    def sparse_mm(x, **kw):
        return kernels.block_sparse_matmul(x, sparse, **kw)

    attn_args = (_normal(12, (1, 128, 4, 64)), _normal(13, (1, 256, 2, 64)))
    attn_args = (*attn_args, _normal(14, (1, 256, 2, 64)))

    def causal_attention(q, k, v, **kw):
        return kernels.flash_attention(q, k, v, causal=True, **kw)

    def attention_grads(q, k, v, **kw):
        # dq, dk, dv of a scalar loss: exports the two backward kernels too.
        def loss(q, k, v):
            return jnp.sum(causal_attention(q, k, v, **kw) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    qweight = kernels.quantize(_normal(15, (256, 128)), bits=4, group=32)

    def int4_matmul(x, **kw):
        return kernels.quantized_matmul(x, qweight, **kw)

    return [
        MultiPlatformCase(
            "quantized_matmul",
            int4_matmul,
            ref(int4_matmul),
            (_normal(16, (8, 256)),),
            True,
        ),
        MultiPlatformCase(
            "flash_attention",
            causal_attention,
            ref(causal_attention),
            attn_args,
            True,
        ),
        MultiPlatformCase(
            "flash_attention.grad",
            attention_grads,
            ref(attention_grads),
            attn_args,
            True,
        ),
        MultiPlatformCase(
            "grouped_matmul",
            kernels.grouped_matmul,
            ref(kernels.grouped_matmul),
            gmm_args,
            True,
        ),
        MultiPlatformCase(
            "block_sparse_matmul", sparse_mm, ref(sparse_mm), (_normal(9, (64, 256)),), True
        ),
        MultiPlatformCase(
            "paged_attention",
            kernels.paged_attention,
            ref(kernels.paged_attention),
            paged_args,
            True,
        ),
        MultiPlatformCase(
            "decode_matmul",
            kernels.decode_matmul,
            ref(kernels.decode_matmul),
            (_normal(10, (4, 128), jnp.bfloat16), _normal(11, (128, 64), jnp.bfloat16)),
            False,
        ),
    ]


def export(case: MultiPlatformCase) -> jax.export.Exported:
    """``case.op`` exported for ``PLATFORMS`` from abstract arguments."""
    specs = [jax.ShapeDtypeStruct(jnp.shape(a), jnp.asarray(a).dtype) for a in case.args]
    return jax.export.export(
        jax.jit(case.op), platforms=PLATFORMS, disabled_checks=DISABLED_CHECKS
    )(*specs)


def rows() -> list[tuple[str, str, str]]:
    """``(op, platforms, status)`` per case, for ``make lower``."""
    out = []
    for case in cases():
        try:
            calls = export(case).mlir_module().count("tpu_custom_call")
            status = f"ok ({calls} tpu_custom_call)"
            if case.mosaic and not calls:
                status = "FAILED: no Mosaic call in the TPU half"
        except Exception as e:  # report every op, then fail
            status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        out.append((f"{case.name} (implementation=None)", "+".join(PLATFORMS), status))
    return out
