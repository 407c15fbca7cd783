"""Hessian-based metrics at the same refinements as the rLLC: refined Hutchinson trace, Fisher information
trace and approximate Hessian rank (Appendix D), per component and batched over probes.

Public: ``trace``, ``fim_trace``, ``approx_rank``, ``hvp``; results are ``HessianResult`` objects of
``HessianEstimate`` (value and standard error per component).
"""
from .approx_rank import approx_rank
from .chebyshev import SpectrumOutsideIntervalError, matrix_rank
from .operator import METHODS, hvp
from .result import HessianEstimate, HessianResult
from .trace import fim_trace, trace

__all__ = ["HessianEstimate", "HessianResult", "METHODS", "SpectrumOutsideIntervalError", "approx_rank", "fim_trace",
           "hvp", "matrix_rank", "trace"]
