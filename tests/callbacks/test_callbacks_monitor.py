"""SpuriousCueMonitor: alarms on a series past the threshold that does not improve, from the first check on; quiet
below it; its default score follows the probe's masks; in a Trainer and alone."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import pytest
import torch

from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.callbacks import ProbeResult
from caap_lightning.callbacks.spurious_cue_monitor import DEFAULT_PATIENCE, DEFAULT_THRESHOLD
from caap_lightning.model_tests import JUDGED_SKILL, border_masks, rest_colour
from caap_lightning.model_tests.views import dilate, edge_width

CUE = "caap/cue_density_ratio"

RISING = [0.8, 1.0, 1.6, 2.4, 3.0]
FLAT = [2.0, 2.02, 1.98, 2.0, 2.01]


def alarms(monitor: SpuriousCueMonitor, series):
    return [i for i, score in enumerate(series) if monitor.update(score)]


def test_alarm_after_patience_checks_past_the_threshold_without_improvement():
    assert alarms(SpuriousCueMonitor(threshold=1.5, patience=2), RISING) == [3]  # 1.6 and 2.4 are past 1.5
    assert alarms(SpuriousCueMonitor(threshold=None, patience=2), RISING) == [2]
    assert alarms(SpuriousCueMonitor(threshold=2.5, patience=2), FLAT) == []  # below the threshold
    # Past it from the first check and flat: the first check is bad too, so patience 2 alarms at the second.
    assert alarms(SpuriousCueMonitor(threshold=1.5, patience=2), FLAT) == [1]
    # 11.8 is bad, 11.4 and 11.2 improve by more than min_delta (each resets), then two flat checks alarm.
    assert alarms(SpuriousCueMonitor(threshold=4.0, patience=2), [11.8, 11.4, 11.2, 11.2, 11.2]) == [4]
    # Falling by more than min_delta at every check is improvement, however high the score.
    assert alarms(SpuriousCueMonitor(threshold=1.5, patience=2), [3.0, 2.8, 2.6, 2.4, 2.2]) == []
    # 0.8 is under min_delta better than 1.0 (bad); 0.2 is an improvement, which resets; 0.5 is bad again.
    assert alarms(SpuriousCueMonitor(threshold=None, patience=1, min_delta=0.5), [1.0, 0.8, 0.2, 0.5]) == [1, 3]
    # alarm_on="low": a falling score (e.g. pointing game) is the bad direction.
    assert alarms(SpuriousCueMonitor(threshold=0.5, patience=2, alarm_on="low"), [0.9, 0.6, 0.4, 0.3]) == [3]


def test_the_first_check_past_the_threshold_is_bad():
    """The scores mean the same at every check (1 = uniform map): a first check past the threshold counts."""
    monitor = SpuriousCueMonitor(threshold=2.0, patience=1)
    assert monitor.update(3.0) and monitor.best == 3.0 and monitor.wait == 1
    monitor = SpuriousCueMonitor(threshold=2.0, patience=2)
    assert alarms(monitor, [3.0, 3.05]) == [1]
    # Below the threshold the first check only sets the best value.
    monitor = SpuriousCueMonitor(threshold=2.0, patience=1)
    assert not monitor.update(1.5) and (monitor.best, monitor.wait) == (1.5, 0)
    # With no threshold there is nothing absolute to be past: the first check only sets the best, as before.
    assert alarms(SpuriousCueMonitor(threshold=None, patience=1), [3.0, 3.0, 2.0]) == [1]
    # alarm_on="low": a first check below the threshold is bad.
    assert alarms(SpuriousCueMonitor(threshold=0.5, patience=1, alarm_on="low"), [0.2]) == [0]
    assert DEFAULT_THRESHOLD == SpuriousCueMonitor().threshold == 0.4
    assert DEFAULT_PATIENCE == SpuriousCueMonitor().patience == 1  # one check past the threshold alarms


def test_an_improving_check_resets_the_count():
    monitor = SpuriousCueMonitor(threshold=None, patience=2)
    assert alarms(monitor, [1.0, 1.5, 0.8, 1.5, 1.6]) == [4]
    assert monitor.best == 0.8 and monitor.alarmed
    # An improvement under min_delta is no improvement: it neither resets the count nor becomes the best.
    monitor = SpuriousCueMonitor(threshold=None, patience=2, min_delta=0.1)
    assert alarms(monitor, [1.0, 1.5, 0.95]) == [2] and monitor.best == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alarm_on": "up"}, "alarm_on='up'"),
        ({"on_error": "ignore"}, "on_error='ignore'"),
        ({"prefix": "a/b"}, "prefix"),
        ({"patience": 0}, "patience >= 1"),
        ({"min_delta": -1}, "min_delta >= 0"),
        ({"monitor": "acc"}, "must be a metric logged by CAAPCallback"),
        ({"strategies": "yes"}, "strategies='yes'"),
        ({"strategy_max_clusters": 1}, "strategy_max_clusters"),
        ({"strategy_examples": 0}, "strategy_examples"),
    ],
)
def test_arguments_are_validated_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpuriousCueMonitor(**kwargs)


def test_the_count_and_best_carry_over_a_resume():
    """Two bad checks, a checkpoint, one more after the resume: patience 3 is reached only with the restored state."""
    before = SpuriousCueMonitor(threshold=None, patience=3)
    assert alarms(before, [1.0, 1.5, 2.0]) == []
    resumed = SpuriousCueMonitor(threshold=None, patience=3)
    resumed.load_state_dict(before.state_dict())
    assert (resumed.best, resumed.wait) == (1.0, 2)
    assert resumed.update(2.5)


def fit(tmp_path, data_factory, classifier_factory, trainer_factory, scripted, series, **monitor_kwargs):
    caap = scripted(CAAPCallback(num_images=4, metrics=["cue_density_ratio", "background_mass"], log_images=False),
                    series, CUE)
    # The scripted series rise past 1.5, not past the default threshold.
    monitor = SpuriousCueMonitor(monitor=CUE, num_images=2, **{"threshold": 1.5, "patience": 2, **monitor_kwargs})
    trainer = trainer_factory(tmp_path, [caap, monitor], max_epochs=len(series), limit_train_batches=1)
    trainer.fit(classifier_factory(), datamodule=data_factory())
    return trainer, monitor


def test_in_a_fit_rising_series_alarms_with_warning_scalar_and_text(
    tmp_path, scripted, data_factory, classifier_factory, trainer_factory, events_reader
):
    with pytest.warns(UserWarning, match=r"SpuriousCueMonitor: alarm at epoch 3 \(step \d+\): caap/cue_density_ratio = 2\.400") as record:
        trainer, monitor = fit(tmp_path, data_factory, classifier_factory, trainer_factory, scripted, RISING)
    assert monitor.monitor_key == CUE and not monitor.discovers_strategies
    # The warning says which score fired and where; what it measures is in the text entry (one console line: issue 29).
    assert any("relies on the cue. Next: " in str(w.message) for w in record)
    assert [a["epoch"] for a in monitor.alarms] == [3]

    events = events_reader(trainer.logger.log_dir)
    score, alarm = events["scalars"]["spurious/score"], events["scalars"]["spurious/alarm"]
    steps = sorted(score)
    assert [round(score[s], 4) for s in steps] == RISING
    assert [alarm[s] for s in steps] == [0, 0, 0, 1, 1]
    text = events["texts"]["spurious/alarm/text_summary"]
    assert list(text) == [steps[3]]
    assert "epoch 3" in text[steps[3]] and "rely most on the cue" in text[steps[3]] and "| #" in text[steps[3]]
    assert "the evidence density on the cue over its density off it; 1 for a uniform map" in text[steps[3]]
    assert "`caap/cue_density_ratio` = 2.400" in text[steps[3]] and "density on the cue over" in text[steps[3]]
    assert events["images"]["spurious/alarm_images"] == [steps[3]]


def test_in_a_fit_series_below_the_threshold_stays_quiet(
    tmp_path, scripted, data_factory, classifier_factory, trainer_factory, events_reader
):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="SpuriousCueMonitor")
        trainer, monitor = fit(tmp_path, data_factory, classifier_factory, trainer_factory, scripted, FLAT, threshold=2.5)
    assert monitor.alarms == [] and not monitor.alarmed
    events = events_reader(trainer.logger.log_dir)
    assert set(events["scalars"]["spurious/alarm"].values()) == {0.0}
    assert "spurious/alarm/text_summary" not in events["texts"]


@pytest.mark.filterwarnings("ignore:SpuriousCueMonitor")
def test_stop_training_ends_the_fit_at_the_alarm(tmp_path, scripted, data_factory, classifier_factory, trainer_factory):
    trainer, monitor = fit(tmp_path, data_factory, classifier_factory, trainer_factory, scripted, RISING, stop_training=True)
    assert monitor.alarms[0]["epoch"] == 3 and trainer.current_epoch == 4 and len(monitor.history) == 4


def test_setup_errors_say_what_to_change(tmp_path, data_factory, classifier_factory, trainer_factory):
    trainer = trainer_factory(tmp_path, [SpuriousCueMonitor()])
    with pytest.raises(ValueError, match="the trainer has none; add one"):
        trainer.fit(classifier_factory(), datamodule=data_factory())
    caap = CAAPCallback(metrics=["pointing_game"])
    trainer = trainer_factory(tmp_path, [caap, SpuriousCueMonitor(monitor="caap/cue_mass_ratio")])
    with pytest.raises(ValueError, match=r"monitor='caap/cue_mass_ratio' is not among the metrics CAAPCallback logs"):
        trainer.fit(classifier_factory(), datamodule=data_factory())
    trainer = trainer_factory(tmp_path, [CAAPCallback(metrics=["insertion_deletion"]), SpuriousCueMonitor()])
    with pytest.raises(ValueError, match="log none of them .* add 'border_swap_ratio'"):
        trainer.fit(classifier_factory(), datamodule=data_factory())


def probe_of(data, n: int, masks=None):
    data.setup("fit")
    batch = data.probe_batch(n)
    return (batch.images, batch.labels) if masks is None else (batch.images, batch.labels, masks)


def test_setup_refuses_a_probe_the_watched_density_cannot_score(tmp_path, data_factory, classifier_factory, trainer_factory):
    data = data_factory(cue_correlation=None)
    blank = torch.zeros(4, 32, 32, dtype=torch.bool)  # no object anywhere: no "on the object" to compare with
    caap = CAAPCallback(probe=probe_of(data, 4, blank), metrics=["background_density_ratio"], log_images=False)
    with pytest.raises(ValueError, match=r"cannot watch caap/background_density_ratio on this probe of 4 image\(s\): every one of the 4 masks is empty"):
        trainer_factory(tmp_path, [caap, SpuriousCueMonitor()]).fit(classifier_factory(), datamodule=data)
    # The model tests refuse such masks as early.
    caap = CAAPCallback(probe=probe_of(data, 4, blank), metrics=["background_insertion_ratio"], log_images=False)
    with pytest.raises(ValueError, match=r"cannot watch caap/background_insertion_ratio on this probe of 4 image\(s\): every one of the 4 masks is empty"):
        trainer_factory(tmp_path, [caap, SpuriousCueMonitor()]).fit(classifier_factory(), datamodule=data)
    caap = CAAPCallback(probe=probe_of(data, 1), num_images=1, metrics=["fixed_position_ratio"], log_images=False)
    with pytest.raises(ValueError, match=r"fixed_position_ratio on this probe of 1 image\(s\): .* at least 2 maps"):
        trainer_factory(tmp_path, [caap, SpuriousCueMonitor()]).fit(classifier_factory(), datamodule=data)


@pytest.mark.filterwarnings("ignore:SpuriousCueMonitor")
def test_default_monitor_follows_the_masks(tmp_path, data_factory, classifier_factory, trainer_factory):
    """Cue masks, object masks, no masks: the follow share of the swap test the masks allow, one default threshold
    for the three, strategies without masks."""
    data = data_factory(cue_correlation=None)
    cued = data_factory(cue_correlation=0.9)
    cued.setup("fit")
    batch = cued.probe_batch(8)
    regimes = [
        # Object masks come first, with or without cue masks: the background alone holds the cue in its context.
        (cued, None, "caap/background_swap_follow_share", False),
        (cued, {"images": batch.images, "labels": batch.labels, "cue_masks": batch.cue_masks},
         "caap/cue_swap_follow_share", False),
        (data, None, "caap/background_swap_follow_share", False),
        (data, probe_of(data, 8), "caap/border_swap_follow_share", True),
    ]
    for datamodule, probe, expected, strategies in regimes:
        # Every check counts (min_skill=None): the untrained models' swap checks are not judged by default (issue 29).
        monitor = SpuriousCueMonitor(min_skill=None)
        caap = CAAPCallback(probe=probe, num_images=8, log_images=False)
        trainer_factory(tmp_path, [caap, monitor]).fit(classifier_factory(), datamodule=datamodule)
        assert monitor.monitor_key == expected and len(monitor.history) == 2
        assert monitor.threshold == DEFAULT_THRESHOLD and monitor.discovers_strategies is strategies
        assert [row["score"] for row in monitor.history] == [row[expected] for row in caap.history]
        scores = [row["score"] for row in monitor.history]
        # An untrained model's follow share is a coin toss over the probe's pairs of two classes (0 to 0.6 here), not
        # below the threshold: with every check counted, one past it alarms; the default min_skill does not judge them.
        assert all(0.0 <= s <= 1.0 for s in scores) and monitor.alarmed == any(s > DEFAULT_THRESHOLD for s in scores)
    # Without masks, strategies are on: 8 probe images are enough for the group of all classes only.
    assert sorted(monitor.last_strategies) == ["all"]
    # At the default min_skill the untrained model's swap checks are not judged: they raise no alarm.
    monitor = SpuriousCueMonitor()
    trainer_factory(tmp_path, [CAAPCallback(num_images=8, log_images=False), monitor]).fit(
        classifier_factory(), datamodule=data)
    assert monitor.monitor_key == "caap/background_swap_follow_share" and monitor.min_skill == JUDGED_SKILL
    assert monitor.history == [] and not monitor.alarmed


def test_a_small_probe_with_strategies_warns_in_setup(tmp_path, data_factory, classifier_factory, trainer_factory):
    data = data_factory(cue_correlation=None)
    caap = CAAPCallback(probe=probe_of(data, 4), num_images=4, metrics=["fixed_position_ratio"], log_images=False)
    with pytest.warns(UserWarning, match=r"clusters the 4 probe images.* num_images=64 to 256, or strategies=False"):
        trainer_factory(tmp_path, [caap, SpuriousCueMonitor()], max_epochs=1).fit(classifier_factory(), datamodule=data)
    # On a masked probe strategies are off unless asked for.
    caap = CAAPCallback(num_images=4, metrics=["cue_density_ratio"], log_images=False)
    monitor = SpuriousCueMonitor(strategies=True)
    with pytest.warns(UserWarning, match="clusters the 4 probe images"):
        trainer_factory(tmp_path, [caap, monitor], max_epochs=1).fit(classifier_factory(), datamodule=data_factory())
    assert monitor.discovers_strategies and monitor.last_strategies == {}  # 4 images: no group to cluster


def test_a_failing_alarm_report_warns_and_training_goes_on(
    tmp_path, scripted, monkeypatch, data_factory, classifier_factory, trainer_factory
):
    def broken(*args, **kwargs):
        raise RuntimeError("no canvas")

    monkeypatch.setattr(ProbeResult, "draw_rows", broken)
    with pytest.warns(UserWarning) as record:
        trainer, monitor = fit(tmp_path, data_factory, classifier_factory, trainer_factory, scripted, [0.8, 2.0, 3.0], patience=1)
    messages = [str(w.message) for w in record]
    assert any("SpuriousCueMonitor: alarm at epoch 1" in m for m in messages)
    assert any("SpuriousCueMonitor: reporting the alarm failed at epoch 1 (RuntimeError: no canvas)" in m for m in messages)
    assert trainer.current_epoch == 3 and len(monitor.history) == 3


def test_a_check_without_the_monitored_score_is_skipped_with_a_reason(
    tmp_path, data_factory, classifier_factory, trainer_factory
):
    caap = CAAPCallback(num_images=4, metrics=["cue_density_ratio"], log_images=False)
    finish = caap._gather_result

    def drops_epoch_one(*args):  # as when no probe image could be scored for the metric
        result = finish(*args)
        if result.epoch == 1:
            del result.metrics[CUE]
        return result

    caap._gather_result = drops_epoch_one
    monitor = SpuriousCueMonitor(threshold=None)
    with pytest.warns(UserWarning, match=r"the check at epoch 1 is not counted: caap/cue_density_ratio was not logged"):
        trainer_factory(tmp_path, [caap, monitor], max_epochs=3, limit_train_batches=1).fit(
            classifier_factory(), datamodule=data_factory()
        )
    assert [h["epoch"] for h in monitor.history] == [0, 2]


def test_without_masks_a_fixed_position_score_past_the_threshold_alarms_from_the_first_check(
    tmp_path, scripted, data_factory, classifier_factory, trainer_factory, events_reader
):
    data = data_factory(cue_correlation=None)
    caap = scripted(CAAPCallback(probe=probe_of(data, 8), num_images=8, metrics=["fixed_position_ratio"],
                                 log_images=False), [2.5, 2.55], "caap/fixed_position_ratio")
    monitor = SpuriousCueMonitor(num_images=2, strategies=False, patience=2)
    trainer = trainer_factory(tmp_path, [caap, monitor], max_epochs=2, limit_train_batches=1)
    with pytest.warns(UserWarning, match=r"alarm at epoch 1 \(step \d+\): caap/fixed_position_ratio = 2\.550"):
        trainer.fit(classifier_factory(), datamodule=data)
    # The first check is already bad: patience 2 is reached at the second.
    assert [h["alarm"] for h in monitor.history] == [0.0, 1.0] and monitor.last_strategies == {}
    events = events_reader(trainer.logger.log_dir)
    steps = sorted(events["scalars"]["spurious/score"])
    text = events["texts"]["spurious/alarm/text_summary"][steps[1]]
    assert "The hot region of all the probe's maps together sits at the" in text and "(10% of the image)" in text
    assert "Probe images that rely most on the fixed position" in text and "strategies among all" not in text
    # Their per-image fixed-position scores, as the metric computes them from the (last) check's maps.
    per_image = monitor.image_scores(caap.last)
    rows = [line for line in text.splitlines() if line.startswith("| #")]
    assert [int(r.split("|")[1].strip()[1:]) for r in rows] == torch.argsort(per_image, descending=True)[:2].tolist()
    assert f"{float(per_image.max()):.3f}" in rows[0]
    assert events["images"]["spurious/alarm_images"] == [steps[1]]


def test_an_alarm_on_a_model_test_names_the_images_by_their_own_ratio(
    tmp_path, scripted, data_factory, classifier_factory, trainer_factory, events_reader
):
    """The insertion ratio's alarm: what the score means, and the probe images whose own ratio is highest."""
    data = data_factory(cue_correlation=None)
    key = "caap/background_insertion_ratio"
    caap = scripted(CAAPCallback(num_images=4, metrics=["background_insertion_ratio"], log_images=False), [3.0], key)
    monitor = SpuriousCueMonitor(num_images=4, patience=1)
    trainer = trainer_factory(tmp_path, [caap, monitor], max_epochs=1, limit_train_batches=1)
    with pytest.warns(UserWarning, match=r"alarm at epoch 0 .* relies on the background\. Next: "):
        trainer.fit(classifier_factory(), datamodule=data)
    per_image = caap.last.per_image[key]
    assert per_image.shape == (4,) and torch.isfinite(per_image).all()
    text = next(iter(events_reader(trainer.logger.log_dir)["texts"]["spurious/alarm/text_summary"].values()))
    assert ("the class probability that the background (everything off the object, any cue there included) alone "
            "restores over what the object alone restores") in text
    order = torch.argsort(per_image, descending=True, stable=True).tolist()
    rows = [line for line in text.splitlines() if line.startswith("| #")]
    assert [int(row.split("#")[1].split(" ")[0]) for row in rows] == order
    assert [row.rsplit("|", 2)[-2].strip() for row in rows] == [f"{float(per_image[i]):.3f}" for i in order]
    # The alarm's images add what the test showed the model: the background alone and the image without it.
    assert "the background alone and the image without it" in text
    probe = caap.last.probe
    rows = order[:4]
    grid = caap.last.draw_rows(rows, caap.last.model_test_views(caap.logged[key].model_test, rows))
    plain = caap.last.draw_rows(rows)
    assert grid.shape[0] == plain.shape[0] and grid.shape[1] > plain.shape[1]
    views = caap.last.model_test_views(caap.logged[key].model_test, rows)
    alone, without = views["background alone"], views["without the background"]
    objects = probe.masks[torch.as_tensor(rows)]
    # Without the background: the object's pixels as they are, the rest the probe's mean background colour.
    colour = rest_colour(probe.images, probe.masks)
    assert torch.allclose(without[0][:, ~objects[0]], colour[:, None].expand(3, int((~objects[0]).sum())))
    # The background alone: the image as it is beyond the object and its edge.
    beyond = ~dilate(objects, edge_width(tuple(objects.shape[-2:])))[0]
    assert torch.equal(alone[0][:, beyond], probe.images[rows[0]][:, beyond])


