"""``make bench``: runs every ``benchmarks/bench_*.py`` case and prints one table.

On CPU it first measures this machine's dense matmul peak (a 4096^3 XLA f32 matmul)
in the same process, so every row can be shown as a percentage of it. Accelerator
peaks come from a table keyed by ``device_kind`` (none hard-coded in kernels).

    python -m benchmarks.run [-k FILTER] [--json PATH]

``-k sharding`` prints instead the paper roofline of ``benchmarks/roofline.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import pytest

RESULTS = pathlib.Path(__file__).parent / "results"

# Dense peak of accelerators (TFLOP/s, bf16 dense), keyed by jax device_kind.
ACCELERATOR_PEAK_TFLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H200": 989.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
}


def measure_cpu_peak(n: int = 4096, rounds: int = 5) -> float:
    """GFLOP/s of one large f32 XLA matmul on this machine (median of ``rounds``)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, a).block_until_ready()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def peak_gflops() -> tuple[float, str]:
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measure_cpu_peak(), "measured: f32 4096^3 XLA matmul"
    tflops = ACCELERATOR_PEAK_TFLOPS.get(device.device_kind)
    return (tflops * 1e3 if tflops else float("nan")), f"table: {device.device_kind}"


def table(benchmarks: list[dict], peak: float) -> str:
    """Formats pytest-benchmark JSON entries as one text table, grouped by (op, shape, dtype)."""
    header = ("op", "shape", "dtype", "impl", "median ms", "GFLOP/s", "% peak", "vs base", "note")
    groups: dict[str, list[dict]] = {}
    for b in benchmarks:
        groups.setdefault(b["group"], []).append(b)
    rows = []
    for entries in groups.values():
        base = next((e for e in entries if e["extra_info"].get("baseline")), None)
        for e in entries:
            info, median = e["extra_info"], e["stats"]["median"]
            gflops = info["flops"] / median / 1e9 if info["flops"] else float("nan")
            ratio = base["stats"]["median"] / median if base else float("nan")
            rows.append(
                (
                    info["op"],
                    info["shape"],
                    info["dtype"],
                    info["impl"],
                    f"{median * 1e3:.2f}",
                    f"{gflops:.1f}",
                    f"{100 * gflops / peak:.0f}%",
                    "base" if e is base else f"{ratio:.2f}x",
                    info.get("note", ""),
                )
            )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="filter", default="", help="pytest -k expression")
    parser.add_argument("--json", default=None, help="where to keep pytest-benchmark's JSON")
    args = parser.parse_args(argv)
    if args.filter == "sharding":  # a paper roofline of a v4-32 slice, not a timing
        from benchmarks import roofline

        return roofline.main()

    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = pathlib.Path(args.json or RESULTS / f"bench-{stamp}.json")
    peak, peak_source = peak_gflops()
    print(f"device: {jax.devices()[0].device_kind}; peak {peak:.1f} GFLOP/s ({peak_source})")

    pytest_args = [
        str(pathlib.Path(__file__).parent),
        # bench_*.py modules hold bench_* functions: benchmarks, not tests.
        *("-o", "python_files=bench_*.py", "-o", "python_functions=bench_*"),
        "-p",
        "no:cacheprovider",
        "--no-cov",
        "-q",
        f"--benchmark-json={json_path}",
        "--benchmark-disable-gc",
    ]
    if args.filter:
        pytest_args += ["-k", args.filter]
    code = pytest.main(pytest_args)
    if not json_path.exists():
        print("no benchmark ran", file=sys.stderr)
        return code or 1
    data = json.loads(json_path.read_text())
    data["capibara_peak_gflops"] = peak
    json_path.write_text(json.dumps(data, indent=1))
    print()
    print(table(data["benchmarks"], peak))
    print(f"\nJSON: {json_path}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
