"""Clustering of per-head rLLC trajectories (paper Appendix F.5, G).

Each head is one curve over checkpoints, or several curves concatenated (e.g. wrLLC on the mixture then
drLLC on code: a ``2T``-long vector). Methods (scikit-learn and tslearn implementations):
  kmeans  Euclidean K-means (sklearn ``KMeans``);
  dtw     K-means under dynamic time warping (tslearn ``TimeSeriesKMeans(metric="dtw")``);
  ward    hierarchical agglomerative clustering, Ward linkage (sklearn); new curves go to the nearest
          cluster mean;
  sbd     shape-based K-means, k-Shape (tslearn ``KShape``) on curves z-normalised per segment, so only
          their shape counts: the shape-based distance ``sbd`` ignores scale and offset.
Quality scores: silhouette (in the method's own distance), Calinski-Harabasz and Davies-Bouldin
(Euclidean; the paper found all three weak guides with few heads). A fitted ``Clustering`` labels
the heads of another run (``predict``), and gives one colour family per cluster (``colours``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

METHODS = ("kmeans", "dtw", "ward", "sbd")
#: matplotlib colormaps, one family per cluster (shades within a cluster tell its heads apart).
COLOUR_FAMILIES = ("Reds", "Blues", "Greens", "Oranges", "Purples", "Greys", "YlOrBr", "PuRd", "BuGn", "GnBu")

Curves = Mapping[str, Sequence[float]]


def _resample(y: np.ndarray, length: int) -> np.ndarray:
    return np.interp(np.linspace(0, 1, length), np.linspace(0, 1, len(y)), y)


def curve_matrix(curves: Union[Curves, Sequence[Curves]], resample: bool = False) -> Tuple[List[str], np.ndarray, List[int]]:
    """``(names, X [heads, total length], segment lengths)`` from one ``{head: curve}`` mapping or several
    (concatenated per head, in order; every mapping must name the same heads). Curves of one mapping must
    share a length: with ``resample`` shorter ones are linearly interpolated to the longest, otherwise a
    ``ValueError`` names them. NaN/Inf (a diverged estimate) is refused, naming the head."""
    parts = [curves] if isinstance(curves, Mapping) else list(curves)
    if not parts or not parts[0]:
        raise ValueError("no curves given: pass {head: [values over checkpoints]}")
    names = list(parts[0])
    blocks, lengths = [], []
    for i, part in enumerate(parts):
        if set(part) != set(names):
            raise ValueError(f"curve set {i} names heads {sorted(part)}, but set 0 names {sorted(names)}")
        arrays = {n: np.asarray(part[n], dtype=float).ravel() for n in names}
        for n, y in arrays.items():
            if len(y) < 2:
                raise ValueError(f"curve set {i}, head {n}: need at least 2 checkpoints, got {len(y)}")
            if not np.isfinite(y).all():
                raise ValueError(f"curve set {i}, head {n} holds NaN/Inf (a diverged estimate); rerun or drop "
                                 "that checkpoint before clustering")
        sizes = {len(y) for y in arrays.values()}
        if len(sizes) > 1:
            if not resample:
                detail = ", ".join(f"{n}: {len(y)}" for n, y in arrays.items())
                raise ValueError(f"curve set {i}: curves of unequal length ({detail}); pass resample=True "
                                 "(--resample) to interpolate them onto the longest, or give equal checkpoints")
            size = max(sizes)
            arrays = {n: _resample(y, size) for n, y in arrays.items()}
        lengths.append(len(next(iter(arrays.values()))))
        blocks.append(np.stack([arrays[n] for n in names]))
    return names, np.concatenate(blocks, axis=1), lengths


def znormalise(X: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """Each row's segments shifted to mean 0 and scaled to std 1 (a flat segment stays 0)."""
    out, start = np.empty_like(X, dtype=float), 0
    for size in lengths:
        seg = X[:, start:start + size]
        std = seg.std(axis=1, keepdims=True)
        out[:, start:start + size] = (seg - seg.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)
        start += size
    return out


