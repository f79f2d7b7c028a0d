"""The model layer: configuration, routing (Mixture-of-Experts, Mixture-of-Depths), model."""

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
    "DualProcessRouter",
    "DualProcessRouterConfig",
    "ExpertChoiceRouter",
    "ExpertChoiceRouterConfig",
    "MoEBlock",
    "MoEBlockConfig",
    "Routing",
    "RoutingContext",
    "TokenRouter",
    "TokenRouterConfig",
]
