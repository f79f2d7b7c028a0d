"""Settings for every pytest run in the repository (tests and benchmarks).

CPU dispatch is made synchronous. JAX 0.10.2's Pallas TPU interpreter finishes each
kernel inside a host callback that runs jnp arithmetic; with asynchronous dispatch,
work the test thread queues meanwhile can deadlock that callback on a 2-core host
(seen as a suite stuck at ~3% CPU). Synchronous dispatch removes the overlap; it
changes no result, and benchmarks block on every result anyway.
"""

import os

import jax

jax.config.update("jax_cpu_enable_async_dispatch", False)

# CAPIBARA_STRICT=1 (``make test-strict``): the strict settings JAX's own test harness and
# many users run with. Every op must work under them.
if os.environ.get("CAPIBARA_STRICT") == "1":
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_enable_checks", True)
