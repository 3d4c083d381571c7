"""Strategy discovery: spectral clustering in torch recovers planted strategies, the eigengap picks their number,
and a fit on a probe without masks logs the strategies and alarms on a fixed-position map."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from caap_lightning import CAAP
from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.callbacks.strategies import (
    ALL,
    default_neighbors,
    discover_strategies,
    eigengap,
    kmeans,
    knn_affinity,
    place_of,
    spectral_clusters,
    strategies_text,
    strategy_features,
)

HALF = (0.5, 0.5, 0.5)


def planted_maps(sizes, side: int = 8, seed: int = 0):
    """Maps of ``len(sizes)`` strategies, ``sizes[j]`` maps each: evidence in strategy j's own block, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    blocks = [(0, 0), (0, side - 3), (side - 3, 0), (side - 3, side - 3), (2, 2)]
    maps, truth = [], []
    for j, size in enumerate(sizes):
        y, x = blocks[j]
        for _ in range(size):
            m = 0.05 * torch.rand(side, side, generator=generator)
            m[y : y + 3, x : x + 3] += 0.5 + 0.5 * torch.rand(3, 3, generator=generator)
            maps.append(m)
            truth.append(j)
    return torch.stack(maps), torch.tensor(truth)


def same_partition(labels: torch.Tensor, truth: torch.Tensor) -> bool:
    pairs = set(zip(labels.tolist(), truth.tolist()))
    return len(pairs) == len(set(labels.tolist())) == len(set(truth.tolist()))


@pytest.mark.parametrize("sizes", [(30,), (64,), (20, 20), (30, 8), (12, 12, 12), (20, 8, 8, 8), (200, 20, 20, 16)])
def test_the_eigengap_picks_the_number_of_planted_strategies_and_they_are_recovered(sizes):
    maps, truth = planted_maps(sizes)
    noise = strategy_features(torch.randn(len(maps), 8, 8, generator=torch.Generator().manual_seed(len(maps))))
    assert spectral_clusters(noise).num_clusters == 1  # as many maps without strategies: one group
    clusters = spectral_clusters(strategy_features(maps), max_clusters=6)
    assert clusters.num_clusters == len(sizes)
    assert same_partition(clusters.labels, truth)
    # Largest cluster first.
    counts = torch.bincount(clusters.labels).tolist()
    assert counts == sorted(counts, reverse=True)
    assert clusters.eigenvalues.shape == (7,) and float(clusters.eigenvalues[0]) == pytest.approx(0.0, abs=1e-9)


