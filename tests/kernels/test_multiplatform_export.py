"""One export for ``["tpu", "cpu"]`` of every op with ``implementation=None``: the TPU
half holds the Mosaic kernels, and the CPU half, serialized, deserialized and run here,
equals the reference (``capibara.kernels.multiplatform``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara.kernels import multiplatform

CASES = {case.name: case for case in multiplatform.cases()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_cpu_half_of_a_tpu_cpu_export_equals_the_reference(name):
    case = CASES[name]
    exported = multiplatform.export(case)
    assert exported.platforms == ("tpu", "cpu")
    text = exported.mlir_module()
    assert ("tpu_custom_call" in text) == case.mosaic, name
    restored = jax.export.deserialize(exported.serialize())
    got = restored.call(*case.args)
    want = case.reference(*case.args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = max(1.0, float(jnp.max(jnp.abs(w.astype(jnp.float32)))))
        tol = 2e-2 if w.dtype == jnp.bfloat16 else 2e-5
        err = float(np.max(np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32))))
        assert err <= tol * scale, (name, err)


def test_the_tpu_half_holds_no_native_cpu_kernel():
    # decode_matmul's CPU branch is a native FFI call: lowered for CPU only, so the TPU
    # module never meets a custom call it does not know.
    exported = jax.export.export(
        jax.jit(CASES["decode_matmul"].op),
        platforms=["tpu"],
    )(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in CASES["decode_matmul"].args))
    assert "capibara_decode_matmul" not in exported.mlir_module()


def test_make_lower_prints_a_row_per_op():
    rows = multiplatform.rows()
    assert [r[0].split()[0] for r in rows] == [c.name for c in multiplatform.cases()]
    assert all(r[2].startswith("ok") for r in rows), rows
