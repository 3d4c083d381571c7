"""Strategy discovery in the manner of SpRAy: clusters of the probe's relative maps, per class and overall.

Lapuschkin et al. (2019), "Unmasking Clever Hans predictors and assessing what machines really
learn": spectral clustering of relevance maps, with the eigengap for the number of clusters. Each
cluster is a *strategy*: images the model explains in the same way. A class recognised in two ways
shows two clusters; a cluster whose mean map keeps to a corner is a cue that has no mask. This module
clusters in torch (a self-tuning kNN graph, its normalised Laplacian, k-means on the spectral embedding) and
draws and logs what it found through :mod:`caap_lightning.callbacks.figures`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from caap_lightning.callbacks import figures
from caap_lightning.metrics._checks import check_int
from caap_lightning.metrics.functional import (
    HOT_REGION_SHARE,
    evidence,
    hot_pixel_count,
    ratio_of_densities,
    top_pixels,
)
from caap_lightning.utils import unnormalize, upsample_maps

# Maps are pooled to at most this many cells a side before clustering: strategies differ in where the
# evidence sits, not in its fine detail, and a coarse grid makes neighbours of near misses.
STRATEGY_GRID = 8
# A class with fewer probe images than this is not clustered on its own (it still is among all classes).
MIN_GROUP_IMAGES = 8
KMEANS_RESTARTS = 10
KMEANS_STEPS = 100
ALL = "all"  # the group of every probe image; a class's group is "class/<name>"
# CAAP's relative maps in probability units: a patch that moves its class's probability by less than one
# percentage point over the blank is no evidence of a strategy (a model at chance has maps of this size).
CAAP_PROBABILITY_EVIDENCE_FLOOR = 0.01
# A group is clustered only where at least this share of its maps hold evidence: strategies of a minority
# would describe how the model explains few of the group's images.
MIN_EVIDENCE_SHARE = 0.5


@dataclass(frozen=True)
class SpectralClusters:
    """A clustering: ``labels`` ``(n,)`` (0 the largest cluster), their number, and the smallest
    eigenvalues of the graph's normalised Laplacian (ascending; the largest gap chose the number)."""

    labels: Tensor
    num_clusters: int
    eigenvalues: Tensor


@dataclass(frozen=True)
class Strategy:
    """One cluster of a group: its probe images (most typical first), their mean evidence map ``(h, w)``
    (each map's positive part normalised to sum 1), where the evidence of its hot region sits and how
    concentrated it is (density in its hot region over the rest: 1 = spread evenly)."""

    members: Tensor
    mean_map: Tensor
    place: str
    concentration: float


@dataclass(frozen=True)
class StrategyGroup:
    """The strategies of one group of probe images: all of them (``"all"``) or one explained class.

    ``clustered`` are the images whose maps hold evidence (above the floor) and were clustered; where they
    are too few, ``clusters`` is ``None``, ``strategies`` is empty and ``unclustered`` says why.
    """

    name: str
    indices: Tensor
    clusters: Optional[SpectralClusters]
    strategies: List[Strategy]
    clustered: Optional[Tensor] = None
    unclustered: str = ""


# ---------------------------------------------------------------------- spectral clustering
def strategy_features(maps: Tensor, grid: int = STRATEGY_GRID) -> Tensor:
    """``(n, d)``: each map's positive part pooled to at most ``grid`` cells a side, as a distribution (sum 1)."""
    check_int("grid", grid, 1, "cells a side")
    positive = maps.float().clamp_min(0)
    h, w = positive.shape[-2:]
    if h > grid or w > grid:
        positive = F.adaptive_avg_pool2d(positive[:, None], (min(h, grid), min(w, grid)))[:, 0]
    return evidence(positive).float()


def default_neighbors(n: int) -> int:
    """Neighbours per point in the kNN graph: scikit-learn's 10, or sqrt(n) for large ``n`` (at most ``n - 1``).

    Sparser graphs split a homogeneous group into spurious strategies (the eigengap then finds
    gaps in its noise); ten still separate strategies of eight images.
    """
    return min(n - 1, max(10, round(math.sqrt(n))))