def sbd(x: Sequence[float], y: Sequence[float]) -> float:
    """Shape-based distance (Paparrizos & Gravano 2015) of two equal-length curves: 1 minus the largest
    normalised cross-correlation over all shifts, after z-normalising both; in [0, 2], 0 for curves equal
    up to a positive scale and an offset."""
    a = znormalise(np.asarray(x, float)[None], [len(x)])[0]
    b = znormalise(np.asarray(y, float)[None], [len(y)])[0]
    if len(a) != len(b):
        raise ValueError(f"sbd needs equal lengths, got {len(a)} and {len(b)}")
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    if denom == 0:
        return 0.0 if np.linalg.norm(a) == np.linalg.norm(b) else 1.0
    return float(1.0 - np.correlate(a, b, mode="full").max() / denom)


def sbd_matrix(X: np.ndarray) -> np.ndarray:
    """``[n, n]`` pairwise ``sbd`` of the rows of ``X``."""
    n = len(X)
    D = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            D[i, j] = D[j, i] = sbd(X[i], X[j])
    return D


@dataclass
class Clustering:
    """A fitted clustering: ``labels`` ``{head: cluster}`` (clusters numbered in order of first appearance),
    quality ``scores``, and what ``predict`` needs to label another run's curves."""

    method: str
    n_clusters: int
    labels: Dict[str, int]
    scores: Dict[str, float]
    lengths: List[int]
    estimator: Any = field(repr=False, default=None)
    centroids: Any = field(repr=False, default=None)
    relabel: Dict[int, int] = field(repr=False, default_factory=dict)
    resample: bool = False

    def predict(self, curves: Union[Curves, Sequence[Curves]]) -> Dict[str, int]:
        """Cluster labels for another run's curves (the same number of curve sets as the fit; each set is
        resampled to the fitted length when it differs and ``resample`` was set at fit time)."""
        names, X, lengths = curve_matrix(curves, resample=self.resample)
        if len(lengths) != len(self.lengths):
            raise ValueError(f"predict: {len(lengths)} curve set(s) given, the clustering was fitted on {len(self.lengths)}")
        if lengths != self.lengths:
            if not self.resample:
                raise ValueError(f"predict: curve lengths {lengths} differ from the fitted {self.lengths}; fit with "
                                 "resample=True to interpolate")
            X = np.concatenate([np.stack([_resample(row, n) for row in seg])
                                for seg, n in zip(np.split(X, np.cumsum(lengths)[:-1], axis=1), self.lengths)], axis=1)
        if self.method == "ward":
            raw = np.argmin(((X[:, None] - self.centroids[None]) ** 2).sum(-1), axis=1)
        else:
            raw = self.estimator.predict(_prepare(self.method, X, self.lengths))
        return {n: self.relabel.get(int(r), int(r)) for n, r in zip(names, raw)}

    def colours(self) -> Dict[str, tuple]:
        """``{head: RGBA}``: one colormap family per cluster, a distinct shade per head within it."""
        from matplotlib import colormaps

        out = {}
        for cluster in sorted(set(self.labels.values())):
            members = [n for n, c in self.labels.items() if c == cluster]
            cmap = colormaps[family(cluster)]
            shades = np.linspace(0.85, 0.45, len(members)) if len(members) > 1 else [0.7]
            out.update({n: tuple(float(v) for v in cmap(s)) for n, s in zip(members, shades)})
        return out

    def colour_key(self) -> Dict[str, tuple]:
        """``{"cluster c": RGBA}``: what each colour family of ``colours`` means (see ``cluster_key``)."""
        return cluster_key(self.labels)

    def to_dict(self) -> dict:
        return {"method": self.method, "n_clusters": self.n_clusters, "labels": self.labels, "scores": self.scores,
                "lengths": self.lengths}


def family(cluster: int) -> str:
    """The matplotlib colormap whose shades ``Clustering.colours`` gives the heads of ``cluster``."""
    return COLOUR_FAMILIES[cluster % len(COLOUR_FAMILIES)]


