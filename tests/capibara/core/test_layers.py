"""The serving helpers of ``capibara.core.layers``: their dtype workarounds change no value."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara.core.layers import matmul_f32
from capibara.kernels.testing import assert_close


def _normal(shape, dtype, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# One row of a 16-bit input takes the padded two-row path; the others do not.
@pytest.mark.parametrize("lead", [(1,), (1, 1), (3,), (2, 5)], ids=lambda s: f"lead={s}")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("w_transposed", [False, True], ids=["w=[k,n]", "w=[n,k]"])
def test_matmul_f32_equals_an_f32_product(lead, dtype, w_transposed):
    x = _normal((*lead, 48), dtype, 0)
    w = _normal((40, 48) if w_transposed else (48, 40), dtype, 1)
    got = jax.jit(matmul_f32, static_argnames="w_transposed")(x, w, w_transposed=w_transposed)
    w32 = w.astype(jnp.float32)
    want = jnp.matmul(
        x.astype(jnp.float32), w32.T if w_transposed else w32, precision=jax.lax.Precision.HIGHEST
    )
    assert got.dtype == jnp.float32 and got.shape == (*lead, 40)
    # Inputs are exact in f32 and accumulation is f32: the f32 tolerance holds for bf16 too.
    assert_close(got, want, jnp.float32, scale=10)
