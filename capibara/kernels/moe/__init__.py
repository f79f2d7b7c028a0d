"""Mixture-of-Experts token routing: permutation and expert-parallel dispatch.

    x_sorted, group_sizes, order = capibara.kernels.moe.permute(x, expert_ids, num_experts)
    y = capibara.kernels.moe.unpermute(out_sorted, order, router_weights)   # [t, d]
    y = capibara.kernels.moe.run_experts(x, expert_ids, router_weights, expert_fn, params,
                                         num_experts=num_experts)         # on a mesh too

``permutation.py``: sort tokens by expert and scatter the results back (one device,
or every device on all its tokens). ``expert_parallel.py``: the same on a mesh with an
``expert`` axis, the tokens exchanged between shards.
"""

from capibara.kernels.moe.expert_parallel import (
    EXCHANGES,
    emulated_ragged_all_to_all,
    run_experts,
)
from capibara.kernels.moe.permutation import Permutation, permute, unpermute

__all__ = [
    "EXCHANGES",
    "Permutation",
    "emulated_ragged_all_to_all",
    "permute",
    "run_experts",
    "unpermute",
]