def cluster_key(labels: Mapping[str, int]) -> Dict[str, tuple]:
    """``{"cluster c": RGBA}`` for the clusters of ``labels`` ``{head: cluster}`` (in cluster order): a middle
    shade of each cluster's colour family, the legend of a figure coloured by ``Clustering.colours``."""
    from matplotlib import colormaps

    return {f"cluster {c}": tuple(float(v) for v in colormaps[family(c)](0.65))
            for c in sorted(set(int(c) for c in labels.values()))}


def _prepare(method: str, X: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """``X [heads, length]`` as the method's estimator takes it: tslearn wants ``[heads, length, 1]``, and
    shape-based clustering curves z-normalised per segment."""
    if method == "sbd":
        return znormalise(X, lengths)[..., None]
    return X[..., None] if method == "dtw" else X


def _tslearn_clustering():
    """``tslearn.clustering``, without its warning about the optional h5py."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="h5py not installed")
        import tslearn.clustering

    return tslearn.clustering


def _quality(X: np.ndarray, labels: np.ndarray, method: str, prepared: np.ndarray) -> Dict[str, float]:
    from sklearn import metrics

    k = len(set(labels.tolist()))
    if not 2 <= k <= len(X) - 1:
        return {"silhouette": float("nan"), "calinski_harabasz": float("nan"), "davies_bouldin": float("nan")}
    if method == "sbd":
        silhouette = metrics.silhouette_score(sbd_matrix(prepared[..., 0]), labels, metric="precomputed")
    elif method == "dtw":
        silhouette = _tslearn_clustering().silhouette_score(prepared, labels, metric="dtw")
    else:
        silhouette = metrics.silhouette_score(X, labels)
    return {"silhouette": float(silhouette), "calinski_harabasz": float(metrics.calinski_harabasz_score(X, labels)),
            "davies_bouldin": float(metrics.davies_bouldin_score(X, labels))}


def cluster_curves(curves: Union[Curves, Sequence[Curves]], n_clusters: int, method: str = "kmeans", seed: int = 0,
                   resample: bool = False) -> Clustering:
    """Cluster heads by their curves (see ``curve_matrix`` for ``curves`` and ``resample``) into
    ``n_clusters`` groups with ``method`` (one of ``METHODS``); deterministic under ``seed``."""
    if method not in METHODS:
        raise ValueError(f"clustering method {method!r}: choose from {METHODS}")
    names, X, lengths = curve_matrix(curves, resample)
    if not 1 <= n_clusters <= len(names):
        raise ValueError(f"n_clusters={n_clusters} but only {len(names)} heads are clustered; choose 1..{len(names)}")
    estimator = centroids = None
    prepared = _prepare(method, X, lengths)
    if method == "kmeans":
        from sklearn.cluster import KMeans

        estimator = KMeans(n_clusters, n_init=10, random_state=seed).fit(prepared)
        raw = estimator.labels_
    elif method == "ward":
        from sklearn.cluster import AgglomerativeClustering

        raw = AgglomerativeClustering(n_clusters, linkage="ward").fit_predict(prepared)
        centroids = np.stack([X[raw == c].mean(0) for c in range(n_clusters)])
    elif method == "dtw":
        estimator = _tslearn_clustering().TimeSeriesKMeans(n_clusters, metric="dtw", n_init=3, random_state=seed).fit(prepared)
        raw = estimator.labels_
    else:
        estimator = _tslearn_clustering().KShape(n_clusters, n_init=5, random_state=seed).fit(prepared)
        raw = estimator.labels_
    raw = np.asarray(raw)
    relabel: Dict[int, int] = {}
    for r in raw.tolist():
        relabel.setdefault(int(r), len(relabel))
    labels = {n: relabel[int(r)] for n, r in zip(names, raw)}
    scores = _quality(X, np.array([labels[n] for n in names]), method, prepared)
    return Clustering(method, n_clusters, labels, scores, lengths, estimator, centroids, relabel, resample)
