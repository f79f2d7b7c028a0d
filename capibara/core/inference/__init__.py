"""The inference engine: paged KV cache, continuous batching, batch/async/streaming
generation, prefix cache, metrics. See ``engine.CapibaraInference``."""

from capibara.core.inference.engine import CapibaraInference
from capibara.core.inference.metrics import MetricsSnapshot
from capibara.core.inference.params import (
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
