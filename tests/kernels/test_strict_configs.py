"""Every op (forward and gradient, each implementation) and the model forward under
``jax_numpy_rank_promotion="raise"`` and ``jax_enable_checks=True``, against the same
call with default settings.

One subprocess (the settings are process-wide) computes everything with the default
settings, then switches them on and computes it again: every ``jit`` there wraps a new
function, so the second round is traced afresh under them. ``make test-strict`` runs
the whole op suite with them too (slower; not part of ``make test``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from capibara import kernels
    from capibara.core.config import preset
    from capibara.core.model import CapibaraModel

    def n(k, s):
        return jax.random.normal(jax.random.key(k), s)

    q, kv = n(0, (1, 16, 4, 32)), n(1, (1, 16, 2, 32))
    sparse = kernels.BlockSparseMatrix.from_dense(np.asarray(n(2, (32, 32))), (16, 16))
    sizes = jnp.array([8, 0, 4], jnp.int32)
    ops = {
        "flash": lambda x, kw: kernels.flash_attention(x, kv, kv, causal=True, **kw),
        "gmm": lambda x, kw: kernels.grouped_matmul(x[0, :, 0], n(3, (3, 32, 8)), sizes, **kw),
        "tgmm": lambda x, kw: kernels.transposed_grouped_matmul(
            x[0, :, 0], n(4, (16, 8)), sizes, **kw),
        "ragged_dot": lambda x, kw: kernels.ragged_dot(x[0, :, 0], n(3, (3, 32, 8)), sizes, **kw),
        "block_sparse": lambda x, kw: kernels.block_sparse_matmul(x[0, :, 0], sparse, **kw),
    }
    model = CapibaraModel(preset("tiny-moe"), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.arange(16).reshape(2, 8), jnp.int32)

    def run_all():
        out = {}
        for name, op in ops.items():
            for impl, kw in (("default", {}), ("xla", {"implementation": "xla"}),
                             ("interpret", {"interpret": True}),
                             ("reference", {"implementation": "reference"})):
                fwd = jax.jit(lambda x: op(x, kw))(q)
                grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(op(x, kw)))))(q)
                out[f"{name} {impl}"] = [np.asarray(fwd).tolist(), np.asarray(grad).tolist()]
        out["model"] = np.asarray(nnx.jit(lambda m, t: m(t)[0])(model, tokens)).tolist()
        return out

    default = run_all()
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_enable_checks", True)
    print("RESULT" + json.dumps({"default": default, "strict": run_all()}))
    """
)


def _run() -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CAPIBARA_STRICT": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_ops_and_model_run_under_strict_settings_with_the_same_results():
    import numpy as np

    results = _run()
    strict, default = results["strict"], results["default"]
    assert strict.keys() == default.keys() and len(strict) == 21
    for key in default:
        for got, want in zip(strict[key], default[key], strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
