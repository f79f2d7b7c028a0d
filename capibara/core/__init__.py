"""The model layer: configuration, routing (Mixture-of-Experts, Mixture-of-Depths), model."""

from capibara.core.config import CapibaraConfig, ConfigurationManager, preset
from capibara.core.inference import CapibaraInference, EngineConfig, SamplingParams
from capibara.core.model import CapibaraModel
from capibara.core.routing import (
    BaseRouter,
    DualProcessRouter,
    DualProcessRouterConfig,
    ExpertChoiceRouter,
    ExpertChoiceRouterConfig,
    MoEBlock,
    MoEBlockConfig,
    Routing,
    RoutingContext,
    TokenRouter,
    TokenRouterConfig,
)

__all__ = [
    "BaseRouter",
    "CapibaraConfig",
    "CapibaraInference",
    "CapibaraModel",
    "ConfigurationManager",
    "DualProcessRouter",
    "DualProcessRouterConfig",
    "EngineConfig",
    "ExpertChoiceRouter",
    "ExpertChoiceRouterConfig",
    "MoEBlock",
    "MoEBlockConfig",
    "Routing",
    "RoutingContext",
    "SamplingParams",
    "TokenRouter",
    "TokenRouterConfig",
    "preset",
]
