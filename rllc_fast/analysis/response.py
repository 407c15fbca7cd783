"""Which heads respond alike to shifts of the data distribution (Baker et al., arXiv 2504.18274): the response
matrix of every head's susceptibilities to probe sets, its principal components, and whether they set one head
type (the induction heads) apart from the others.

- ``head_response``: ONE ``estimate_llc`` over every head and the whole model with the probe sets as
  observables, then ``rllc_fast.susceptibilities`` -> ``HeadResponse``;
- ``HeadResponse.pca(per="token" | "probe")`` -> ``ResponsePCA``: the response matrix ``[head, feature]``,
  its principal-component scores, explained variance and loadings (``rllc_fast.response_pca``), head labels;
- ``separation``: how far a head type's scores lie from the others' on each leading component, and whether a
  line in the leading components separates them;
- ``toy_response``: all of it on a toy run's checkpoint (the demo's model), with probe sets from every synthetic
  source plus the training mixture as the sampling task.

Units: susceptibilities are nats (per unit of ``n*beta``, see ``rllc_fast.susceptibility``); PCA scores are in
the units of the (centred) response matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..components import heads, whole
from ..config import SGLDConfig
from ..llc import estimate_llc
from ..observations import LabelledArray
from ..result import LLCResult
from ..susceptibility import Susceptibilities, response_pca, susceptibilities

WHOLE = "whole"


@dataclass
class Separation:
    """How a head type's PCA scores lie against the other heads'.

    target:         the head type; members: its heads.
    gaps:           ``[k]`` per leading component, the distance between the target's score interval and the
                    others' (> 0: the intervals do not overlap; < 0: minus the least shift of one interval that
                    would clear the other), in score units.
    relative_gaps:  ``gaps`` over the spread (max - min) of all heads' scores on that component.
    separable:      a line (hyperplane) in the first ``k`` components has the target heads strictly on one side
                    and all the others on the other (linear-programming feasibility).
    """

    target: str
    members: List[str]
    gaps: np.ndarray
    relative_gaps: np.ndarray
    separable: bool

    @property
    def best_component(self) -> int:
        """0-based index of the component with the largest relative gap."""
        return int(np.argmax(self.relative_gaps))


def separation(scores: np.ndarray, labels: List[str], target: str = "induction", k: int = 2,
               names: Optional[List[str]] = None) -> Separation:
    """``Separation`` of the heads labelled ``target`` from the rest, on the first ``k`` columns of ``scores``
    ``[head, components]`` (``labels``: one head type per row; ``names``: the heads, default row numbers)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = list(labels)
    if scores.ndim != 2 or scores.shape[0] != len(labels):
        raise ValueError(f"scores must be [head, component] with one label per head; got {scores.shape} and "
                         f"{len(labels)} labels")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be between 1 and the {scores.shape[1]} components given, got {k}")
    inside = np.array([t == target for t in labels])
    if inside.all() or not inside.any():
        raise ValueError(f"separation needs heads of type {target!r} and heads of other types; labels are "
                         f"{sorted(set(labels))}")
    x = scores[:, :k]
    a, b = x[inside], x[~inside]
    gaps = np.maximum(a.min(0) - b.max(0), b.min(0) - a.max(0))
    spread = np.ptp(x, axis=0)
    relative = gaps / np.where(spread > 0, spread, 1.0)
    names = [str(i) for i in range(len(labels))] if names is None else list(names)
    members = [n for n, t in zip(names, labels) if t == target]
    return Separation(target=target, members=members, gaps=gaps, relative_gaps=relative,
                      separable=linearly_separable(x, inside))


def linearly_separable(points: np.ndarray, inside: np.ndarray) -> bool:
    """Whether a hyperplane has ``points[inside]`` strictly on one side and the rest on the other: the linear
    program ``y_i (w . x_i + b) >= 1`` is feasible (``points`` ``[n, d]``, scaled to unit spread first)."""
    from scipy.optimize import linprog

    x = np.asarray(points, dtype=np.float64)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    y = np.where(np.asarray(inside, dtype=bool), 1.0, -1.0)
    a_ub = -y[:, None] * np.hstack([x, np.ones((len(x), 1))])
    res = linprog(np.zeros(x.shape[1] + 1), A_ub=a_ub, b_ub=-np.ones(len(x)), bounds=(None, None), method="highs")
    return res.status == 0


