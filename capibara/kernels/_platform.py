"""Which implementation of an op runs on which platform: the one table in the package.

Every public op takes ``implementation: None | "pallas" | "xla" | "reference"`` and
``interpret: bool``. This module turns that pair into a function to call:

* ``None`` picks the best implementation per platform, decided at *lowering* time
  through ``jax.lax.platform_dependent`` (never ``jax.default_backend()`` at trace
  time), so ``jax.export(..., platforms=["tpu"])`` on a CPU host exports the TPU kernel.
* ``"pallas"`` is never refused while tracing. Lowered for a platform that has no
  Pallas kernel for the op (CPU without ``interpret=True``, GPU today) it raises a
  ``ValueError`` that names the implementations that do run there.
* ``"xla"`` and ``"reference"`` are plain JAX and run everywhere.
* ``interpret=True`` runs the Pallas kernel through the Pallas TPU interpreter on
  any backend (TPU semantics such as scalar prefetch and VMEM scratch simulated).
* ``"native"``, for the ops that have one: a C++ kernel for XLA:CPU built on this
  machine. When the op hands one to ``dispatch`` (it is built and takes these
  inputs), ``None`` runs it on CPU instead of ``BEST_IMPLEMENTATION["cpu"]``, and an
  explicit ``"native"`` lowered for any other platform raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

Implementation = Literal["pallas", "xla", "reference"]
IMPLEMENTATIONS: tuple[str, ...] = ("pallas", "xla", "reference")

# platform -> implementation that `implementation=None` runs there. Platforms not
# listed (rocm, ...) use "default". GPU runs xla until a Mosaic GPU kernel exists.
BEST_IMPLEMENTATION: dict[str, str] = {
    "tpu": "pallas",
    "cuda": "xla",
    "cpu": "xla",
    "default": "xla",
}

# The platform a "native" kernel (C++ through XLA's FFI) is built for.
NATIVE_PLATFORM = "cpu"

# platform -> implementations that can be lowered there without interpret mode.
RUNNABLE: dict[str, tuple[str, ...]] = {
    "tpu": ("pallas", "xla", "reference"),
    "cuda": ("xla", "reference"),
    "cpu": ("xla", "reference"),
    "default": ("xla", "reference"),
}


def interpret_params(interpret: bool):
    """The ``interpret=`` value for a Pallas TPU ``pallas_call``.

    ``pltpu.InterpretParams()`` simulates TPU semantics on any backend: scalar
    prefetch, VMEM scratch, DMAs skipped when a block index repeats; uninitialized
    memory reads as NaN and out-of-bounds reads raise, so a kernel test catches both.
    On a multi-device mesh and under ``jax_enable_checks`` it is Pallas' generic
    interpreter instead (``True``), for the reasons given below.
    """
    from jax.experimental.pallas import tpu as pltpu  # only the kernels need Pallas

    if not interpret:
        return False
    # Inside a shard_map over several devices, Pallas' generic interpreter: the TPU one
    # joins every kernel launch in a barrier across all devices, and two kernels in one
    # program (flash attention's backward) deadlocked on 8 CPU devices.
    mesh = jax.sharding.get_abstract_mesh()
    if any(mesh.shape[a] > 1 for a in getattr(mesh, "manual_axes", ())):
        return True
    # Under jax_enable_checks, JAX refuses effects inside a custom_vjp, and the TPU
    # interpreter runs on IO callbacks (effects): use the generic interpreter, pure JAX.
    if jax.config.jax_enable_checks:
        return True
    return pltpu.InterpretParams()


def validate_implementation(implementation: str | None, *, native: bool = False) -> None:
    """Raises ``ValueError`` for anything but ``None`` or a known implementation name
    (``"native"`` too when the op has a native kernel)."""
    names = (*IMPLEMENTATIONS, "native") if native else IMPLEMENTATIONS
    if implementation is not None and implementation not in names:
        raise ValueError(
            f"implementation={implementation!r} is not one of None, "
            + ", ".join(repr(i) for i in names)
        )


def dispatch(
    op_name: str,
    implementation: str | None,
    interpret: bool,
    impls: dict[str, Callable[..., object]],
) -> Callable[..., object]:
    """Returns the function that runs ``op_name`` for this implementation choice.

    Args:
      op_name: public name of the op, used in error messages.
      implementation: ``None`` (best per platform), ``"pallas"``, ``"xla"`` or
        ``"reference"``.
      interpret: run the Pallas kernel in the interpreter (any platform).
      impls: implementation name -> function with the op's positional signature. The
        ``"pallas"`` entry must already carry ``interpret`` if the caller wants it; an
        op without a Pallas kernel leaves it out (``None`` then runs ``"xla"`` on TPU
        too, and ``"pallas"`` or ``interpret=True`` raise). A ``"native"`` entry only
        where that kernel is built and takes the inputs (the op raises for an explicit
        ``"native"`` otherwise).

    Returns:
      A function of the same positional arguments. For ``None`` and compiled
      ``"pallas"`` it is a ``jax.lax.platform_dependent`` switch resolved at lowering.
    """
    validate_implementation(implementation, native="native" in impls)
    if interpret and implementation not in (None, "pallas"):
        raise ValueError(
            f"{op_name}: interpret=True runs the Pallas kernel, but "
            f"implementation={implementation!r} was asked for"
        )
    if (implementation == "pallas" or interpret) and "pallas" not in impls:
        raise ValueError(
            f"{op_name}: there is no Pallas kernel (implementations: "
            + ", ".join(sorted(impls))
            + ")"
        )
    if implementation in ("xla", "reference"):
        return impls[implementation]
    if implementation == "native":
        native = impls["native"]
        message = f"{op_name}: implementation='native' is a kernel for {NATIVE_PLATFORM} only"

        def native_or_error(*args):
            return jax.lax.platform_dependent(
                *args,
                **{NATIVE_PLATFORM: native},
                default=_fail_at_lowering(native, message),
            )

        return native_or_error
    if interpret:
        return impls["pallas"]
    if implementation == "pallas":
        pallas = impls["pallas"]
        message = _unavailable_message(op_name, "pallas")

        def pallas_or_error(*args):
            return jax.lax.platform_dependent(
                *args, tpu=pallas, default=_fail_at_lowering(pallas, message)
            )

        return pallas_or_error

    def best(*args):
        branches = {
            platform: impls[name]
            for platform, name in BEST_IMPLEMENTATION.items()
            if platform != "default" and name in impls
        }
        if "native" in impls:
            branches[NATIVE_PLATFORM] = impls["native"]
        return jax.lax.platform_dependent(
            *args, **branches, default=impls[BEST_IMPLEMENTATION["default"]]
        )

    return best


# -- A branch that fails at lowering time ------------------------------------------
#
# Explicit implementation="pallas" must trace on any host (so it can be exported for
# TPU from a CPU), yet fail clearly when actually compiled for CPU or GPU. The
# default branch of the platform switch binds this primitive: it has the right output
# avals, and its lowering rule -- reached only when lowering for a non-TPU platform --
# raises the error.

_unavailable_p = Primitive("capibara_unavailable_implementation")
_unavailable_p.multiple_results = True
_unavailable_p.def_abstract_eval(lambda *args, out_avals, message: out_avals)


def _raise_at_lowering(ctx, *args, out_avals, message):
    platforms = ", ".join(ctx.module_context.platforms)
    raise ValueError(f"{message} (lowering for platform(s): {platforms})")


def _raise_eagerly(*args, out_avals, message):
    raise ValueError(f"{message} (running eagerly on {jax.default_backend()})")


def _batch(args, dims, *, out_avals, message):
    """Under vmap: the same failing branch with a leading batch axis on its outputs
    (its operands only carry the avals along, so they pass as they are)."""
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    avals = tuple(jax.core.ShapedArray((size, *a.shape), a.dtype) for a in out_avals)
    outs = _unavailable_p.bind(*args, out_avals=avals, message=message)
    return outs, [0] * len(outs)


mlir.register_lowering(_unavailable_p, _raise_at_lowering)
_unavailable_p.def_impl(_raise_eagerly)
batching.primitive_batchers[_unavailable_p] = _batch


def _fail_at_lowering(like: Callable[..., object], message: str) -> Callable[..., object]:
    """A branch with the same outputs as ``like`` whose lowering raises ``message``.

    It is differentiable (zero cotangents) so that ``jax.grad`` of an explicit
    ``"pallas"`` call traces on any host; only lowering it fails.
    """

    @jax.custom_vjp
    def branch(*args):
        out_shapes = jax.eval_shape(like, *args)
        leaves, treedef = jax.tree.flatten(out_shapes)
        avals = tuple(jax.core.ShapedArray(s.shape, s.dtype) for s in leaves)
        outs = _unavailable_p.bind(*jax.tree.leaves(args), out_avals=avals, message=message)
        return jax.tree.unflatten(treedef, outs)

    def branch_fwd(*args):
        return branch(*args), args

    def branch_bwd(args, _):
        return jax.tree.map(_zero_cotangent, args)

    branch.defvjp(branch_fwd, branch_bwd)
    return branch


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def _unavailable_message(op_name: str, implementation: str) -> str:
    runnable = "; ".join(f"{platform}: {', '.join(names)}" for platform, names in RUNNABLE.items())
    return (
        f"{op_name}: implementation={implementation!r} has a compiled kernel only on TPU. "
        f"Pass interpret=True to run it in the Pallas interpreter, or pick an "
        f"implementation that runs on this platform ({runnable})"
    )


# -- Platform-specific kernels in a multi-platform export ---------------------------
#
# ``jax.export(f, platforms=["tpu", "cpu"])`` lowers every kept branch of a
# ``platform_dependent`` for *all* the module's platforms: the TPU branch's compiled
# ``pallas_call`` was also lowered for CPU (and raised "Only interpret mode is supported
# on CPU backend"), and the CPU branch's native FFI call would land in the TPU module as
# a custom call TPU does not know. ``only_on(platform, call)`` binds such a call through
# a primitive whose lowering is per platform: the call on its platform, zeros elsewhere.
# The zeros are dead code: at run time the platform switch never takes that branch.

_platform_only_p = Primitive("capibara_platform_only")
_platform_only_p.multiple_results = True
_platform_only_p.def_abstract_eval(lambda *args, call, platform, out_avals: out_avals)
# Eagerly there is one platform, the one running: call the kernel as it is.
_platform_only_p.def_impl(lambda *args, call, platform, out_avals: call(*args))


def only_on(platform: str, call: Callable[..., object]) -> Callable[..., object]:
    """``call`` (a kernel for ``platform``, any pytree in and out), lowered for
    ``platform`` only; same results."""

    def run(*operands):
        flat, in_tree = jax.tree.flatten(operands)
        leaves, out_tree = jax.tree.flatten(jax.eval_shape(call, *operands))
        avals = tuple(jax.core.ShapedArray(s.shape, s.dtype) for s in leaves)
        outs = _platform_only_p.bind(
            *flat, call=_FlatCall(call, in_tree), platform=platform, out_avals=avals
        )
        return jax.tree.unflatten(out_tree, outs)

    return run


def pallas_call(*args, **kwargs):
    """``pl.pallas_call`` with the same arguments; a compiled (not interpret) kernel is
    lowered for TPU only (``only_on``)."""
    from jax.experimental import pallas as pl

    call = pl.pallas_call(*args, **kwargs)
    return call if kwargs.get("interpret") else only_on("tpu", call)


class _FlatCall:
    """``call`` on flat operands returning flat outputs (hashable by identity)."""

    def __init__(self, call, in_tree):
        self.call, self.in_tree = call, in_tree

    def __call__(self, *flat):
        return jax.tree.leaves(self.call(*jax.tree.unflatten(self.in_tree, flat)))


def _lower_platform_only(ctx, *args, call, platform, out_avals):
    def zeros(*_):
        return [jnp.zeros(a.shape, a.dtype) for a in out_avals]

    # NOTE: private (jax._src) in JAX 0.10.2: the public mlir module has no per-platform
    # lowering helper; tests/kernels/test_multiplatform_export.py guards it.
    from jax._src.interpreters.mlir import lower_per_platform

    return lower_per_platform(
        ctx,
        "capibara_platform_only",
        {platform: mlir.lower_fun(call, multiple_results=True)},
        mlir.lower_fun(zeros, multiple_results=True),
        (),  # effects: a compiled kernel has none
        *args,
    )


def _batch_platform_only(args, dims, *, call, platform, out_avals):
    """Under vmap: the vmapped call (the kernel batches itself), bound again."""
    outs = only_on(platform, jax.vmap(call, in_axes=dims))(*args)
    return outs, [0] * len(outs)


mlir.register_lowering(_platform_only_p, _lower_platform_only)
batching.primitive_batchers[_platform_only_p] = _batch_platform_only
