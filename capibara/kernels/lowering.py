"""Lowering check: every Pallas kernel in the package exports for its target platform.

The Pallas interpreter ignores TPU tiling rules (last two block dims divisible by
(8, 128), supported primitives, ...); Mosaic enforces them when the kernel is lowered.
``jax.export(..., platforms=["tpu"])`` lowers without a TPU, so this CPU host catches
those errors. Each op sub-package lists its cases in ``lowering_cases()``; ``make
lower`` (``python -m capibara.kernels.lowering``) prints the table and tests assert each case.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import time
from collections.abc import Callable, Sequence

import jax

# Op sub-packages that define ``lowering_cases() -> list[LoweringCase]``.
OP_MODULES: tuple[str, ...] = (
    "capibara.kernels.block_sparse",
    "capibara.kernels.flash_attention",
    "capibara.kernels.grouped_matmul",
    "capibara.kernels.paged_attention",
    "capibara.kernels.quantized_matmul",
)


@dataclasses.dataclass(frozen=True)
class LoweringCase:
    """One kernel to lower: ``fn(*args)`` must contain ``custom_call`` for ``platform``.

    Attributes:
      name: ``"<op>.<kernel>"``, e.g. ``"block_sparse.forward"``.
      fn: the function to export (jit-able, args are ``jax.ShapeDtypeStruct`` or arrays).
      args: example arguments (shapes only matter).
      platform: ``"tpu"`` (Mosaic) or ``"cuda"``.
      custom_call: substring that proves the kernel was lowered, not a fallback.
    """

    name: str
    fn: Callable
    args: Sequence
    platform: str = "tpu"
    custom_call: str = "tpu_custom_call"


def all_cases() -> list[LoweringCase]:
    cases = []
    for module in OP_MODULES:
        cases.extend(importlib.import_module(module).lowering_cases())
    return cases


def lower(case: LoweringCase) -> str:
    """Exports ``case`` and returns its StableHLO text; raises if the kernel is absent."""
    exported = jax.export.export(jax.jit(case.fn), platforms=[case.platform])(*case.args)
    text = exported.mlir_module()
    if case.custom_call not in text:
        raise AssertionError(f"{case.name}: no {case.custom_call!r} in the exported module")
    return text


def main() -> int:
    rows, failed = [], 0
    for case in all_cases():
        start = time.perf_counter()
        try:
            text = lower(case)
            status = f"ok ({text.count(case.custom_call)} {case.custom_call})"
        except Exception as e:  # report every kernel, then fail
            failed += 1
            status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        rows.append((case.name, case.platform, f"{time.perf_counter() - start:.1f}s", status))
    from capibara.kernels import multiplatform  # imports every op

    for name, platforms, status in multiplatform.rows():
        failed += status.startswith("FAILED")
        rows.append((name, platforms, "-", status))
    widths = [
        max(len(r[i]) for r in [("kernel", "platform", "time", "status"), *rows]) for i in range(4)
    ]
    for row in [("kernel", "platform", "time", "status"), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