def test_building_blocks_on_hand_made_input():
    assert eigengap(torch.tensor([0.0, 0.0, 0.01, 0.5, 0.6]), max_clusters=4) == 3
    assert eigengap(torch.tensor([0.0, 0.9, 0.95, 1.0]), max_clusters=3) == 1
    # A slowly rising spectrum (an untrained model's maps): the widest gap, after 6, is narrower than
    # lambda_6 itself, so it is no clear gap: one strategy.
    assert eigengap(torch.tensor([0.0, 0.099, 0.102, 0.117, 0.165, 0.223, 0.329]), max_clusters=6) == 1
    assert eigengap(torch.tensor([0.0, 0.099, 0.102, 0.117, 0.165, 0.223, 0.5]), max_clusters=6) == 6
    # Four points on a line, one neighbour each: 0-1 (scales 1 and 1) and 2-3 (scales 1.5 and 1.5) pair up.
    points = torch.tensor([[0.0], [1.0], [5.0], [6.5]])
    affinity = knn_affinity(points, neighbors=1)
    e = math.exp(-1.0)
    expected = torch.tensor([[1, e, 0, 0], [e, 1, 0, 0], [0, 0, 1, e], [0, 0, e, 1]], dtype=torch.float64)
    torch.testing.assert_close(affinity, expected)
    # Point 3 is 2's nearest but 2 is not 3's: the edge is kept, exp(-1 / (1 * 2)).
    affinity = knn_affinity(torch.tensor([[0.0], [1.0], [3.0]]), neighbors=1)
    assert affinity[1, 2] == affinity[2, 1] == pytest.approx(math.exp(-4 / (1 * 2))) and affinity[0, 2] == 0
    clusters = spectral_clusters(points, max_clusters=3, neighbors=1)
    assert clusters.num_clusters == 2 and clusters.labels.tolist() == [0, 0, 1, 1]
    # k-means is seeded: the same seed gives the same labels.
    data = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(kmeans(data, 4, seed=3), kmeans(data, 4, seed=3))
    assert default_neighbors(16) == 10 and default_neighbors(400) == 20 and default_neighbors(3) == 2
    # Features: pooled to the grid, each row a distribution.
    features = strategy_features(torch.rand(5, 14, 14), grid=8)
    assert features.shape == (5, 64) and torch.allclose(features.sum(1), torch.ones(5))
    region = torch.zeros(6, 6, dtype=torch.bool)
    region[4:, 5] = True
    assert place_of(region.float()) == "bottom-right"
    region = torch.zeros(6, 6, dtype=torch.bool)
    region[2:4, 2:4] = True
    assert place_of(region.float()) == "centre"


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn is not installed")
def test_agrees_with_scikit_learn_on_well_separated_data():
    from sklearn.cluster import SpectralClustering
    from sklearn.metrics import adjusted_rand_score

    for sizes in [(20, 20), (15, 15, 15), (20, 12, 12, 12)]:
        maps, truth = planted_maps(sizes, seed=len(sizes))
        features = strategy_features(maps)
        ours = spectral_clusters(features, max_clusters=6)
        theirs = SpectralClustering(
            n_clusters=ours.num_clusters, affinity="nearest_neighbors",
            n_neighbors=default_neighbors(len(features)) + 1,  # scikit-learn counts the point itself
            random_state=0,
        ).fit(features.double().numpy())
        assert ours.num_clusters == len(sizes)
        assert adjusted_rand_score(theirs.labels_, ours.labels.numpy()) == 1.0
        assert adjusted_rand_score(truth.numpy(), ours.labels.numpy()) == 1.0


def test_discover_strategies_per_class_and_overall():
    maps, truth = planted_maps((16, 16))  # strategy 0 top-left, strategy 1 top-right
    targets = torch.cat([torch.arange(16) % 2, torch.full((16,), 2)])  # classes 0, 1 share strategy 0; class 2 is strategy 1
    groups = discover_strategies(maps, targets, class_name=lambda c: "abc"[c], max_clusters=4)
    assert sorted(groups) == ["all", "class/a", "class/b", "class/c"]
    everything = groups[ALL]
    assert len(everything.strategies) == 2
    assert [sorted(s.members.tolist()) for s in everything.strategies] == [list(range(16)), list(range(16, 32))]
    assert [s.place for s in everything.strategies] == ["top-left", "top-right"]
    assert all(s.concentration > 2.0 for s in everything.strategies)
    assert torch.allclose(everything.strategies[0].mean_map.sum(), torch.tensor(1.0))
    assert len(groups["class/c"].strategies) == 1 and groups["class/c"].indices.tolist() == list(range(16, 32))
    # A class below MIN_GROUP_IMAGES is clustered only among all.
    few = discover_strategies(maps[:20], targets[:20], class_name=str)
    assert sorted(few) == ["all", "class/0", "class/1"]


def scripted_probe(n: int = 64, seed: int = 0):
    """Images whose bright block is the scripted map's evidence: 3 in 8 in the two bottom-right patches (a fixed
    cue, larger than the hot region), the rest an object at the centre."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.02 * torch.rand(n, 3, 32, 32, generator=generator)
    corner = torch.tensor([i % 8 in (0, 1, 2) for i in range(n)])
    for i in range(n):
        if corner[i]:
            images[i, :, 24:, 16:] = 1.0
        else:
            images[i, :, 9:23, 9:23] = 1.0
    labels = torch.arange(n) % 2
    return (images - 0.5) / 0.5, labels, corner


def scripted_attribute(self, images, target=None, **kwargs):
    """The map is the image's brightness per 8-pixel patch: it follows the bright block."""
    return F.avg_pool2d((images * 0.5 + 0.5).mean(1, keepdim=True), 8)[:, 0]


