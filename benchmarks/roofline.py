"""``make bench K=sharding``: a paper roofline of full-size models on a TPU v4-32 slice.

Nothing here runs on a TPU. For each model the forward over ``TOKENS`` is compiled by
XLA for a mesh of 32 CPU devices, (4, 8) ``("data", "model")`` and for mixtral also
(2, 4, 4) ``("data", "expert", "model")`` (expert parallel), from abstract inputs
(``jax.ShapeDtypeStruct`` carrying ``capibara.shard``'s placements: no weight is
materialized), with the ``xla`` implementation (the Pallas kernels compile on TPU
only). From the partitioned per-device program it reads:

* FLOPs and HBM bytes per device: XLA's ``cost_analysis()`` of that program (it counts
  a loop's body once, so FLOPs are also given as 2 x active weights x tokens / devices);
* ICI bytes per device: the result sizes of its collectives (all-reduce, all-gather,
  reduce-scatter, all-to-all, collective-permute), an all-reduce counted twice (a ring
  sends and receives each element about twice).

and the step time each bound implies on v4 (public spec, https://cloud.google.com/tpu/docs/v4:
275 TFLOP/s bf16 and 1200 GB/s HBM per chip, 1.1 PB/s all-reduce bandwidth per
4096-chip pod, i.e. ~269 GB/s per chip). The estimate is the largest of the three: it
ignores overlap losses, kernel efficiency and the CPU compiler's choices that differ on
TPU, so it is a lower bound on paper, never a measurement.

Expert parallel rows: XLA:CPU has no ragged all-to-all, so the CPU program exchanges
tokens by the all-gather form (``capibara.kernels.moe.run_experts``), which moves
more than the ragged form a TPU runs; its ICI bytes are the upper side, and the note
under the table gives the ragged form's exchange bytes by hand (each routed row there
and back).

    python -m benchmarks.roofline        (re-runs itself with 32 host devices)
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
import warnings

TENSOR_PARALLEL = ((4, 8), ("data", "model"))
EXPERT_PARALLEL = ((2, 4, 4), ("data", "expert", "model"))
DEVICES = 32
TOKENS = (8, 2048)
MODELS = (
    ("llama-3-8b", TENSOR_PARALLEL),
    ("mixtral-8x7b", TENSOR_PARALLEL),
    ("mixtral-8x7b", EXPERT_PARALLEL),
)
V4 = {"flops": 275e12, "hbm": 1200e9, "ici": 1.1e15 / 4096, "hbm_capacity": 32 * 2**30}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}


def collective_bytes(hlo_text: str) -> int:
    """Bytes one device sends over ICI, from the result shapes of the collectives in a
    partitioned HLO module (all-reduce x2)."""
    total = 0
    for line in hlo_text.splitlines():
        for name in COLLECTIVES:
            # "%x = bf16[8,128]{1,0} all-reduce(" or a tuple "(f32[..], f32[..]) all-gather("
            match = re.search(rf"= (.*?) {name}(?:-start)?\(", line)
            if match is None:
                continue
            size = sum(
                _ITEMSIZE.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
                for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1))
            )
            total += size * (2 if name == "all-reduce" else 1)
    return total


def analyse(name: str, layout=TENSOR_PARALLEL) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from capibara.core.config import preset
    from capibara.sharding import abstract_model, batch_sharding, bytes_per_device, make_mesh

    mesh = make_mesh(*layout)
    config = preset(name, implementation="xla")
    graphdef, state = abstract_model(config, mesh)
    param_bytes, _ = bytes_per_device(state)
    active = 0.0  # matmul weights one token meets
    experts_used = config.num_experts_per_token / max(config.num_experts, 1)
    for path, value in nnx.to_flat_state(state):
        dotted = ".".join(map(str, path))
        if "embed" not in dotted:  # a gather, not a matmul (a tied head is counted once)
            routed = ".w_gate_up" in dotted or ".w_down" in dotted
            active += math.prod(value.shape) * (experts_used if routed else 1.0)
    tokens = jax.ShapeDtypeStruct(TOKENS, jnp.int32, sharding=batch_sharding(mesh))

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)[0]

    start = time.perf_counter()
    compiled = jax.jit(forward).lower(state, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "flops": float(cost.get("flops", 0.0)),
        "analytic_flops": 2.0 * active * math.prod(TOKENS) / DEVICES,
        "hbm": float(cost.get("bytes accessed", 0.0)),
        "ici": float(collective_bytes(compiled.as_text())),
        "params": float(param_bytes),
        "compile_s": time.perf_counter() - start,
        "ragged_exchange": ragged_exchange_bytes(config, layout),
    }


def ragged_exchange_bytes(config, layout) -> float:
    """Bytes one device sends in the ragged form's token exchanges, by hand: every
    routed row of its tokens to its expert's shard and back, bf16, per MoE layer (0
    without an ``expert`` axis)."""
    shape, axes = layout
    if "expert" not in axes or not config.num_experts:
        return 0.0
    token_shards = math.prod(n for n, a in zip(shape, axes, strict=True) if a != "model")
    rows = math.prod(TOKENS) / token_shards * config.num_experts_per_token
    layers = sum(config.is_moe_layer(i) for i in range(config.num_layers))
    return 2 * rows * config.hidden_size * 2 * layers


def table(rows: dict[str, dict[str, float]]) -> str:
    header = (
        "model (forward, tokens)",
        "TFLOP/dev",
        "2·N·T TFLOP/dev",
        "HBM GB/dev",
        "ICI GB/dev",
        "params GiB/dev",
        "t_flops ms",
        "t_hbm ms",
        "t_ici ms",
        "estimate ms",
        "bound",
    )
    lines = []
    for (name, layout), r in rows.items():
        # The larger FLOP count: XLA's cost analysis counts a loop's body once.
        flops = max(r["flops"], r["analytic_flops"])
        times = {
            k: v / V4[k] * 1e3 for k, v in (("flops", flops), ("hbm", r["hbm"]), ("ici", r["ici"]))
        }
        bound = max(times, key=times.get)
        lines.append(
            (
                f"{name} {TOKENS[0]}x{TOKENS[1]} {layout[0]}",
                f"{r['flops'] / 1e12:.2f}",
                f"{r['analytic_flops'] / 1e12:.2f}",
                f"{r['hbm'] / 1e9:.1f}",
                f"{r['ici'] / 1e9:.2f}",
                f"{r['params'] / 2**30:.2f}",
                f"{times['flops']:.1f}",
                f"{times['hbm']:.1f}",
                f"{times['ici']:.1f}",
                f"{times[bound]:.1f}",
                bound,
            )
        )
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    out = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *lines]
    ]
    for (name, layout), r in rows.items():
        if r.get("ragged_exchange"):
            out.append(
                f"{name} {layout[0]} {' x '.join(layout[1])}: ICI counts the CPU program's "
                f"all-gather token exchange; the ragged all-to-all form a TPU runs sends "
                f"{r['ragged_exchange'] / 1e9:.2f} GB/device for the exchanges (by hand)."
            )
    out.append(
        "ESTIMATE on paper for TPU v4-32 (XLA:CPU-partitioned program, xla "
        "implementation; v4: 275 TFLOP/s, 1200 GB/s HBM, ~269 GB/s ICI per chip). "
        "TFLOP/dev is XLA's cost analysis, which counts a loop body once (the xla grouped "
        "matmul loops over tiles); 2·N·T is 2 x active matmul weights x tokens / 32 "
        "devices (no attention scores); t_flops uses the larger."
    )
    return "\n".join(out)


def main() -> int:
    flag = f"--xla_force_host_platform_device_count={DEVICES}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()}
        return subprocess.call([sys.executable, "-m", "benchmarks.roofline"], env=env)
    warnings.simplefilter("ignore")
    rows = {}
    for name, layout in MODELS:
        rows[name, layout] = analyse(name, layout)
        print(
            f"{name} {layout[0]}: compiled in {rows[name, layout]['compile_s']:.0f} s", flush=True
        )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