def knn_affinity(features: Tensor, neighbors: int) -> Tensor:
    """The self-tuning kNN affinity (Zelnik-Manor and Perona, 2004): ``exp(-d_ij^2 / (s_i s_j))`` between
    points of which one is among the other's ``neighbors`` nearest, 0 elsewhere, 1 on the diagonal.

    ``s_i`` is the distance from ``i`` to its ``neighbors``-th nearest point, so a tight strategy and a loose
    one are both connected inside, and the few edges between strategies are weak (a binary kNN graph weighs
    them as much as the edges inside: it lets a small strategy leak into a large one). Ties go to the lower
    index.
    """
    distances = torch.cdist(features.double(), features.double())
    distances.fill_diagonal_(-1.0)  # each point first among its own neighbours
    nearest = torch.argsort(distances, dim=1, stable=True)[:, : neighbors + 1]
    distances.fill_diagonal_(0.0)
    scale = distances.gather(1, nearest[:, -1:])[:, 0].clamp_min(1e-12)
    connected = torch.zeros_like(distances, dtype=torch.bool).scatter_(1, nearest, True)
    weights = torch.exp(-(distances**2) / (scale[:, None] * scale[None, :]))
    return torch.where(connected | connected.T, weights, 0.0)


def normalized_laplacian(affinity: Tensor) -> Tensor:
    """``I - D^-1/2 W D^-1/2`` of an affinity ``W`` whose degrees are all positive."""
    scale = affinity.sum(1).rsqrt()
    return torch.eye(len(affinity), dtype=affinity.dtype) - scale[:, None] * affinity * scale[None, :]


def eigengap(eigenvalues: Tensor, max_clusters: int) -> int:
    """The ``k`` in ``1..max_clusters`` with the largest gap ``lambda_{k+1} - lambda_k`` (eigenvalues ascending),
    among the *clear* gaps: those wider than ``lambda_k`` itself.

    ``k`` clusters make ``lambda_1..lambda_k`` small next to ``lambda_{k+1}``; a spectrum that rises slowly
    (no structure, or noise) has gaps as wide as the eigenvalues below them, and its widest one would
    split one strategy into several. ``k = 1`` is always clear (``lambda_1 = 0``).
    """
    gaps = eigenvalues[1 : max_clusters + 1] - eigenvalues[:max_clusters]
    clear = gaps > eigenvalues[:max_clusters].clamp_min(0)
    return int(torch.where(clear, gaps, -math.inf).argmax()) + 1


def _kmeans_plus_plus(points: Tensor, k: int, generator: torch.Generator) -> Tensor:
    centres = points[torch.randint(len(points), (1,), generator=generator)]
    for _ in range(1, k):
        nearest = torch.cdist(points, centres).min(1).values ** 2
        # Every point already a centre (duplicates): any point will do.
        weights = nearest if bool(nearest.sum() > 0) else torch.ones_like(nearest)
        centres = torch.cat([centres, points[torch.multinomial(weights, 1, generator=generator)]])
    return centres


def kmeans(points: Tensor, k: int, seed: int = 0, restarts: int = KMEANS_RESTARTS, steps: int = KMEANS_STEPS) -> Tensor:
    """Lloyd's k-means from seeded k-means++ starts; the labels ``(n,)`` of the restart with the least inertia."""
    generator = torch.Generator().manual_seed(seed)
    best_inertia, best_labels = math.inf, torch.zeros(len(points), dtype=torch.long)
    for _ in range(restarts):
        centres = _kmeans_plus_plus(points, k, generator)
        for _ in range(steps):
            labels = torch.cdist(points, centres).argmin(1)
            # An emptied cluster keeps its centre.
            moved = torch.stack(
                [points[labels == j].mean(0) if bool((labels == j).any()) else centres[j] for j in range(k)]
            )
            if torch.equal(moved, centres):
                break
            centres = moved
        labels = torch.cdist(points, centres).argmin(1)
        inertia = float(((points - centres[labels]) ** 2).sum())
        if inertia < best_inertia:
            best_inertia, best_labels = inertia, labels
    return best_labels


def _centroids_and_radii(features: Tensor, labels: Tensor, present: List[int]) -> Tuple[Tensor, Tensor]:
    centroids = torch.stack([features[labels == j].mean(0) for j in present])
    radii = torch.stack([
        ((features[labels == j] - centroids[i]) ** 2).sum(1).mean().sqrt() for i, j in enumerate(present)
    ])
    return centroids, radii


