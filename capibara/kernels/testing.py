"""Tolerances for comparing an implementation against its reference: the one table.

Compare in f32 against a reference computed at ``Precision.HIGHEST``. The atol is per
dtype of the *inputs*; rtol is atol / 10; gradients get twice the atol because they
chain two matmuls' worth of rounding.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

ATOL: dict[str, float] = {
    "float32": 1e-5,
    "bfloat16": 1e-2,
    "float16": 1e-3,
}


def tolerance(dtype, *, grad: bool = False, scale: float = 1.0) -> dict[str, float]:
    """``dict(atol=..., rtol=...)`` for ``np.testing.assert_allclose``.

    Args:
      dtype: dtype of the op's inputs.
      grad: a gradient (2x atol).
      scale: magnitude of the compared values, e.g. ``sqrt(K)`` for a K-long dot of
        unit normals: rounding error grows with it, so atol is relative to it.
    """
    atol = ATOL[jnp.dtype(dtype).name] * (2.0 if grad else 1.0) * scale
    return {"atol": atol, "rtol": atol / 10 / scale}


def assert_close(actual, expected, dtype, *, grad: bool = False, scale: float = 1.0, err_msg=""):
    """Asserts ``actual`` matches ``expected`` (both cast to f32) within ``tolerance``."""
    np.testing.assert_allclose(
        np.asarray(jnp.asarray(actual, jnp.float32)),
        np.asarray(jnp.asarray(expected, jnp.float32)),
        err_msg=err_msg,
        **tolerance(dtype, grad=grad, scale=scale),
    )