def test_an_alarm_on_a_swap_test_shows_each_image_with_its_donor_region(
    tmp_path, scripted, data_factory, classifier_factory, trainer_factory, events_reader
):
    """The swap ratio's alarm: what the score means, and each named image as the test showed it, with its donor's border."""
    data = data_factory(cue_correlation=None)
    key = "caap/border_swap_ratio"
    caap = scripted(CAAPCallback(num_images=4, swap_images=8, metrics=["border_swap_ratio"], log_images=False), [3.0], key)
    scripted(caap, [0.9], "caap/swap_probe_skill")  # a model sure of the swap probe: the check is judged
    # The swap ratio, watched at the ratio's own threshold (the default watches the follow share).
    monitor = SpuriousCueMonitor(monitor=key, threshold=1.1, num_images=4, patience=1)
    trainer = trainer_factory(tmp_path, [caap, monitor], max_epochs=1, limit_train_batches=1)
    with pytest.warns(UserWarning, match=r"alarm at epoch 0 .* caap/border_swap_ratio = 3\.000 > 1\.1; .*border.* Next: "):
        trainer.fit(classifier_factory(seed=1), datamodule=data)
    text = next(iter(events_reader(trainer.logger.log_dir)["texts"]["spurious/alarm/text_summary"].values()))
    assert ("on probe images given the image's border (its outer 12.5% on each side) of another probe image, the "
            "probability of that image's class over") in text
    assert "what the test showed the model: the image with another probe image's border" in text
    probe = caap.last.swap_probe
    assert len(probe) == 8 and len(caap.last.probe) == 4
    rows = [0, 3]
    (title, swapped), = caap.last.model_test_views(caap.logged[key].model_test, rows).items()
    assert title == "swapped border"
    # Image 0's donor is image 4, image 3's is image 7 (half the swap probe on, past the maps' 4 images): their
    # borders, each image's own inside.
    ring = border_masks(1, tuple(probe.images.shape[-2:]))[0]
    inside = ~dilate(ring[None], edge_width(tuple(ring.shape)))[0]
    for view, image, donor in zip(swapped, rows, (4, 7)):
        assert torch.equal(view[:, ring], probe.images[donor][:, ring])
        assert torch.equal(view[:, inside], probe.images[image][:, inside])


