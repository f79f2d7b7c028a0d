"""The jitted serving step at static shapes, and the host code that fills its inputs.

One compiled function does a whole step: ``max_slots`` decode rows (idle rows have
length 0) plus, optionally, ``prefill_rows`` prefill rows of one bucketed length
(rows without a prompt are padding), all through one
``CapibaraModel.forward_with_cache`` (the linears see every token of the step
together, so the weights are read once per step), then sampling. The KV cache is
donated, so XLA updates the pages in place.

A plan without prefill rows runs ``EngineConfig.decode_steps`` decode steps at most
in one program (``_decode_steps``: a loop over the same step, each step's tokens fed
to the next on the device), so the host's work between steps -- planning, filling
the inputs, dispatch, applying the tokens, ~0.5 ms of a ~6 ms batch-8 bf16 step of
the 125M model on 2 CPU cores -- is paid once per burst. Compiled shapes: one
decode program and one step per prefill bucket, whatever the workload:
``1 + len(buckets)`` at most.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from capibara.core.inference.kv_cache import SCRATCH_PAGE, allocate_cache
from capibara.core.inference.params import EngineConfig
from capibara.core.inference.sampling import SamplingBatch, sample
from capibara.core.inference.scheduler import StepPlan
from capibara.core.inference.serving_layout import out_in_copy
from capibara.core.layers import PagedBatch, dtype_of
from capibara.kernels.bit_views import from_bits, to_bits
from capibara.kernels.decode_matmul import native as decode_matmul_native
from capibara.sharding import shard


class _Structure:
    """The static half of the model: ``(graphdef, treedef of the state's leaves)``.

    jit hashes and compares its static arguments on every call. Hashing an nnx
    graphdef walks the whole module graph (~2 ms of Python per step for the 125M
    model, 10% of a batch-1 bf16 decode step on one core): the hash is computed
    once here, and the same runner's calls compare by identity.
    """

    __slots__ = ("_hash", "graphdef", "treedef")

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (
            isinstance(other, _Structure)
            and self._hash == other._hash
            and (self.graphdef, self.treedef) == (other.graphdef, other.treedef)
        )


def _forward_and_sample(model, cache, tokens, batch: PagedBatch, sampling: SamplingBatch):
    """``(tokens int32 [R], new cache, expert load or None)``: one step, then sampling.

    16-bit KV pools are kept as uint16 words between steps (``capibara.kernels.bit_views``):
    XLA:CPU copies a whole pool at each bf16 <-> uint16 bitcast crossing the jit
    boundary (or a loop's), and the KV writes (``capibara.kernels.rope_kv_write``) and the
    attention kernels take the words as they are. Stored as words, these bitcasts
    cancel inside the program and each layer writes in place."""
    dtype = dtype_of(model.config.compute_dtype)
    pools = [tuple(from_bits(p, dtype) for p in kv) for kv in cache]
    logits, pools, load = model.forward_with_cache(tokens, pools, batch)
    cache = [tuple(to_bits(p) for p in kv) for kv in pools]
    return sample(logits, sampling), cache, load


def _model(structure: _Structure, leaves):
    """The served model inside a jitted step. The parameters come as a flat list of
    arrays: flattening an nnx ``State`` (sorted, typed keys) on every call costs as
    much Python time as the hashing above."""
    return nnx.merge(structure.graphdef, jax.tree.unflatten(structure.treedef, leaves))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _step(structure: _Structure, leaves, cache, tokens, batch: PagedBatch, sampling: SamplingBatch):
    """``(tokens int32 [R], new cache, expert load or None)``: one step, then sampling.

    Module level with the model structure static, so engines serving the same
    model structure at the same sizes share compiled steps."""
    return _forward_and_sample(_model(structure, leaves), cache, tokens, batch, sampling)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=4)
def _decode_steps(
    structure: _Structure,
    max_steps: int,
    page_size: int,
    leaves,
    cache,
    num_steps,
    tokens,
    batch: PagedBatch,
    sampling: SamplingBatch,
):
    """``(tokens int32 [max_steps, Bd], new cache, summed expert load or None)``.

    ``num_steps`` (traced, ``1..max_steps``) decode steps of the ``Bd`` slots in one
    program: step ``i`` feeds back step ``i - 1``'s tokens and places each active row
    (``decode_lengths > 0``) at ``positions + i``, its k/v at that position's page of
    ``decode_page_table`` (which must already hold the pages of every step). Idle
    rows stay idle. Rows ``num_steps..`` of the result are zeros. The same tokens as
    ``num_steps`` calls of ``_step``: each step is that step's computation, the
    sampling counter advanced by one per step."""
    active = batch.decode_lengths > 0
    table = batch.decode_page_table

    def one_step(i, carry):
        cache, tokens, out, load_sum = carry
        # Each step computes from the weights as a single step does: XLA's loop-invariant
        # code motion would otherwise hoist whole-weight work out of the body, e.g. the
        # f32 conversion of the embedding table that a bf16 gather is lowered to (fused
        # into the gathered rows in one step; hoisted, ~100 MB written on every call).
        # The barrier ties the weights to the step index.
        step_leaves, _ = jax.lax.optimization_barrier((leaves, i))
        model = _model(structure, step_leaves)
        positions = jnp.where(active, batch.positions + i, 0)
        pages = jnp.take_along_axis(table, (positions // page_size)[:, None], axis=1)[:, 0]
        step_batch = dataclasses.replace(
            batch,
            positions=positions,
            write_pages=jnp.where(active, pages, SCRATCH_PAGE),
            write_offsets=jnp.where(active, positions % page_size, 0),
            decode_lengths=jnp.where(active, batch.decode_lengths + i, 0),
        )
        step_sampling = dataclasses.replace(sampling, counter=sampling.counter + i)
        tokens, cache, load = _forward_and_sample(model, cache, tokens, step_batch, step_sampling)
        if load_sum is not None:
            load_sum = load_sum + load
        return cache, tokens, out.at[i].set(tokens), load_sum

    out = jnp.zeros((max_steps, tokens.shape[0]), jnp.int32)
    load = _zero_load(_model(structure, leaves).config)
    cache, _, out, load = jax.lax.fori_loop(0, num_steps, one_step, (cache, tokens, out, load))
    return out, cache, load


def _zero_load(config):
    """f32 ``[moe layers, experts]`` zeros, or None for a dense model."""
    moe = sum(config.is_moe_layer(layer) for layer in range(config.num_layers))
    return jnp.zeros((moe, config.num_experts), jnp.float32) if moe else None


def _serves_out_in(config: EngineConfig, model_config) -> bool:
    """``EngineConfig.out_in_weights``; None: where the native decode matmul runs the
    model's products (CPU, bf16). XLA's f32 dot is slower on [out, in] weights at
    batch 8 (20.8 -> 26.8 ms a step), so f32 models keep their layout."""
    if config.out_in_weights is not None:
        return config.out_in_weights
    return (
        jax.default_backend() == "cpu"
        and dtype_of(model_config.compute_dtype) == jnp.bfloat16
        and decode_matmul_native.available()
    )


def _serving_mesh(model, config: EngineConfig):
    """The mesh the engine serves on (placing the model there if it is not yet), or None."""
    placed = [
        leaf.sharding.mesh
        for leaf in jax.tree.leaves(nnx.state(model))
        if isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding)
    ]
    own = next((m for m in placed if m.size > 1), None)
    if config.mesh is None:
        return own
    if own is None:
        shard(model, config.mesh)
    elif own != config.mesh:
        raise ValueError(
            f"EngineConfig.mesh {dict(config.mesh.shape)} differs from the mesh the model's "
            f"parameters are placed on {dict(own.shape)}"
        )
    return config.mesh


def pool_sharding(mesh, num_kv_heads: int) -> NamedSharding:
    """KV pools ``[Hkv, pages, page_size, D]`` split over kv heads on ``model`` (when it
    divides them; else replicated, and the kernels repeat the heads they need)."""
    model_axis = mesh.shape.get("model", 1)
    split = model_axis > 1 and num_kv_heads % model_axis == 0
    return NamedSharding(mesh, PartitionSpec("model" if split else None))


class ModelRunner:
    """Owns the device state (parameters, KV cache) and runs ``StepPlan`` s."""

    def __init__(self, model, config: EngineConfig):
        self.config = config
        self.model_config = model.config
        self.mesh = _serving_mesh(model, config)
        if _serves_out_in(config, model.config) and self.mesh is None:
            model = out_in_copy(model)
        self.model = model  # what the steps run (its arrays are the leaves below)
        graphdef, state = nnx.split(model)
        self.leaves, treedef = jax.tree.flatten(state)
        self.structure = _Structure(graphdef, treedef)
        pools = allocate_cache(model.config, config.num_pages, config.page_size)
        if self.mesh is not None:
            placement = pool_sharding(self.mesh, model.config.num_kv_heads)
            pools = [tuple(jax.device_put(p, placement) for p in kv) for kv in pools]
        self.cache = [tuple(to_bits(p) for p in kv) for kv in pools]
        # Step shapes this engine has run: each is compiled once per process (or found
        # in jit's cache when another engine compiled it first).
        self.shapes: set[int] = set()

    def run(self, plan: StepPlan) -> tuple[np.ndarray, np.ndarray | None]:
        """Runs one plan; returns the sampled tokens ``[plan.steps, max_slots + prefill
        rows]`` (step by step: decode rows by slot, then the prefill rows in
        ``plan.prefills`` order, then idle ones) and the expert load ``[L_moe, E]``
        summed over the steps."""
        cfg = self.config
        tokens, batch, sampling = self._inputs(plan)
        # Decode-only plans run as _decode_steps whenever it is on, even for one step,
        # so the engine compiles one decode program, not two.
        if plan.prefills or cfg.decode_steps == 1:
            self.shapes.add(plan.bucket if plan.prefills else 0)
            out, self.cache, load = _step(
                self.structure, self.leaves, self.cache, tokens, batch, sampling
            )
            out = np.asarray(out)[None]
        else:
            self.shapes.add(0)
            out, self.cache, load = _decode_steps(
                self.structure,
                cfg.decode_steps,
                cfg.page_size,
                self.leaves,
                self.cache,
                np.int32(plan.steps),
                tokens,
                batch,
                sampling,
            )
            out = np.asarray(out)[: plan.steps]
        return out, (None if load is None else np.asarray(load))

    def _inputs(self, plan: StepPlan):
        cfg, ps = self.config, self.config.page_size
        slots, width = cfg.max_slots, cfg.pages_per_seq
        s = plan.bucket if plan.prefills else 0
        bp = cfg.prefill_rows if plan.prefills else 0
        n = slots + bp * s
        tokens = np.zeros(n, np.int32)
        positions = np.zeros(n, np.int32)
        write_pages = np.full(n, SCRATCH_PAGE, np.int32)
        write_offsets = np.zeros(n, np.int32)
        padding = np.ones(n, bool)
        dec_lengths = np.zeros(slots, np.int32)
        dec_table = np.zeros((slots, width), np.int32)
        rows: list = [None] * slots
        for r in plan.decode:
            i, pos = r.slot, r.num_cached
            tokens[i], positions[i], padding[i] = r.tokens[pos], pos, False
            write_pages[i], write_offsets[i] = r.pages[pos // ps], pos % ps
            dec_lengths[i] = pos + 1
            dec_table[i, : len(r.pages)] = r.pages
            rows[i] = (r.params, r.seed, len(r.output))
        logit_index = list(range(slots))
        pre_lengths = np.zeros(bp, np.int32)  # idle rows: 0, they see nothing
        pre_table = np.zeros((bp, width), np.int32)
        for j, (r, m) in enumerate(plan.prefills):
            base, start = slots + j * s, r.num_cached
            pos = start + np.arange(s)
            tokens[base : base + m] = r.tokens[start : start + m]
            positions[base : base + s] = pos
            padding[base : base + m] = False
            pages = np.asarray(r.pages, np.int32)
            write_pages[base : base + m] = pages[pos[:m] // ps]
            write_offsets[base : base + m] = pos[:m] % ps
            pre_lengths[j] = start + s  # query i sits at lengths - s + i = start + i
            pre_table[j, : len(pages)] = pages
            logit_index.append(base + m - 1)
            rows.append((r.params, r.seed, len(r.output)))
        for j in range(len(plan.prefills), bp):  # idle rows: padding, greedy, ignored
            logit_index.append(slots + j * s)
            rows.append(None)
        # Host arrays go to the jitted step as they are: jit's C++ dispatch moves them
        # (~1 us each), where a jnp.asarray per array cost ~50 us of Python, 0.9 ms of
        # a batch-8 decode step for the 16 arrays.
        batch = PagedBatch(
            positions=positions,
            write_pages=write_pages,
            write_offsets=write_offsets,
            decode_lengths=dec_lengths,
            decode_page_table=dec_table,
            prefill_lengths=pre_lengths,
            prefill_page_table=pre_table,
            logit_index=np.asarray(logit_index, np.int32),
            padding=padding,
        )
        return tokens, batch, SamplingBatch.build(rows)
