"""Expert parallelism: routed experts split over the ``expert`` mesh axis, tokens
exchanged between the shards that hold them and the shards that hold their experts.

    y = capibara.kernels.moe.run_experts(tokens, expert_ids, weights, expert_fn, params,
                                         num_experts=E)

``expert_fn(params, x_sorted, group_sizes) -> y_sorted`` computes the experts whose
weights ``params`` (a pytree of ``[E_local, ...]`` arrays) it is given, on rows sorted
by expert; ``run_experts`` decides which rows each shard's experts see.

Without an ``expert`` mesh axis (or when it does not divide ``E`` or the tokens) it is
``permute`` -> ``expert_fn`` -> ``unpermute`` on the whole token set, and the grouped
matmuls inside ``expert_fn`` split the experts themselves (every shard sees every
token; see ``capibara.kernels._mesh``). With one, it runs per shard of the tokens
(split over ``data`` x ``expert``) and exchanges them, dropless, in one of two forms:

* ``"ragged_all_to_all"`` (TPU and GPU): every shard sorts its tokens by expert and
  sends each destination shard exactly the rows of its experts with
  ``jax.lax.ragged_all_to_all``; the receiver sorts what it got by local expert, runs
  ``expert_fn``, and the results travel back the same way. Traffic: each routed row
  twice. XLA:CPU has no ragged all-to-all, so on this machine the form is exported for
  TPU, and its offset arithmetic runs with ``emulated_ragged_all_to_all`` (the
  collective's documented semantics built from ``all_gather``) in the tests.
* ``"all_gather"`` (CPU, and anywhere): every shard gathers the tokens of its
  ``expert`` group, runs its local experts on the rows routed to them (the rest are
  dropped by ``permute`` and cost no FLOPs), and ``psum_scatter`` returns each token's
  sum to its shard. Traffic: the tokens ``X`` times, ``X`` = the ``expert`` axis size.

``exchange=None`` picks per platform at lowering time (``ragged_all_to_all`` on TPU and
GPU, ``all_gather`` elsewhere). Both give the single-device result; the combine is
summed in f32.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from capibara.kernels import _mesh, _platform
from capibara.kernels.moe.permutation import permute, unpermute

__all__ = ["EXCHANGES", "emulated_ragged_all_to_all", "run_experts"]

EXPERT_AXIS = _mesh.LOGICAL_TO_MESH["experts"]
DATA_AXIS = _mesh.LOGICAL_TO_MESH["batch"]
EXCHANGES: tuple[str, ...] = ("ragged_all_to_all", "all_gather")

ExpertFn = Callable[[object, jax.Array, jax.Array], jax.Array]


def run_experts(
    tokens: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    expert_fn: ExpertFn,
    params: object,
    *,
    num_experts: int,
    exchange: str | None = None,
    ragged_all_to_all: Callable[..., jax.Array] | None = None,
) -> jax.Array:
    """Each token's router-weighted sum of its experts' outputs, expert-parallel on a mesh.

    Args:
      tokens: ``[t, d]``.
      expert_ids: int ``[t, k]``; an id outside ``[0, E)`` drops that choice.
      weights: ``[t, k]`` router weights.
      expert_fn: ``expert_fn(params, x_sorted [r, d], group_sizes int32 [E']) ->
        [r, d]`` for the ``E'`` experts of ``params``; rows past the groups are zeros
        and must come out as zeros (``grouped_matmul`` does).
      params: pytree of ``[E, ...]`` expert weights (on a mesh, split over ``expert``
        along their first dimension).
      num_experts: ``E``.
      exchange: ``None`` (per platform), ``"ragged_all_to_all"`` or ``"all_gather"``
        (see the module docstring). No effect without an ``expert`` mesh axis.
      ragged_all_to_all: the collective the ragged form uses (default
        ``jax.lax.ragged_all_to_all``); tests pass ``emulated_ragged_all_to_all`` to
        run that form on XLA:CPU.

    Returns:
      ``[t, d]`` in ``tokens.dtype``.
    """
    if exchange is not None and exchange not in EXCHANGES:
        raise ValueError(
            f"exchange={exchange!r} is not one of None, " + ", ".join(map(repr, EXCHANGES))
        )
    for leaf in jax.tree.leaves(params):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != num_experts:
            raise ValueError(
                f"every expert parameter needs a leading dimension of num_experts="
                f"{num_experts}, got shape {jnp.shape(leaf)}"
            )

    def local(tokens, expert_ids, weights, params):
        x_sorted, group_sizes, order = permute(tokens, expert_ids, num_experts)
        return unpermute(expert_fn(params, x_sorted, group_sizes), order, weights)

    mesh = _mesh.active_mesh((tokens, params))
    axes = _mesh.free_axes(mesh) if mesh is not None else {}
    num_shards = axes.get(EXPERT_AXIS, 1)
    if num_shards == 1:
        return local(tokens, expert_ids, weights, params)
    token_axes = tuple(a for a in (DATA_AXIS, EXPERT_AXIS) if a in axes)
    token_shards = 1
    for a in token_axes:
        token_shards *= axes[a]
    if num_experts % num_shards or tokens.shape[0] % token_shards:
        warnings.warn(
            f"run_experts: {num_experts} experts and {tokens.shape[0]} tokens cannot both "
            f"be split over mesh axes {dict((a, axes[a]) for a in token_axes)}; every "
            f"{EXPERT_AXIS!r} shard computes its experts on all tokens instead",
            _mesh.MeshLayoutWarning,
            stacklevel=2,
        )
        return local(tokens, expert_ids, weights, params)

    # Rows of an exchanged form carry global ids: keep dropped choices dropped.
    expert_ids = jnp.where(
        (expert_ids >= 0) & (expert_ids < num_experts), expert_ids, num_experts
    ).astype(jnp.int32)
    common = dict(expert_fn=expert_fn, num_experts=num_experts, num_shards=num_shards)
    gather_form = functools.partial(_all_gather_exchange, **common)
    collective = ragged_all_to_all or jax.lax.ragged_all_to_all
    ragged_form = functools.partial(_ragged_exchange, collective=collective, **common)
    if exchange == "all_gather":
        per_shard = gather_form
    elif exchange == "ragged_all_to_all" and ragged_all_to_all is not None:
        per_shard = ragged_form
    elif exchange == "ragged_all_to_all":

        def per_shard(*args):
            message = (
                "run_experts: exchange='ragged_all_to_all' needs a TPU or GPU (XLA:CPU "
                "has no ragged all-to-all); use exchange='all_gather' or None here"
            )
            return jax.lax.platform_dependent(
                *args, cpu=_platform._fail_at_lowering(ragged_form, message), default=ragged_form
            )
    else:

        def per_shard(*args):
            return jax.lax.platform_dependent(*args, cpu=gather_form, default=ragged_form)

    tok = PartitionSpec(token_axes)
    mapped = jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(tok, tok, tok, jax.tree.map(lambda _: PartitionSpec(EXPERT_AXIS), params)),
        out_specs=tok,
        # Only the token axes go manual: the grouped matmuls inside expert_fn split the
        # remaining ones (``model``) themselves.
        axis_names=frozenset(token_axes),
        check_vma=False,
    )
    return mapped(tokens, expert_ids, weights, params)


def _all_gather_exchange(
    tokens, expert_ids, weights, params, *, expert_fn, num_experts, num_shards
):
    """Per shard: gather the group's tokens, run the local experts, scatter the sums."""
    local_experts = num_experts // num_shards
    first = jax.lax.axis_index(EXPERT_AXIS) * local_experts
    gather = functools.partial(jax.lax.all_gather, axis_name=EXPERT_AXIS, tiled=True)
    all_tokens, all_ids, all_weights = gather(tokens), gather(expert_ids), gather(weights)
    local_ids = all_ids - first  # other shards' experts fall outside [0, E_local): dropped
    x_sorted, group_sizes, order = permute(all_tokens, local_ids, local_experts)
    y_sorted = expert_fn(params, x_sorted, group_sizes)
    partial_sums = unpermute(y_sorted.astype(jnp.float32), order, all_weights)
    out = jax.lax.psum_scatter(partial_sums, EXPERT_AXIS, scatter_dimension=0, tiled=True)
    return out.astype(tokens.dtype)


def _ragged_exchange(
    tokens, expert_ids, weights, params, *, expert_fn, num_experts, num_shards, collective
):
    """Per shard: send each routed row to its expert's shard, compute, send it back."""
    local_experts = num_experts // num_shards
    me = jax.lax.axis_index(EXPERT_AXIS)
    x_sorted, group_sizes, order = permute(tokens, expert_ids, num_experts)
    rows = x_sorted.shape[0]
    # sent[s, j, e]: rows shard s sends to shard j for j's local expert e (all shards).
    sent = jax.lax.all_gather(group_sizes.reshape(num_shards, local_experts), EXPERT_AXIS)
    to_shard = sent.sum(axis=2)  # [src, dst]
    send_sizes = to_shard[me]
    input_offsets = jnp.cumsum(send_sizes) - send_sizes
    # My rows land on shard j after those of the shards before me.
    before_me = jnp.arange(num_shards) < me
    output_offsets = jnp.sum(jnp.where(before_me[:, None], to_shard, 0), axis=0)
    recv_sizes = to_shard[:, me]
    # Dropless worst case: every shard's every row routed to me.
    capacity = num_shards * rows
    received = collective(
        x_sorted,
        jnp.zeros((capacity, x_sorted.shape[1]), x_sorted.dtype),
        input_offsets,
        send_sizes,
        output_offsets,
        recv_sizes,
        axis_name=EXPERT_AXIS,
    )
    # Received rows come by source shard, each source's by local expert: sort them by
    # local expert (rows past the last source get id E_local and sort last).
    counts = sent[:, me, :].reshape(-1)  # [(src, e)]
    ends = jnp.cumsum(counts)
    segment = jnp.searchsorted(ends, jnp.arange(capacity), side="right")
    local_id = jnp.where(segment < counts.size, segment % local_experts, local_experts)
    by_expert = jnp.argsort(local_id, stable=True)
    local_sizes = sent[:, me, :].sum(axis=0).astype(jnp.int32)
    y_by_expert = expert_fn(params, received[by_expert], local_sizes)
    y_received = jnp.zeros_like(y_by_expert).at[by_expert].set(y_by_expert)
    # Back the way they came: what I got from s (at my recv offset) returns to s's rows.
    recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
    return_offsets = jnp.sum(jnp.where(before_me[None, :], to_shard, 0), axis=1)
    y_sorted = collective(
        y_received,
        jnp.zeros((rows, y_received.shape[1]), y_received.dtype),
        recv_offsets,
        recv_sizes,
        return_offsets,
        send_sizes,
        axis_name=EXPERT_AXIS,
    )
    return unpermute(y_sorted, order, weights)


def emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """``jax.lax.ragged_all_to_all`` with one slice per peer, built from ``all_gather``
    (its documented semantics): for tests on backends without the collective.

    Every shard gathers all shards' operands and offsets and copies, from each source
    ``s``, ``operand_s[input_offsets_s[me] :][: send_sizes_s[me]]`` to
    ``output[output_offsets_s[me] :]``. ``recv_sizes`` must equal what the sources
    send (as the collective requires); it is not read. Memory: every operand on every
    shard.
    """
    del recv_sizes
    me = jax.lax.axis_index(axis_name)
    gather = functools.partial(jax.lax.all_gather, axis_name=axis_name)
    operands = gather(operand)  # [S, N, ...]
    starts, sizes, dests = (gather(a)[:, me] for a in (input_offsets, send_sizes, output_offsets))
    rows = jnp.arange(output.shape[0])
    result = output
    for s in range(operands.shape[0]):
        inside = (rows >= dests[s]) & (rows < dests[s] + sizes[s])
        source = jnp.clip(starts[s] + rows - dests[s], 0, operands.shape[1] - 1)
        mask = inside.reshape((-1,) + (1,) * (output.ndim - 1))
        result = jnp.where(mask, operands[s][source], result)
    return result