@dataclass
class ResponsePCA:
    """Principal components of a response matrix.

    per:       "token" (features: every probe token, probe sets side by side) or "probe" (one per probe set).
    matrix:    ``[head, feature]`` the response matrix (nats), a ``LabelledArray``.
    scores:    ``[head, k]`` principal-component scores; explained: ``[k]`` explained-variance ratios;
    loadings:  ``[k, feature]`` (unit vectors; signs fixed as in ``rllc_fast.response_pca``).
    head_types: ``{head: type}``; standardize: whether features were scaled to unit variance.
    """

    per: str
    matrix: LabelledArray
    scores: np.ndarray
    explained: np.ndarray
    loadings: np.ndarray
    head_types: Dict[str, str]
    standardize: bool = False

    @property
    def heads(self) -> List[str]:
        return list(self.matrix.coords["component"])

    @property
    def labels(self) -> List[str]:
        """One head type per row of ``scores`` ("other" for a head without a type)."""
        return [self.head_types.get(h, "other") for h in self.heads]

    def separation(self, target: str = "induction", k: int = 2) -> Separation:
        """``separation`` of the ``target`` heads on the first ``k`` components (member names, not rows)."""
        return separation(self.scores, self.labels, target, k, names=self.heads)

    def loading_shares(self) -> Dict[str, np.ndarray]:
        """``{probe set: [k]}`` the share of each component's squared loading on that probe set's features
        (sums to 1 over probe sets)."""
        names = [str(f).split("/")[0] for f in self.matrix.coords[self.matrix.dims[1]]]
        out: Dict[str, np.ndarray] = {}
        for p in dict.fromkeys(names):
            cols = np.array([n == p for n in names])
            out[p] = (self.loadings[:, cols] ** 2).sum(1)
        return out


@dataclass
class HeadResponse:
    """One run's susceptibilities of every head (``result``: the ``LLCResult`` with observations; ``head_types``:
    ``{head: type}``); ``pca`` makes the response matrix's principal components."""

    result: LLCResult
    susceptibilities: Susceptibilities
    head_types: Dict[str, str] = field(default_factory=dict)

    def rebased(self, init_loss: float) -> "HeadResponse":
        """The same run's susceptibilities with ``l(w*) = init_loss`` in ``phi = L - l(w*)`` (the default is the
        sampling probe set's own loss at ``w*``, ``sampling_probe_loss``: ``phi(w*) = 0``), e.g. the whole
        model's ``init_loss`` on the sampling minibatches, close to devinterp's choice."""
        chi = self.susceptibilities
        again = susceptibilities(self.result.observations, sampling=chi.sampling, whole=chi.whole,
                                 init_loss=init_loss, probes=chi.probes, components=chi.components)
        return HeadResponse(result=self.result, susceptibilities=again, head_types=dict(self.head_types))

    @property
    def sampling_probe_loss(self) -> float:
        """Mean per-token loss of the sampling-task probe set at ``w*`` (nats)."""
        return float(np.asarray(self.result.observations.at_optimum[self.susceptibilities.sampling], np.float64).mean())

    def pca(self, per: str = "token", k: int = 3, standardize: bool = False) -> ResponsePCA:
        """``ResponsePCA`` of the response matrix per probe token (``per="token"``) or per probe set."""
        matrix = self.susceptibilities.response_matrix(per=per)
        k = min(k, *matrix.values.shape)
        scores, explained, loadings = response_pca(matrix, k=k, standardize=standardize)
        return ResponsePCA(per=per, matrix=matrix, scores=scores, explained=explained, loadings=loadings,
                           head_types=dict(self.head_types), standardize=standardize)