def test_a_fit_without_masks_logs_strategies_and_alarms_on_a_fixed_position(
    tmp_path, monkeypatch, data_factory, classifier_factory, trainer_factory, events_reader
):
    monkeypatch.setattr(CAAP, "attribute", scripted_attribute)
    images, labels, corner = scripted_probe()
    caap = CAAPCallback(probe=(images, labels), num_images=64, metrics=["fixed_position_ratio"], target="label",
                        log_images=False, mean=HALF, std=HALF)
    monitor = SpuriousCueMonitor(num_images=3, patience=2)
    trainer = trainer_factory(tmp_path, [caap, monitor], max_epochs=3, limit_train_batches=1)
    with pytest.warns(UserWarning, match=r"alarm at epoch 1 \(step \d+\): caap/fixed_position_ratio = \d+\.\d+") as record:
        trainer.fit(classifier_factory(), datamodule=data_factory())
    assert any("relies on the fixed position. Next: " in str(w.message) for w in record)
    assert monitor.monitor_key == "caap/fixed_position_ratio" and monitor.discovers_strategies
    # Past the threshold from the first check: with patience 2 the second check alarms.
    scores = [row["score"] for row in monitor.history]
    assert all(score > monitor.threshold for score in scores) and [a["epoch"] for a in monitor.alarms] == [1]
    everything = monitor.last_strategies[ALL]
    assert len(everything.strategies) == 2
    number, fixed = next((j + 1, s) for j, s in enumerate(everything.strategies) if s.place == "bottom-right")
    assert sorted(fixed.members.tolist()) == corner.nonzero()[:, 0].tolist()
    class_name = caap.last.class_name(0)
    assert len(monitor.last_strategies[f"class/{class_name}"].strategies) == 2

    events = events_reader(trainer.logger.log_dir)
    steps = sorted(events["scalars"]["spurious/score"])
    assert len(steps) == 3
    assert events["images"]["spurious/strategies/all"] == steps
    assert events["images"][f"spurious/strategies/class/{class_name}"] == steps
    assert [events["scalars"]["spurious/strategies/all/clusters"][s] for s in steps] == [2.0, 2.0, 2.0]
    text = events["texts"]["spurious/strategies/text_summary"][steps[-1]]
    assert "**all classes**: 2 strategies in 64 images" in text and "| bottom-right |" in text
    alarm = events["texts"]["spurious/alarm/text_summary"][steps[1]]
    assert "hot region of all the probe's maps together sits at the bottom-right" in alarm
    assert "The score is the evidence density in each image's hot region" in alarm
    assert f"strategy {number} ({len(fixed.members)} images" in alarm
    # The images named are the corner ones: their evidence is in their hot region.
    named = [int(line.split("|")[1].strip()[1:]) for line in alarm.splitlines() if line.startswith("| #")]
    assert len(named) == 3 and all(corner[i] for i in named)
    assert events["images"]["spurious/alarm_images"] == [steps[1]]


def test_strategies_text_names_sizes_places_and_examples():
    class Result:
        epoch, step = 2, 40
        targets = torch.cat([torch.zeros(16, dtype=torch.long), torch.ones(16, dtype=torch.long)])

        @staticmethod
        def class_name(i):
            return ["cat", "dog"][i]

    maps, _ = planted_maps((20, 12))
    groups = discover_strategies(maps, Result.targets, Result.class_name, max_clusters=4)
    text = strategies_text(Result, {ALL: groups[ALL]}, "CAAP", examples=2)
    lines = text.splitlines()
    assert "**all classes**: 2 strategies in 32 images" in text
    rows = [line for line in lines if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert rows[0].startswith("| 1 | 20 | 62% | cat 16, dog 4 | top-left |")
    assert rows[1].startswith("| 2 | 12 | 38% | dog 12 | top-right |")