def merge_unseparated(features: Tensor, labels: Tensor) -> Tensor:
    """``labels`` with clusters merged, the closest pair first, while two clusters' centroids are closer than
    the sum of their RMS radii (in ``features``): such clusters are one strategy that k-means cut in the
    spectral embedding along its own noise, not two ways of explaining."""
    labels = labels.clone()
    while True:
        present = torch.unique(labels).tolist()
        if len(present) < 2:
            return labels
        centroids, radii = _centroids_and_radii(features.double(), labels, present)
        closeness = torch.cdist(centroids, centroids) / (radii[:, None] + radii[None, :]).clamp_min(1e-12)
        closeness.fill_diagonal_(math.inf)
        i, j = divmod(int(closeness.argmin()), len(present))
        if float(closeness[i, j]) >= 1.0:
            return labels
        labels[labels == present[j]] = present[i]


def _by_size(labels: Tensor) -> Tensor:
    """Labels renumbered 0.. by cluster size, largest first (equal sizes by their first member), gaps closed."""
    present = torch.unique(labels).tolist()
    first = {j: int((labels == j).nonzero()[0]) for j in present}
    order = sorted(present, key=lambda j: (-int((labels == j).sum()), first[j]))
    renumber = {j: rank for rank, j in enumerate(order)}
    return torch.tensor([renumber[int(j)] for j in labels], dtype=torch.long)


def spectral_clusters(
    features: Tensor,
    max_clusters: int = 6,
    neighbors: Optional[int] = None,
    num_clusters: Optional[int] = None,
    seed: int = 0,
) -> SpectralClusters:
    """Spectral clustering of ``features`` ``(n, d)`` (Ng, Jordan and Weiss; von Luxburg's eigengap).

    The kNN graph (:func:`knn_affinity`, ``neighbors`` default :func:`default_neighbors`), the
    eigenvectors of its normalised Laplacian, the number of clusters from the largest clear eigengap
    among ``1..max_clusters`` (:func:`eigengap`; or ``num_clusters``), then k-means (seeded) on the
    row-normalised embedding. Without ``num_clusters``, clusters that are not separated in ``features``
    are merged (:func:`merge_unseparated`), so that noise does not split a strategy.
    """
    check_int("max_clusters", max_clusters, 1, "clusters")
    if num_clusters is not None:
        check_int("num_clusters", num_clusters, 1, "clusters")
    n = len(features)
    if n < 2:
        return SpectralClusters(torch.zeros(n, dtype=torch.long), 1, torch.zeros(n, dtype=torch.float64))
    neighbors = default_neighbors(n) if neighbors is None else neighbors
    check_int("neighbors", neighbors, 1, "points per point")
    top = min(max_clusters, n - 1)
    values, vectors = torch.linalg.eigh(normalized_laplacian(knn_affinity(features, min(neighbors, n - 1))))
    k = eigengap(values, top) if num_clusters is None else min(num_clusters, n)
    if k == 1:
        labels = torch.zeros(n, dtype=torch.long)
    else:
        embedding = vectors[:, :k]
        embedding = embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-12)
        labels = kmeans(embedding, k, seed)
        labels = _by_size(labels if num_clusters is not None else merge_unseparated(features, labels))
    return SpectralClusters(labels, int(labels.max()) + 1, values[: top + 1].clone())


# ---------------------------------------------------------------------- strategies of a probe
def place_of(weights: Tensor) -> str:
    """Where non-negative ``weights`` ``(h, w)`` (a region, or evidence) sit, by their centre in a 3 x 3 grid:
    ``"top-left"``, ``"top"``, ..., ``"centre"``."""
    weights = weights.double()
    h, w = weights.shape
    total = weights.sum()
    y = float((weights.sum(1) * (torch.arange(h) + 0.5)).sum() / total) / h
    x = float((weights.sum(0) * (torch.arange(w) + 0.5)).sum() / total) / w
    vertical = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    horizontal = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    return "-".join(part for part in (vertical, horizontal) if part) or "centre"


