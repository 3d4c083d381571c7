"""SpuriousCueMonitor: alarms on a series past the threshold that does not improve, quiet below it, in a Trainer and alone."""

from __future__ import annotations

import warnings

import pytest

from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.callbacks.caap_callback import ProbeResult

RISING = [0.8, 1.0, 1.6, 2.4, 3.0]
FLAT = [2.0, 2.02, 1.98, 2.0, 2.01]


def alarms(monitor: SpuriousCueMonitor, series):
    return [i for i, score in enumerate(series) if monitor.update(score)]


def test_alarm_after_patience_checks_past_the_threshold_without_improvement():
    assert alarms(SpuriousCueMonitor(threshold=1.5, patience=2), RISING) == [3]  # 1.6 and 2.4 are past 1.5
    assert alarms(SpuriousCueMonitor(threshold=None, patience=2), RISING) == [2]
    assert alarms(SpuriousCueMonitor(threshold=2.5, patience=2), FLAT) == []  # below the threshold
    # Past it from the first check and flat: a cue learnt before the first check still alarms.
    assert alarms(SpuriousCueMonitor(threshold=1.5, patience=2), FLAT) == [2]
    assert alarms(SpuriousCueMonitor(threshold=4.0, patience=2), [11.8, 11.4, 11.2, 11.2, 11.2]) == [4]
    # Falling by more than min_delta at every check is improvement, however high the score.
    assert alarms(SpuriousCueMonitor(threshold=1.5, patience=2), [3.0, 2.8, 2.6, 2.4, 2.2]) == []
    # 0.8 is under min_delta better than 1.0 (bad); 0.2 is an improvement, which resets; 0.5 is bad again.
    assert alarms(SpuriousCueMonitor(threshold=None, patience=1, min_delta=0.5), [1.0, 0.8, 0.2, 0.5]) == [1, 3]
    # alarm_on="low": a falling score (e.g. pointing game) is the bad direction.
    assert alarms(SpuriousCueMonitor(threshold=0.5, patience=2, alarm_on="low"), [0.9, 0.6, 0.4, 0.3]) == [3]


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
    caap = scripted(CAAPCallback(num_images=4, metrics=["cue_mass_ratio", "background_mass"], log_images=False), series)
    # The scripted series rise past 1.5, not past the default threshold.
    monitor = SpuriousCueMonitor(num_images=2, **{"threshold": 1.5, **monitor_kwargs})
    trainer = trainer_factory(tmp_path, [caap, monitor], max_epochs=len(series), limit_train_batches=1)
    trainer.fit(classifier_factory(), datamodule=data_factory())
    return trainer, monitor


def test_in_a_fit_rising_series_alarms_with_warning_scalar_and_text(
    tmp_path, scripted, data_factory, classifier_factory, trainer_factory, events_reader
):
    with pytest.warns(UserWarning, match=r"SpuriousCueMonitor: alarm at epoch 3 \(step \d+\): caap/cue_mass_ratio = 2\.400"):
        trainer, monitor = fit(tmp_path, data_factory, classifier_factory, trainer_factory, scripted, RISING)
    assert monitor.monitor_key == "caap/cue_mass_ratio"
    assert [a["epoch"] for a in monitor.alarms] == [3]

    events = events_reader(trainer.logger.log_dir)
    score, alarm = events["scalars"]["spurious/score"], events["scalars"]["spurious/alarm"]
    steps = sorted(score)
    assert [round(score[s], 4) for s in steps] == RISING
    assert [alarm[s] for s in steps] == [0, 0, 0, 1, 1]
    text = events["texts"]["spurious/alarm/text_summary"]
    assert list(text) == [steps[3]]
    assert "epoch 3" in text[steps[3]] and "rely most on the cue" in text[steps[3]] and "| #" in text[steps[3]]
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
    with pytest.raises(ValueError, match="need cue or object masks"):
        trainer.fit(classifier_factory(), datamodule=data_factory())


def test_default_monitor_follows_the_masks(tmp_path, data_factory, classifier_factory, trainer_factory):
    for cue, expected in ((0.9, "caap/cue_mass_ratio"), (None, "caap/background_mass_ratio")):
        monitor = SpuriousCueMonitor()
        trainer = trainer_factory(tmp_path, [CAAPCallback(num_images=4, log_images=False), monitor])
        trainer.fit(classifier_factory(), datamodule=data_factory(cue_correlation=cue))
        assert monitor.monitor_key == expected and len(monitor.history) == 2


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
    caap = CAAPCallback(num_images=4, metrics=["cue_mass_ratio"], log_images=False)
    finish = caap._finish

    def drops_epoch_one(*args):  # as when no probe image could be scored for the metric
        result = finish(*args)
        if result.epoch == 1:
            del result.metrics["caap/cue_mass_ratio"]
        return result

    caap._finish = drops_epoch_one
    monitor = SpuriousCueMonitor(threshold=None)
    with pytest.warns(UserWarning, match=r"the check at epoch 1 is not counted: caap/cue_mass_ratio was not logged"):
        trainer_factory(tmp_path, [caap, monitor], max_epochs=3, limit_train_batches=1).fit(
            classifier_factory(), datamodule=data_factory()
        )
    assert [h["epoch"] for h in monitor.history] == [0, 2]