def head_response(model: nn.Module, data, probes: Dict[str, torch.Tensor], config: SGLDConfig,
                  sampling: str, head_types: Optional[Dict[str, str]] = None, max_memory=None,
                  observables_dir=None, observe_every: int = 1, progress: bool = False) -> HeadResponse:
    """Susceptibilities of every head of a TransformerLens ``model`` to each probe set, from one
    ``estimate_llc`` over all heads and the whole model (the baseline) sampling on ``data``.

    probes:   ``{name: tokens [N, T]}`` fixed probe contexts; ``probes[sampling]`` must be drawn from the
              sampling distribution (``data``'s), the others are the shifts the heads respond to.
    head_types: ``{head: type}`` labels carried along (e.g. ``ToyRun.head_types()``).
    max_memory, observables_dir, observe_every, progress: passed to ``estimate_llc``.
    """
    if sampling not in probes:
        raise ValueError(f"sampling={sampling!r} is not among the probe sets {list(probes)}; add a probe set drawn "
                         "from the sampling data under that name")
    components = dict(heads(model))
    if WHOLE in components:
        raise ValueError(f"a head is named {WHOLE!r}; cannot add the whole model under that name")
    components[WHOLE] = whole(model)
    result = estimate_llc(model, data, config, components=components, max_memory=max_memory, progress=progress,
                          observables=probes, observe_every=observe_every, observables_dir=observables_dir)
    chi = susceptibilities(result, sampling=sampling, whole=WHOLE)
    return HeadResponse(result=result, susceptibilities=chi, head_types=dict(head_types or {}))


@dataclass(frozen=True)
class ResponseSettings:
    """Sizes of ``toy_response``: SGLD chains/draws/batch (step size, n*beta and gamma: the paper's, as in the
    demo) on ``num_contexts`` sampling contexts of the training mixture (``data_seed``), and ``probe_contexts``
    held-out contexts per probe set (``probe_seed``)."""

    num_chains: int = 4
    num_draws: int = 200
    batch_size: int = 16
    num_contexts: int = 2048
    probe_contexts: int = 16
    data_seed: int = 7
    probe_seed: int = 101
    seed: int = 0

    def sgld_config(self) -> SGLDConfig:
        return SGLDConfig(num_chains=self.num_chains, num_draws=self.num_draws, batch_size=self.batch_size,
                          seed=self.seed)


SAMPLING = "mixture"


def toy_response(run, settings: ResponseSettings = ResponseSettings(), checkpoint: int = -1, max_memory=None,
                 observables_dir=None, progress: bool = False) -> HeadResponse:
    """``head_response`` on a toy run's checkpoint (``rllc_fast.toy.ToyRun``; ``checkpoint`` indexes its
    ``metrics``, default the final one): sampling on its training mixture, probe sets from every synthetic
    source plus the mixture (``"mixture"``, the sampling task), heads labelled by ``run.head_types()`` (the
    final checkpoint's scores)."""
    from ..data.synthetic import synthetic_mixture, synthetic_probes
    from ..models.checkpoints import checkpoint_series

    if settings.probe_seed == settings.data_seed:
        raise ValueError("settings: probe_seed equals data_seed; give the probes a seed of their own (held out)")
    step = run.metrics[checkpoint]["step"]
    found = [c for c in checkpoint_series(run.directory) if c.step == step]
    if not found:
        raise FileNotFoundError(f"{run.directory}: no checkpoint of step {step}; train the run again (train_toy "
                                "with force=True)")
    model = found[0].load()
    recipe = run.recipe
    weights = dict(recipe.mixture)
    data = synthetic_mixture(settings.num_contexts, recipe.n_ctx, seed=settings.data_seed, weights=weights)
    probes = synthetic_probes(settings.probe_contexts, recipe.n_ctx, seed=settings.probe_seed, sampling=SAMPLING,
                              weights=weights)
    return head_response(model, data, probes, settings.sgld_config(), SAMPLING, head_types=run.head_types(),
                         max_memory=max_memory, observables_dir=observables_dir, progress=progress)
