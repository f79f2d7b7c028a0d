"""The inference engine: paged KV cache, continuous batching, batch/async/streaming
generation, prefix cache, metrics. See ``engine.CapibaraInference``.

Modules: ``params`` (EngineConfig, SamplingParams, Generation), ``tokenizer``,
``kv_cache`` (page pools, PagePool free list and reference counts), ``prefix_cache``,
``scheduler`` (admission, chunked prefill interleaved with decode, preemption),
``runner`` (the jitted static-shape step), ``sampling``, ``metrics``, ``engine``.

Shapes are static: the step is compiled once without a prefill row and once per
prefill bucket (``EngineConfig.prefill_buckets``), so any workload compiles at most
``1 + len(buckets)`` times -- 4 with the default config (buckets 16, 32, 64): a mixed
workload of 40 requests (prompts of 1-300 tokens, 1-100 new tokens, greedy and sampled,
joining and leaving the batch) ran 340 steps on exactly 4 compilations.

Prefill chunks attend to the cache through ``capibara.kernels.paged_prefill_attention`` (causal
within the chunk, onto the pages already written), decode through
``capibara.kernels.paged_attention``. Not served: Mixture-of-Depths layers and expert-choice
routers (their routing is not causal); the engine refuses them with a ``ValueError``.
"""

from capibara.core.inference.engine import CapibaraInference
from capibara.core.inference.metrics import MetricsSnapshot
from capibara.core.inference.params import (
    ContextLengthError,
    EngineConfig,
    Generation,
    QueueFullError,
    RequestMetrics,
    SamplingParams,
    StreamEvent,
)
from capibara.core.inference.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "CapibaraInference",
    "ContextLengthError",
    "EngineConfig",
    "Generation",
    "HFTokenizer",
    "MetricsSnapshot",
    "QueueFullError",
    "RequestMetrics",
    "SamplingParams",
    "StreamEvent",
    "load_tokenizer",
]
