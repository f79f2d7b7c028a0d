"""Every op on an 8-device CPU mesh against the single-device reference (a script).

Run by ``test_mesh.py`` in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (XLA fixes the device count
when it starts). Prints one ``RESULT{json}`` line: case name -> max abs error, or a
string for non-numeric checks. No user code here calls ``shard_map``: the inputs are
placed with ``NamedSharding`` (or a mesh is set) and the ops find the mesh.
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from capibara import kernels
from capibara.kernels._mesh import MeshLayoutWarning

RESULTS: dict[str, object] = {}


def mesh_of(shape, axes):
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(shape))


def put(x, mesh, *spec):
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


def err(got, want):
    """Max abs difference over the leaves, relative to the largest ``|want|`` (>= 1)."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        worst = max(worst, float(np.max(np.abs(x - y)) / max(1.0, float(np.max(np.abs(y))))))
    return worst


def normal(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def sin_loss(f):
    """A scalar loss of ``f``'s output with a non-trivial cotangent."""
    return lambda *args: jnp.sum(jnp.sin(f(*args)))


def flash_cases():
    mesh = mesh_of((2, 4), ("data", "model"))
    seg = jnp.asarray(np.repeat([[0] * 20 + [1] * 28], 2, axis=0), jnp.int32)
    seg_placed = put(seg, mesh, "data")

    def ref(q, k, v):
        return kernels.flash_attention(
            q, k, v, causal=True, segment_ids=(seg, seg), implementation="reference"
        )

    # 8 kv heads split with the query heads; 2 are repeated to the 4 model shards first
    # (``repeat_kv_heads``; one kv head takes the same path, so it is not run again).
    for hkv in (8, 2):
        q, k, v = (
            normal(0, (2, 48, 8, 32)),
            normal(1, (2, 48, hkv, 32)),
            normal(2, (2, 48, hkv, 32)),
        )

        args = (put(q, mesh, "data", None, "model"), put(k, mesh, "data"), put(v, mesh, "data"))
        for name, kw in (("interpret", {"interpret": True}), ("xla", {"implementation": "xla"})):

            def op(q, k, v, kw=kw):
                segs = (seg_placed, seg_placed)
                return kernels.flash_attention(q, k, v, causal=True, segment_ids=segs, **kw)

            out = jax.jit(op)(*args)
            RESULTS[f"flash hkv={hkv} {name} fwd"] = err(out, ref(q, k, v))
            RESULTS[f"flash hkv={hkv} {name} out spec"] = str(out.sharding.spec)
            grads = jax.jit(jax.grad(sin_loss(op), argnums=(0, 1, 2)))(*args)
            RESULTS[f"flash hkv={hkv} {name} grads"] = err(
                grads, jax.grad(sin_loss(ref), (0, 1, 2))(q, k, v)
            )
    # 6 heads / 3 kv heads do not split over 4 model shards: replicated, with a warning.
    q, k, v = normal(3, (2, 16, 6, 32)), normal(4, (2, 16, 3, 32)), normal(5, (2, 16, 3, 32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = jax.jit(lambda q, k, v: kernels.flash_attention(q, k, v, interpret=True))(
            put(q, mesh, "data"), put(k, mesh, "data"), put(v, mesh, "data")
        )
    RESULTS["flash 6/3 heads on 4 shards fwd"] = err(
        out, kernels.flash_attention(q, k, v, implementation="reference")
    )
    RESULTS["flash 6/3 heads on 4 shards warned"] = any(
        issubclass(w.category, MeshLayoutWarning) for w in caught
    )


def paged_cases():
    mesh = mesh_of((2, 4), ("data", "model"))
    rng = np.random.default_rng(0)
    b, s, hq, d, page, pages = 4, 3, 8, 32, 8, 24
    for hkv in (4, 2):
        kp, vp = normal(6, (hkv, pages, page, d)), normal(7, (hkv, pages, page, d))
        table = jnp.asarray(rng.permutation(pages)[: b * 4].reshape(b, 4), jnp.int32)
        lengths = jnp.asarray([5, 17, 32, 3], jnp.int32)
        q = normal(8, (b, s, hq, d))
        want = kernels.paged_prefill_attention(
            q, kp, vp, lengths, table, implementation="reference"
        )
        placed = (
            put(q, mesh, "data", None, "model"),
            put(kp, mesh, "model" if hkv % 4 == 0 else None),
            put(vp, mesh, "model" if hkv % 4 == 0 else None),
            put(lengths, mesh, "data"),
            put(table, mesh, "data"),
        )
        for name, kw in (
            ("interpret", {"interpret": True}),
            ("xla", {"implementation": "xla"}),
            ("default", {}),
        ):
            out = jax.jit(lambda *a, kw=kw: kernels.paged_prefill_attention(*a, **kw))(*placed)
            RESULTS[f"paged prefill hkv={hkv} {name}"] = err(out, want)
        dec = jax.jit(lambda q, *a: kernels.paged_attention(q[:, -1], *a, interpret=True))(*placed)
        RESULTS[f"paged decode hkv={hkv} interpret"] = err(
            dec,
            kernels.paged_attention(q[:, -1], kp, vp, lengths, table, implementation="reference"),
        )


def rope_kv_write_cases():
    mesh = mesh_of((2, 4), ("data", "model"))
    n, hq, hkv, d, pages, page = 6, 8, 4, 16, 5, 4
    q, k, v = normal(9, (n, hq, d)), normal(10, (n, hkv, d)), normal(11, (n, hkv, d))
    angles = normal(12, (n, d // 2))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    kp, vp = normal(13, (hkv, pages, page, d)), normal(14, (hkv, pages, page, d))
    wp, wo = jnp.asarray([0, 0, 1, 3, 4, 2], jnp.int32), jnp.asarray([0, 1, 3, 2, 0, 1], jnp.int32)
    want = kernels.rope_kv_write(q, k, v, cos, sin, kp, vp, wp, wo, implementation="reference")
    out = jax.jit(lambda *a: kernels.rope_kv_write(*a))(
        put(q, mesh, None, "model"),
        k,
        v,
        cos,
        sin,
        put(kp, mesh, "model"),
        put(vp, mesh, "model"),
        wp,
        wo,
    )
    RESULTS["rope_kv_write default"] = err(out, want)
    RESULTS["rope_kv_write pool spec"] = str(out[1].sharding.spec)


def grouped_matmul_cases():
    mesh = mesh_of((2, 4), ("expert", "model"))
    m, k, n, e = 40, 32, 64, 4
    sizes = jnp.asarray([9, 0, 17, 10], jnp.int32)  # 36 of 40 rows: the tail stays zero
    lhs, rhs = normal(15, (m, k)), normal(16, (e, k, n))
    for name, kw in (("interpret", {"interpret": True}), ("xla", {"implementation": "xla"})):

        def op(lhs, rhs, kw=kw):
            return kernels.grouped_matmul(lhs, rhs, sizes, **kw)

        def ref(lhs, rhs):
            return kernels.grouped_matmul(lhs, rhs, sizes, implementation="reference")

        placed = (lhs, put(rhs, mesh, "expert", None, "model"))
        out = jax.jit(op)(*placed)
        RESULTS[f"gmm {name} fwd"] = err(out, ref(lhs, rhs))
        RESULTS[f"gmm {name} out spec"] = str(out.sharding.spec)
        grads = jax.jit(jax.grad(sin_loss(op), argnums=(0, 1)))(*placed)
        RESULTS[f"gmm {name} grads"] = err(grads, jax.grad(sin_loss(ref), (0, 1))(lhs, rhs))

        # split_k: the contracted k over "model", a psum of partial sums.
        def op_k(lhs, rhs, kw=kw):
            return kernels.grouped_matmul(lhs, rhs, sizes, split_k=True, **kw)

        placed_k = (put(lhs, mesh, None, "model"), put(rhs, mesh, "expert", "model"))
        out = jax.jit(op_k)(*placed_k)
        RESULTS[f"gmm {name} split_k fwd"] = err(out, ref(lhs, rhs))
        grads = jax.jit(jax.grad(sin_loss(op_k), argnums=(0, 1)))(*placed_k)
        RESULTS[f"gmm {name} split_k grads"] = err(grads, jax.grad(sin_loss(ref), (0, 1))(lhs, rhs))
        rhs_t = jnp.swapaxes(rhs, 1, 2)
        out = jax.jit(
            lambda a, b, kw=kw: kernels.grouped_matmul(a, b, sizes, transpose_rhs=True, **kw)
        )(lhs, put(rhs_t, mesh, "expert", "model"))
        RESULTS[f"gmm {name} transpose_rhs"] = err(out, ref(lhs, rhs))
        dy = normal(17, (m, n))
        out = jax.jit(lambda a, b, kw=kw: kernels.transposed_grouped_matmul(a, b, sizes, **kw))(
            lhs, put(dy, mesh, None, "model")
        )
        want = kernels.transposed_grouped_matmul(lhs, dy, sizes, implementation="reference")
        RESULTS[f"tgmm {name} fwd"] = err(out, want)
        RESULTS[f"tgmm {name} out spec"] = str(out.sharding.spec)


def block_sparse_cases():
    mesh = mesh_of((2, 4), ("data", "model"))
    dense = np.asarray(normal(18, (256, 256)))
    mask = np.random.default_rng(1).random((2, 2)) < 0.6
    mask[0, 0] = True
    dense = dense * np.kron(mask, np.ones((128, 128)))
    w = kernels.BlockSparseMatrix.from_dense(jnp.asarray(dense), block_shape=(128, 128))
    x = normal(19, (4, 8, 256))
    for name, kw in (("interpret", {"interpret": True}), ("xla", {"implementation": "xla"})):

        def loss(x, blocks, kw=kw):
            y = kernels.block_sparse_matmul(x, kernels.BlockSparseMatrix(blocks, w.layout), **kw)
            return jnp.sum(jnp.sin(y)), y

        def ref(x, blocks):
            y = kernels.block_sparse_matmul(
                x, kernels.BlockSparseMatrix(blocks, w.layout), implementation="reference"
            )
            return jnp.sum(jnp.sin(y)), y

        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            put(x, mesh, "data"), w.blocks
        )
        want = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)(x, w.blocks)
        RESULTS[f"block_sparse {name} fwd"] = err(got[0][1], want[0][1])
        RESULTS[f"block_sparse {name} grads"] = err(got[1], want[1])

    # Output columns over "model": the matrix re-stored in column shards, its blocks
    # placed split over "model"; 8 shards on 4 devices (2 runs each) and 4 on 4.
    pruned = kernels.BlockSparseMatrix.prune(np.asarray(normal(20, (96, 256))), 0.6, (32, 32))
    x = normal(21, (4, 8, 96))
    for shards in (4, 8):
        split = pruned.split_columns(shards)
        for name, kw in (("interpret", {"interpret": True}), ("xla", {"implementation": "xla"})):

            def split_loss(x, blocks, kw=kw, layout=split.layout):
                w = kernels.BlockSparseMatrix(blocks, layout)
                y = kernels.block_sparse_matmul(x, w, **kw)
                return jnp.sum(jnp.sin(y)), y

            def dense_loss(x, dense):
                y = x @ dense
                return jnp.sum(jnp.sin(y)), y

            got = jax.jit(jax.value_and_grad(split_loss, argnums=(0, 1), has_aux=True))(
                put(x, mesh, "data"), put(split.blocks, mesh, "model")
            )
            dense = pruned.to_dense()
            want = jax.value_and_grad(dense_loss, argnums=(0, 1), has_aux=True)(x, dense)
            case = f"block_sparse columns/{shards} {name}"
            RESULTS[f"{case} fwd"] = err(got[0][1], want[0][1])
            RESULTS[f"{case} out spec"] = str(got[0][1].sharding.spec)
            d_w = kernels.BlockSparseMatrix(got[1][1], split.layout).to_dense()
            RESULTS[f"{case} grads"] = err(
                (got[1][0], d_w), (want[1][0], want[1][1] * (dense != 0))
            )


def decode_matmul_cases():
    mesh = mesh_of((2, 4), ("data", "model"))
    x, w = normal(20, (4, 64)).astype(jnp.bfloat16), normal(21, (64, 96)).astype(jnp.bfloat16)
    out = jax.jit(lambda x, w: kernels.decode_matmul(x, w))(
        put(x, mesh, "data"), put(w, mesh, None, "model")
    )
    RESULTS["decode_matmul default"] = err(
        out, kernels.decode_matmul(x, w, implementation="reference")
    )


def nested_and_context_cases():
    """Inside a user's own shard_map an op runs on its shard (``check_vma=False``, which
    Pallas asks of any shard_map around a kernel); with jax.set_mesh the context mesh
    is used even for unplaced inputs."""
    mesh = mesh_of((2, 4), ("data", "model"))
    q, k, v = normal(22, (2, 16, 8, 32)), normal(23, (2, 16, 8, 32)), normal(24, (2, 16, 8, 32))
    want = kernels.flash_attention(q, k, v, implementation="reference")
    spec = P("data", None, "model")
    mapped = jax.shard_map(
        lambda q, k, v: kernels.flash_attention(q, k, v, interpret=True),
        mesh=mesh,
        in_specs=(spec, spec, spec),
        out_specs=spec,
        check_vma=False,
    )
    RESULTS["flash inside user shard_map"] = err(jax.jit(mapped)(q, k, v), want)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: kernels.flash_attention(q, k, v, interpret=True))(q, k, v)
    RESULTS["flash under jax.set_mesh"] = err(out, want)


def tpu_export_cases():
    """The default implementation exports for TPU on the mesh: one Mosaic call per
    shard, no partitioner error."""
    mesh = mesh_of((2, 4), ("data", "model"))
    q = put(jnp.zeros((2, 128, 8, 128), jnp.bfloat16), mesh, "data", None, "model")
    kv = put(jnp.zeros((2, 128, 2, 128), jnp.bfloat16), mesh, "data")
    lhs = jnp.zeros((256, 128), jnp.bfloat16)
    rhs = put(jnp.zeros((4, 128, 512), jnp.bfloat16), mesh, None, None, "model")
    sizes = jnp.asarray([64, 64, 64, 64], jnp.int32)
    programs = {
        "flash_attention": (lambda q, k: kernels.flash_attention(q, k, k, causal=True), (q, kv)),
        "grouped_matmul": (lambda a, b: kernels.grouped_matmul(a, b, sizes), (lhs, rhs)),
    }
    for name, (fn, args) in programs.items():
        exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
        text = exported.mlir_module()
        RESULTS[f"tpu export {name}"] = (
            f"{text.count('tpu_custom_call')} mosaic calls, {exported.nr_devices} devices"
        )


if __name__ == "__main__":
    for cases in (
        flash_cases,
        paged_cases,
        rope_kv_write_cases,
        grouped_matmul_cases,
        block_sparse_cases,
        decode_matmul_cases,
        nested_and_context_cases,
        tpu_export_cases,
    ):
        cases()
        print(cases.__name__, "done", flush=True)
    print("RESULT" + json.dumps(RESULTS))
