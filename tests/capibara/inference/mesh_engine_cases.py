"""The serving engine tensor/data-parallel on 8 CPU devices (a script).

Run by ``test_mesh_engine.py`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
Serves the same requests on one device and on (1, 8) and (2, 4) meshes
(``EngineConfig(mesh=...)``) and prints ``RESULT{json}``: whether the greedy tokens
match, the prefix cache's hit rate, what a cancelled stream left behind, and how the KV
pools are placed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import warnings

import jax
import numpy as np
from flax import nnx

from capibara.core.config import preset
from capibara.core.inference import CapibaraInference, EngineConfig, SamplingParams
from capibara.core.model import CapibaraModel
from capibara.sharding import make_mesh

warnings.simplefilter("ignore")  # 4 kv heads on 8 model shards: repeated, as warned

CONFIG = EngineConfig(
    max_slots=4, max_seq_len=64, page_size=8, num_pages=48, prefill_chunk=16, min_prefill_bucket=8
)
MODEL = preset("tiny", num_heads=8, num_kv_heads=4)
rng = np.random.default_rng(0)
prefix = [int(t) for t in rng.integers(0, 256, 16)]
PROMPTS = [prefix + [int(t) for t in rng.integers(0, 256, int(n))] for n in (3, 9, 1, 20)] + [
    [int(t) for t in rng.integers(0, 256, int(n))] for n in (5, 30, 12)
]
SAMPLING = [SamplingParams(max_tokens=int(n), temperature=0.0) for n in (6, 11, 3, 8, 14, 5, 9)]


def serve(mesh):
    model = CapibaraModel(MODEL, rngs=nnx.Rngs(0))
    engine = CapibaraInference(model, dataclasses.replace(CONFIG, mesh=mesh), tokenizer=None)
    try:
        tokens = [list(g.token_ids) for g in engine.generate_batch(PROMPTS, SAMPLING)]

        async def with_a_cancelled_stream():
            async def cancelled():
                seen = 0
                async for _ in engine.stream(PROMPTS[5], SamplingParams(max_tokens=30)):
                    seen += 1
                    if seen == 2:
                        break  # closes the stream: the request is cancelled

            done = await asyncio.gather(
                engine.generate_async(PROMPTS[:4], SAMPLING[:4]), cancelled()
            )
            return [list(g.token_ids) for g in done[0]]

        again = asyncio.run(with_a_cancelled_stream())
        pages = engine.page_counts()
        pool = engine._runner.cache[0][0]
        return {
            "tokens": tokens,
            "tokens_beside_a_cancelled_stream": again,
            "prefix_hit_rate": engine.metrics().prefix_cache_hit_rate,
            "pages_lost": pages["capacity"] - pages["free"] - pages["prefix_cache"],
            "pool_spec": str(pool.sharding.spec) if mesh is not None else "",
            "pool_devices": len(pool.sharding.device_set),
        }
    finally:
        engine.close()


single = serve(None)
results = {"single_prefix_hit_rate": single["prefix_hit_rate"]}
for shape in ((1, 8), (2, 4)):
    got = serve(make_mesh(shape))
    results[str(shape)] = {
        "same_tokens": got["tokens"] == single["tokens"],
        "same_tokens_beside_cancelled": got["tokens_beside_a_cancelled_stream"]
        == single["tokens"][:4],
        "prefix_hit_rate": got["prefix_hit_rate"],
        "pages_lost": got["pages_lost"],
        "pool_spec": got["pool_spec"],
        "pool_devices": got["pool_devices"],
    }
results["devices"] = jax.device_count()
print("RESULT" + json.dumps(results))
