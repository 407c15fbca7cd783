"""rllc_fast: refined local learning coefficients (rLLC) of model components, fast.

Public API:
    estimate_llc, SGLDConfig, LLCResult, ComponentLLC, ChainsDivergedError
    components: Component, heads, head, layer, layers, whole, from_params
    data: ModelDistribution
"""
from .components import Component, ParamSlice, from_params, head, heads, layer, layers, whole
from .config import SGLDConfig
from .data import ModelDistribution
from . import models
from .llc import estimate_llc
from .result import ChainsDivergedError, ComponentLLC, LLCResult

__version__ = "0.1.0"

__all__ = [
    "ChainsDivergedError",
    "Component",
    "ComponentLLC",
    "LLCResult",
    "ModelDistribution",
    "ParamSlice",
    "SGLDConfig",
    "estimate_llc",
    "from_params",
    "head",
    "heads",
    "layer",
    "layers",
    "whole",
]
