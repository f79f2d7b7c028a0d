"""``quantize``: a model's linears to int8 / int4 weights, run by ``quantized_matmul``."""

from __future__ import annotations

import dataclasses

from capibara.kernels.quantized_matmul import quantize as quantize_weight
from capibara.sparsity import TARGETS, _targets


@dataclasses.dataclass(frozen=True)
class QuantizeReport:
    """What ``quantize`` changed.

    Attributes:
      linears: dotted paths of the linears quantized.
      float_bytes: bytes of those kernels before (their parameter dtype).
      quantized_bytes: bytes stored after (values, scales, mins).
    """

    linears: tuple[str, ...]
    float_bytes: int
    quantized_bytes: int

    @property
    def ratio(self) -> float:
        """``quantized_bytes / float_bytes``: the fraction of the weight bytes a matmul
        now streams."""
        return self.quantized_bytes / self.float_bytes if self.float_bytes else 1.0


def quantize(
    model,
    bits: int = 8,
    group: int | None = None,
    *,
    zero_point: bool | None = None,
    targets: tuple[str, ...] = TARGETS,
) -> QuantizeReport:
    """Quantizes the chosen linears of ``model`` in place (round to nearest).

    Each targeted ``Linear``'s ``[in, out]`` kernel becomes a ``QuantizedWeight``
    (``capibara.kernels.quantize``: int8 per output channel by default, int4 in groups
    of 32 with a min by default) and from then on runs through
    ``capibara.kernels.quantized_matmul`` with the model's kernel implementation. Not
    targeted: the embedding / tied output head, norms, and MoE experts (grouped
    matmuls).

    Args:
      model: a ``CapibaraModel`` (or any module holding ``Linear`` layers).
      bits: 8 or 4.
      group: rows per scale (``None``: per channel for 8 bits, 32 for 4 bits).
      zero_point: 4 bits: store a min per group (default) or not (symmetric).
      targets: subset of ``("mlp", "attention")``.

    Returns:
      ``QuantizeReport`` with the bytes before and after.
    """
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {targets}")
    # Quantize every kernel first, then swap them in: a bad request changes nothing.
    planned = []
    for path, linear in list(_targets(model, tuple(targets))):
        if linear.quant_format is not None:
            raise ValueError(f"{path} is already quantized")
        if linear.sparse_layout is not None:
            raise ValueError(f"{path} is block-sparse: quantize before or instead of sparsify")
        kernel = linear.kernel.get_value()
        try:
            qw = quantize_weight(kernel, bits, group, zero_point=zero_point)
        except ValueError as e:
            raise ValueError(f"{path} ({list(kernel.shape)}): {e}") from e
        planned.append((path, linear, kernel.size * kernel.dtype.itemsize, qw))
    for _, linear, _, qw in planned:
        linear.make_quantized(qw)
    return QuantizeReport(
        tuple(p for p, *_ in planned),
        sum(b for _, _, b, _ in planned),
        sum(qw.nbytes for *_, qw in planned),
    )