def _strategy(members: Tensor, maps: Tensor, features: Tensor) -> Strategy:
    """The cluster ``members`` (probe indices) as a :class:`Strategy`, most typical member first."""
    distances = (features[members] - features[members].mean(0)).norm(dim=1)
    members = members[torch.argsort(distances, stable=True)]
    h, w = maps.shape[-2:]
    mean = evidence(maps[members]).mean(0)
    count = hot_pixel_count(h * w, HOT_REGION_SHARE)
    hot = top_pixels(mean[None], count)[0]
    share = mean[hot].sum()
    return Strategy(
        members=members,
        mean_map=mean.view(h, w).float(),
        # Weighted by the evidence: a hot region of few cells may hold a stray one.
        place=place_of((mean * hot).view(h, w)),
        concentration=float(ratio_of_densities(share, torch.tensor(count / (h * w), dtype=torch.float64))),
    )


def evidence_floor(method: str, score: str) -> float:
    """The least positive value a map of ``method`` (with CAAP's ``score``) must reach to hold evidence: one
    percentage point of probability for CAAP's relative probability maps; any positive value for maps in other
    units (logits, gradients), whose scale says nothing on its own."""
    return CAAP_PROBABILITY_EVIDENCE_FLOOR if method == "caap" and score == "probability" else 0.0


def check_finite_maps(maps: Tensor) -> None:
    """``ValueError`` naming the images whose maps hold NaN or inf: no strategy can be read from them."""
    bad = (~torch.isfinite(maps.flatten(1)).all(1)).nonzero()[:, 0].tolist()
    if bad:
        raise ValueError(
            f"the maps of probe image(s) {bad} hold NaN or inf values; strategies are not discovered from them "
            "(the model's outputs or weights are not finite)"
        )


def discover_strategies(
    maps: Tensor,
    targets: Tensor,
    class_name: Callable[[int], str],
    max_clusters: int = 6,
    seed: int = 0,
    min_evidence: float = 0.0,
) -> Dict[str, StrategyGroup]:
    """The strategies of every probe image (group ``"all"``) and of each explained class with at least
    :data:`MIN_GROUP_IMAGES` images (group ``"class/<name>"``), from the relative patch maps ``(n, h, w)``.

    Only maps whose largest value exceeds ``min_evidence`` (see :func:`evidence_floor`) hold evidence to
    place; a group with fewer than :data:`MIN_GROUP_IMAGES` of them, or with less than
    :data:`MIN_EVIDENCE_SHARE` of its maps holding evidence, is not clustered and says why (its maps are
    too weak). NaN or inf maps are refused.
    """
    maps = maps.detach().float().cpu()
    check_finite_maps(maps)
    targets = targets.cpu()
    features = strategy_features(maps)
    holds_evidence = maps.flatten(1).amax(1) > min_evidence
    groups = {ALL: torch.arange(len(maps))}
    for label in torch.unique(targets).tolist():
        members = (targets == label).nonzero()[:, 0]
        if len(members) >= MIN_GROUP_IMAGES:
            groups[f"class/{class_name(int(label))}"] = members
    found = {}
    for name, indices in groups.items():
        if len(indices) < MIN_GROUP_IMAGES:
            continue  # too few to cluster: the monitor says so in setup
        clustered = indices[holds_evidence[indices]]
        if len(clustered) < max(MIN_GROUP_IMAGES, MIN_EVIDENCE_SHARE * len(indices)):
            reason = _too_weak(len(indices), len(clustered), min_evidence)
            found[name] = StrategyGroup(name, indices, None, [], clustered, reason)
            continue
        clusters = spectral_clusters(features[clustered], max_clusters=max_clusters, seed=seed)
        strategies = [
            _strategy(clustered[clusters.labels == j], maps, features) for j in range(clusters.num_clusters)
        ]
        found[name] = StrategyGroup(name, indices, clusters, strategies, clustered)
    return found


def _too_weak(images: int, holding: int, min_evidence: float) -> str:
    return (
        f"the maps are too weak to cluster: {holding} of {images} hold evidence above {min_evidence:g} (clustering "
        f"needs {MIN_GROUP_IMAGES} and {MIN_EVIDENCE_SHARE:.0%} of them); the model explains too little of its "
        "classes yet"
    )


# ---------------------------------------------------------------------- figures and text
def _group_title(name: str) -> str:
    return "all classes" if name == ALL else f"class {name[len('class/'):]}"


