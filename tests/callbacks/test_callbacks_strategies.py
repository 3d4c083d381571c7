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
    CAAP_PROBABILITY_EVIDENCE_FLOOR,
    MIN_GROUP_IMAGES,
    default_neighbors,
    discover_strategies,
    eigengap,
    evidence_floor,
    kmeans,
    knn_affinity,
    merge_unseparated,
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


class TextResult:
    """What strategies_text reads of a ProbeResult."""

    epoch, step = 1, 10

    def __init__(self, targets: torch.Tensor) -> None:
        self.targets = targets

    @staticmethod
    def class_name(i):
        return str(i)


def test_maps_too_weak_to_cluster_show_no_strategies_and_say_why():
    # A model at chance: the planted places are there, but no patch moves the probability by a percentage point.
    maps, _ = planted_maps((30, 34))
    weak = 0.009 * maps / maps.amax()
    targets = torch.arange(64) % 2
    assert len(discover_strategies(weak, targets, str)[ALL].strategies) == 2  # without a floor, noise is a finding
    groups = discover_strategies(weak, targets, str, min_evidence=evidence_floor("caap", "probability"))
    assert sorted(groups) == ["all", "class/0", "class/1"]
    for group in groups.values():
        assert group.strategies == [] and group.clusters is None
        assert group.unclustered.startswith(f"the maps are too weak to cluster: 0 of {len(group.indices)} hold "
                                            "evidence above 0.01")
    text = strategies_text(TextResult(targets), groups, "CAAP", examples=2)
    assert "**all classes**: no strategies shown: the maps are too weak to cluster: 0 of 64" in text
    assert "| 1 |" not in text


def test_a_minority_of_maps_with_evidence_is_not_clustered_and_a_majority_is_with_the_rest_left_out():
    maps, _ = planted_maps((20, 20))
    targets = torch.zeros(40, dtype=torch.long)
    floor = CAAP_PROBABILITY_EVIDENCE_FLOOR
    minority = torch.cat([maps[:8], 0.5 * floor * maps[8:] / maps[8:].amax()])  # 8 of 40 hold evidence
    group = discover_strategies(minority, targets, str, min_evidence=floor)[ALL]
    assert group.strategies == [] and "8 of 40 hold evidence" in group.unclustered
    # 30 of 40 hold evidence: clustered, the ten without left out and said.
    majority = torch.cat([maps[:10], 0.5 * floor * maps[10:20] / maps.amax(), maps[20:]])
    group = discover_strategies(majority, targets, str, min_evidence=floor)[ALL]
    assert sorted(group.clustered.tolist()) == list(range(10)) + list(range(20, 40))
    assert [len(s.members) for s in group.strategies] == [20, 10]
    text = strategies_text(TextResult(targets), {ALL: group}, "CAAP", examples=2)
    assert "2 strategies in 40 images" in text and "; 10 maps without evidence left out)" in text


def test_too_few_images_form_no_group():
    maps, _ = planted_maps((MIN_GROUP_IMAGES - 1,))
    assert discover_strategies(maps, torch.zeros(len(maps), dtype=torch.long), str) == {}


def test_nan_maps_are_refused_naming_the_images():
    maps, _ = planted_maps((20,))
    maps[3, 0, 0] = float("nan")
    maps[7, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"the maps of probe image\(s\) \[3, 7\] hold NaN or inf values"):
        discover_strategies(maps, torch.zeros(20, dtype=torch.long), str)


def test_evidence_floor_applies_to_caap_probability_maps_only():
    assert evidence_floor("caap", "probability") == CAAP_PROBABILITY_EVIDENCE_FLOOR
    assert evidence_floor("caap", "logit") == 0.0 and evidence_floor("gradcam", "probability") == 0.0


def jittered_strategy(n: int, seed: int, side: int = 8):
    """One strategy: each map's evidence in a 3 x 3 block whose corner wanders over a 3 x 3 range, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    maps = 0.1 * torch.randn(n, side, side, generator=generator)
    for i in range(n):
        y, x = torch.randint(1, 4, (2,), generator=generator).tolist()
        maps[i, y : y + 3, x : x + 3] += 0.5 + 0.5 * torch.rand(3, 3, generator=generator)
    return maps


@pytest.mark.parametrize("n", [16, 32])
def test_one_strategy_is_one_in_every_seeded_layout(n):
    counts = [spectral_clusters(strategy_features(jittered_strategy(n, seed))).num_clusters for seed in range(60)]
    assert counts == [1] * 60


def test_merging_joins_clusters_closer_than_their_radii_only():
    points = torch.tensor([[0.0], [1.0], [1.5], [2.5], [10.0], [11.0]])
    # Centroids 0.5 and 2.0 (radii 0.5 each) are 1.5 apart: no merge; 10.5 is far from both.
    assert merge_unseparated(points, torch.tensor([0, 0, 1, 1, 2, 2])).tolist() == [0, 0, 1, 1, 2, 2]
    # One blob in 20 dimensions cut in two by the sign of one coordinate: the halves' centroids are far closer
    # than the spread of their points in the other dimensions, so they merge back.
    blob = torch.randn(40, 20, generator=torch.Generator().manual_seed(0))
    assert merge_unseparated(blob, (blob[:, 0] > 0).long()).tolist() == [0] * 40
    # Two blobs apart stay two; a fixed num_clusters is not merged (the caller asked for them).
    apart = torch.cat([blob[:20], blob[20:] + 10.0])
    assert merge_unseparated(apart, (torch.arange(40) >= 20).long()).tolist() == [0] * 20 + [1] * 20
    assert spectral_clusters(blob, num_clusters=2).num_clusters == 2


def test_a_fit_whose_maps_are_too_weak_logs_no_strategies_and_says_why(
    tmp_path, monkeypatch, data_factory, classifier_factory, trainer_factory, events_reader
):
    def weak_attribute(self, images, target=None, **kwargs):  # a model at chance: the places, without strength
        return 0.009 * scripted_attribute(self, images)

    monkeypatch.setattr(CAAP, "attribute", weak_attribute)
    images, labels, _ = scripted_probe()
    caap = CAAPCallback(probe=(images, labels), num_images=64, metrics=["fixed_position_ratio"], target="label",
                        log_images=False, mean=HALF, std=HALF)
    monitor = SpuriousCueMonitor(num_images=3, threshold=1e6)
    trainer = trainer_factory(tmp_path, [caap, monitor], max_epochs=1, limit_train_batches=1)
    trainer.fit(classifier_factory(), datamodule=data_factory())
    names = [f"class/{caap.last.class_name(c)}" for c in (0, 1)]
    assert monitor.discovers_strategies and sorted(monitor.last_strategies) == ["all", *sorted(names)]
    assert all(group.strategies == [] for group in monitor.last_strategies.values())
    events = events_reader(trainer.logger.log_dir)
    step = next(iter(events["scalars"]["spurious/score"]))
    assert events["scalars"]["spurious/strategies/all/clusters"][step] == 0.0
    assert not any(tag.startswith("spurious/strategies/") for tag in events["images"])
    text = events["texts"]["spurious/strategies/text_summary"][step]
    assert "**all classes**: no strategies shown: the maps are too weak to cluster: 0 of 64 hold evidence" in text