def test_a_model_that_names_one_class_for_every_image_leaves_the_swap_test_uncounted(
    tmp_path, data_factory, classifier_factory, trainer_factory
):
    classifier = classifier_factory()
    head = classifier.model.head
    with torch.no_grad():  # every image class 0, by a margin one training step cannot undo
        head.weight.zero_()
        head.bias.copy_(torch.tensor([20.0, 0.0, 0.0]))
    caap = CAAPCallback(num_images=4, metrics=["border_swap_ratio"], log_images=False)
    monitor = SpuriousCueMonitor()
    with pytest.warns(UserWarning, match=r"the check at epoch 0 is not counted: caap/border_swap_follow_share was not "
                      r"logged there \(the model gave every probe image the class of its partner\); the count stays at "
                      r"0 of 1"):
        trainer_factory(tmp_path, [caap, monitor], max_epochs=1, limit_train_batches=1).fit(
            classifier, datamodule=data_factory(cue_correlation=None)
        )
    assert monitor.monitor_key == "caap/border_swap_follow_share" and monitor.history == []
    assert "caap/border_swap_follow_share" not in caap.last.metrics and "caap/border_swap_ratio" not in caap.last.metrics


def test_a_fallback_score_at_the_default_threshold_warns_once(tmp_path, data_factory, classifier_factory, trainer_factory):
    data = data_factory(cue_correlation=None)
    caap = CAAPCallback(num_images=4, metrics=["background_density_ratio"], log_images=False)
    monitor = SpuriousCueMonitor()
    trainer = trainer_factory(tmp_path, [caap, monitor], max_epochs=1, limit_train_batches=1)
    chosen = "chosen for the swap tests' follow shares"
    with pytest.warns(UserWarning, match=r"watching caap/background_density_ratio at the default threshold 0.4, which was "
                      r"chosen for the swap tests' follow shares.*Set `threshold`") as caught:
        trainer.fit(classifier_factory(), datamodule=data)
        trainer.validate(classifier_factory(), datamodule=data, verbose=False)  # setup again: no second warning
    assert sum(chosen in str(w.message) for w in caught) == 1

    def warnings_of(monitor, metrics, data, swap_images):
        caap = CAAPCallback(num_images=4, swap_images=swap_images, metrics=metrics, log_images=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer_factory(tmp_path, [caap, monitor], max_epochs=1, limit_train_batches=1).fit(
                classifier_factory(), datamodule=data)
        return [str(w.message) for w in caught if "at the default threshold" in str(w.message)]

    # A swap ratio is a ratio, not a share: watched at the default threshold, it is warned about too.
    said = warnings_of(SpuriousCueMonitor(monitor="caap/border_swap_ratio"), ["border_swap_ratio"], data, 4)
    assert len(said) == 1 and f"watching caap/border_swap_ratio at the default threshold 0.4, which was {chosen}" in said[0]
    # The default follow share on fewer swap images than the threshold was chosen on: noisy.
    said = warnings_of(SpuriousCueMonitor(), ["border_swap_ratio"], data, 4)
    assert len(said) == 1 and ("watching caap/border_swap_follow_share at the default threshold 0.4 on 4 swap images; "
                               "it was chosen on 64") in said[0]
    # The default follow share on 64 swap images, or a threshold of one's own, is left alone.
    full = data_factory(cue_correlation=None, num_val=64)
    assert warnings_of(SpuriousCueMonitor(), ["border_swap_ratio"], full, 64) == []
    assert warnings_of(SpuriousCueMonitor(threshold=2.0), ["background_density_ratio"], data, 4) == []


def test_an_uncounted_check_names_non_finite_model_outputs(tmp_path, data_factory, classifier_factory, trainer_factory):
    classifier = classifier_factory()

    class Diverge(L.Callback):  # after setup, which refuses a model with NaN outputs from the start
        def on_validation_epoch_start(self, trainer, pl_module):
            with torch.no_grad():  # every output NaN: the swap pairs cannot be scored, not for want of two classes
                pl_module.model.head.bias.fill_(float("nan"))

    caap = CAAPCallback(num_images=4, metrics=["border_swap_ratio"], log_images=False)
    monitor = SpuriousCueMonitor()
    with pytest.warns(UserWarning, match=r"the check at epoch 0 is not counted: caap/border_swap_follow_share was not "
                      r"logged there \(the model's outputs on the probe images were not finite \(NaN or inf\)\)"):
        trainer_factory(tmp_path, [Diverge(), caap, monitor], max_epochs=1, limit_train_batches=1).fit(
            classifier, datamodule=data_factory(cue_correlation=None)
        )
    assert monitor.history == [] and caap.last.unscored["caap/border_swap_ratio"].startswith("the model's outputs")


def test_an_uncounted_check_names_a_probe_of_one_class(tmp_path, data_factory, classifier_factory, trainer_factory):
    data = data_factory(cue_correlation=None)
    images, labels = probe_of(data, 8)
    classifier = classifier_factory()
    with torch.no_grad():  # the probe's one class, by a margin one training step cannot undo
        classifier.model.head.weight.zero_()
        classifier.model.head.bias.copy_(torch.tensor([20.0, 0.0, 0.0]))
    caap = CAAPCallback(probe=(images, torch.zeros_like(labels)), num_images=4, metrics=["border_swap_ratio"],
                        log_images=False)
    monitor = SpuriousCueMonitor()
    with pytest.warns(UserWarning, match=r"not logged there \(the probe's images are all of one class, so no pair has "
                      r"two classes to compare\)"):
        trainer_factory(tmp_path, [caap, monitor], max_epochs=1, limit_train_batches=1).fit(classifier, datamodule=data)
    assert monitor.history == []


def test_the_defaults_on_a_small_mask_free_probe_do_not_warn(tmp_path, data_factory, classifier_factory, trainer_factory):
    """The README's settings: CAAPCallback() with its default swap probe on a source of fewer images, and the
    monitor's automatic strategy discovery on a probe of fewer than it wants, say nothing at warning level."""
    data = data_factory(cue_correlation=None)
    caap = CAAPCallback(probe=probe_of(data, 16), metrics=["fixed_position_ratio", "border_swap_ratio"],
                        log_images=False)
    monitor = SpuriousCueMonitor(monitor="caap/fixed_position_ratio", threshold=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CAAPCallback: the swap ratios run on")
        warnings.filterwarnings("error", message="SpuriousCueMonitor: strategy discovery")
        trainer_factory(tmp_path, [caap, monitor], max_epochs=1, limit_train_batches=1).fit(
            classifier_factory(), datamodule=data
        )
    assert len(caap.swap_probe) == 16 and monitor.discovers_strategies and len(monitor.history) == 1


def test_an_untrained_models_swap_checks_are_logged_with_their_skill_and_not_judged(
    tmp_path, data_factory, classifier_factory, trainer_factory, events_reader, caplog
):
    """Issue 29: a model at chance on the swap probe cannot answer a swap test; its checks are said, not counted."""
    data = data_factory(cue_correlation=0.9)
    caap = CAAPCallback(num_images=8, log_images=False)
    monitor = SpuriousCueMonitor(strategies=False)
    trainer = trainer_factory(tmp_path, [caap, monitor], limit_train_batches=1)
    with caplog.at_level(logging.INFO):
        trainer.fit(classifier_factory(), datamodule=data)
    assert monitor.monitor_key == "caap/background_swap_follow_share" and "caap/swap_probe_skill" in caap.logged_metrics
    skills = [row["caap/swap_probe_skill"] for row in caap.history]
    assert len(skills) == 2 and all(0.0 <= s < JUDGED_SKILL for s in skills)  # a tiny random ViT: near uniform
    # Not counted: no history, no count, no alarm; said in the log, as scalars and as a TensorBoard text.
    assert monitor.history == [] and monitor.wait == 0 and not monitor.alarmed and monitor.alarms == []
    said = [r.getMessage() for r in caplog.records if "is not judged" in r.getMessage()]
    assert len(said) == 2 and f"skill on the clean swap probe is {skills[0]:.2f}, below min_skill=0.3" in said[0]
    events = events_reader(trainer.logger.log_dir)
    assert set(events["scalars"]["spurious/judged"].values()) == {0.0}
    assert "spurious/alarm" not in events["scalars"] and len(events["scalars"]["spurious/score"]) == 2
    assert sorted(events["scalars"]["caap/swap_probe_skill"].values()) == pytest.approx(sorted(skills), rel=1e-5)
    texts = events["texts"]["spurious/not_judged/text_summary"]
    assert len(texts) == 2 and all("not judged" in t and "below min_skill=0.3" in t for t in texts.values())
