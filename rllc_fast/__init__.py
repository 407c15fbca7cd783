"""rllc_fast: refined local learning coefficients (rLLC) of model components, fast.

Public API:
    estimate_llc, calibrate_step_size, SGLDConfig, LLCResult, ComponentLLC, ChainsDivergedError,
    CudaGraphUnsupported (estimate_llc(cuda_graph=True) where it cannot run)
    components: Component, heads, head, groups, group (grouped-query attention), layer, layers, mlp, mlps, whole,
        from_params (whole parameters or row/column slices)
    data: ModelDistribution (more in rllc_fast.data: corpora, tokenizer, token files)
    sweeps: run_sweep, ResultStore, write_report (models and checkpoints in rllc_fast.models)
    Hessian metrics: rllc_fast.hessian (trace, fim_trace, approx_rank, hvp)
    observables: estimate_llc(..., observables={name: tokens}) -> result.observations (Observations, per-token
        probe losses per draw); susceptibilities (Susceptibilities, response_pca), bayesian_influence
    cost_model: a FLOP-and-bytes model of one SGLD step and projected times on a device (step_cost, projections)
"""
from .components import (Component, ParamSlice, from_params, group, group_name, groups, head, head_name, heads, layer,
                         layers, mlp, mlps, parse_group_name, parse_head_name, whole)
from .config import SGLDConfig
from .data import ModelDistribution
from . import cost_model, hessian, models
from .llc import estimate_llc
from .calibrate import calibrate_step_size
from .result import ChainsDivergedError, ComponentLLC, LLCResult
from .engine.graph import CudaGraphUnsupported
from .observations import LabelledArray, Observations
from .susceptibility import Susceptibilities, response_pca, susceptibilities
from .influence import bayesian_influence
from .report import write_report
from .store import ResultStore
from .sweep import run_sweep

__version__ = "0.1.0"

__all__ = [
    "ChainsDivergedError",
    "CudaGraphUnsupported",
    "Component",
    "ComponentLLC",
    "LLCResult",
    "LabelledArray",
    "Observations",
    "Susceptibilities",
    "bayesian_influence",
    "response_pca",
    "susceptibilities",
    "ModelDistribution",
    "ParamSlice",
    "ResultStore",
    "SGLDConfig",
    "calibrate_step_size",
    "cost_model",
    "hessian",
    "estimate_llc",
    "from_params",
    "group",
    "groups",
    "head",
    "heads",
    "head_name",
    "group_name",
    "parse_head_name",
    "parse_group_name",
    "layer",
    "layers",
    "mlp",
    "mlps",
    "models",
    "run_sweep",
    "whole",
    "write_report",
]

# Sampler diagnostics, step-size calibration and the plotting helpers (docs/diagnostics.md).
from . import diagnostics, plotting  # noqa: E402
from .calibrate import calibration_figure, plot_calibration, suggest_step_size  # noqa: E402
from .diagnostics import SamplerDiagnostics, SamplerWarning, refined_exceeding_whole  # noqa: E402

__all__ += ["SamplerDiagnostics", "SamplerWarning", "calibration_figure", "diagnostics", "plot_calibration",
            "plotting", "refined_exceeding_whole", "suggest_step_size"]