def strategy_grid(result: Any, group: StrategyGroup, maps: Tensor, map_title: str, examples: int) -> Any:
    """Up to ``examples`` images per strategy, most typical first: image | its map | the strategy's mean map."""
    rows, means, titles = [], [], []
    k = len(group.strategies)
    for j, strategy in enumerate(group.strategies):
        for i in strategy.members[:examples].tolist():
            rows.append(i)
            means.append(strategy.mean_map)
            # The image's own title first: on a narrow grid the caption's end is cut, and the strategy's part
            # repeats on every row of the strategy (and in the text entry).
            titles.append(f"{result.row_title(i)} · strategy {j + 1}/{k} ({len(strategy.members)} images, "
                          f"{strategy.place})")
    probe = result.probe
    index = torch.as_tensor(rows, dtype=torch.long)
    size = tuple(probe.images.shape[-2:])
    overlays = {
        map_title: upsample_maps(maps[index].float().cpu(), size),
        "strategy mean": upsample_maps(torch.stack(means), size),
    }
    return figures.heatmap_grid(unnormalize(probe.images[index], result.mean, result.std), overlays, titles)


def _composition(result: Any, members: Tensor, shown: int = 3) -> str:
    """The explained classes of ``members``, most frequent first: ``"cat 12, dog 3, ..."``."""
    labels, counts = torch.unique(result.targets[members], return_counts=True)
    order = torch.argsort(counts, descending=True, stable=True)
    parts = [f"{result.class_name(int(labels[o]))} {int(counts[o])}" for o in order[:shown]]
    return ", ".join(parts) + (", ..." if len(order) > shown else "")


def strategies_text(result: Any, groups: Dict[str, StrategyGroup], method: str, examples: int) -> str:
    """Markdown: per group, the number of strategies, the eigenvalues that chose it and a row per strategy."""
    lines = [
        f"**Strategies at epoch {result.epoch}, step {result.step}**: spectral clustering of the {method} maps "
        "(positive part, each map normalised to sum 1), the number of clusters from the largest clear eigengap. "
        "`evidence sits` is where a strategy's mean map puts its hottest tenth; `concentration` is the evidence "
        "density there over the rest (1 = spread evenly).",
    ]
    for name, group in groups.items():
        n, k = len(group.indices), len(group.strategies)
        if group.clusters is None:
            lines += ["", f"**{_group_title(name)}**: no strategies shown: {group.unclustered}."]
            continue
        values = ", ".join(f"{float(v):.3f}" for v in group.clusters.eigenvalues)
        weak = n - len(group.clustered) if group.clustered is not None else 0
        left_out = f"; {weak} maps without evidence left out" if weak else ""
        lines += [
            "",
            f"**{_group_title(name)}**: {k} strateg{'y' if k == 1 else 'ies'} in {n} images "
            f"(Laplacian eigenvalues {values}{left_out}).",
            "",
            "| strategy | images | share | explained classes | evidence sits | concentration | examples |",
            "|---|---|---|---|---|---|---|",
        ]
        for j, s in enumerate(group.strategies):
            shown = ", ".join(f"#{i}" for i in s.members[:examples].tolist())
            lines.append(
                f"| {j + 1} | {len(s.members)} | {100 * len(s.members) / n:.0f}% | {_composition(result, s.members)} "
                f"| {s.place} | {s.concentration:.2f} | {shown} |"
            )
    return "\n".join(lines)


def log_strategies(
    trainer: Any, prefix: str, result: Any, groups: Dict[str, StrategyGroup], method: str, map_title: str,
    examples: int,
) -> None:
    """``<prefix>/strategies`` (text); per group ``<prefix>/strategies/<group>`` (image) and ``.../clusters``."""
    if not groups:
        return
    maps = result.method_maps[method]
    step = result.step
    figures.log_scalars(
        trainer, {f"{prefix}/strategies/{name}/clusters": float(len(g.strategies)) for name, g in groups.items()}, step
    )
    figures.log_text(trainer, f"{prefix}/strategies", strategies_text(result, groups, map_title, examples), step)
    for name, group in groups.items():
        if group.strategies:
            grid = strategy_grid(result, group, maps, map_title, examples)
            figures.log_image(trainer, f"{prefix}/strategies/{name}", grid, step)
