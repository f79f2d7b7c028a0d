"""The engine's copy of a model with its weights in the layout decoding reads fastest.

A decode step multiplies a few rows by every weight, so it is bound by how fast the
weights stream from memory. Two changes make them stream faster, neither changing
the outputs:

* Fused projections: q, k and v (and gate and up) read as one concatenated weight,
  so a decode step makes one product where it made three (two), each a longer
  stream (``Attention.fuse_projections``, ``SwiGLU.fuse_projections``).
* ``[out, in]`` kernels where ``kernels.decode_matmul``'s CPU kernel runs: it
  streams a weight stored ``[out, in]`` (each output the dot product of two
  contiguous rows) faster than ``[in, out]``: on the 2-core development machine the
  ``small`` model's decode matmuls took 3.7 instead of 5.1 ms at batch 1, 4.7 instead
  of 5.9 ms at batch 8 (and XLA's own dot was ~10 % faster too).

The copy shares every other parameter with the model it came from; the model itself
is not changed. Fused and transposed kernels are new arrays (the copy holds them
beside the model's).
"""

from __future__ import annotations

from flax import nnx

from capibara.core.layers import Attention, Linear, SwiGLU
from capibara.core.model import OutputHead


def serving_copy(model, *, out_in: bool = True, fuse: bool = True):
    """A model sharing ``model``'s parameters, with dense linear kernels (and an untied
    ``lm_head``) stored as transposed ``[out, in]`` copies when ``out_in``, and q/k/v
    and gate/up fused when ``fuse`` (block-sparse linears keep theirs). Same outputs."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)  # new modules over the same arrays
    modules = [module for _, module in nnx.iter_graph(copy)]
    for module in modules:
        if out_in and isinstance(module, Linear | OutputHead):
            module.use_out_in_layout()
    for module in modules:  # after the transposition: fused along the output axis
        if fuse and isinstance(module, Attention | SwiGLU):
            module.fuse_projections()
    return copy
