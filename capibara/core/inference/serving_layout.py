"""The engine's copy of a model with its weights in the layout decoding reads fastest.

A decode step multiplies a few rows by every weight, so it is bound by how fast the
weights stream from memory. ``capibara.kernels.decode_matmul``'s CPU kernel streams a weight
stored ``[out, in]`` (each output the dot product of two contiguous rows) faster than
``[in, out]``: on the 2-core development machine the ``small`` model's decode
matmuls took 3.7 instead of 5.1 ms at batch 1, 4.7 instead of 5.9 ms at batch 8
(and XLA's own dot was ~10 % faster too). The copy shares every other parameter with
the model it came from; the model itself is not changed.
"""

from __future__ import annotations

from flax import nnx

from capibara.core.layers import Linear
from capibara.core.model import OutputHead


def out_in_copy(model):
    """A model sharing ``model``'s parameters, with dense linear kernels (and an untied
    ``lm_head``) stored as transposed ``[out, in]`` copies. Same outputs."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)  # new modules over the same arrays
    for _, module in nnx.iter_graph(copy):
        if isinstance(module, Linear | OutputHead):
            module.use_out_in_layout()
    return copy
