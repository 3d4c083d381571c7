"""The alarm as a person meets it: one console line with the region, how many probe images follow it and one next
step; the details in the text entry; the cue named where its own swap scalar of the watched kind (ratio or follow
share) explains the alarm."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from caap_lightning.callbacks import ProbeResult, SpuriousCueMonitor
from caap_lightning.callbacks.alarm_report import CONSOLE_CHARACTERS, console_line
from caap_lightning.callbacks.metric_table import logged_table
from caap_lightning.datamodules.base import ProbeBatch

N = 64
BACKGROUND, CUE = "caap/background_swap_ratio", "caap/cue_swap_ratio"
BACKGROUND_SHARE, CUE_SHARE = "caap/background_swap_follow_share", "caap/cue_swap_follow_share"


def stand_in(tmp_path) -> SimpleNamespace:
    """A Trainer's part the monitor reads: no logger, so the text entry is a file under ``tmp_path``."""
    return SimpleNamespace(loggers=[], is_global_zero=True, world_size=1, global_rank=0, default_root_dir=str(tmp_path))


def probe_with_cues() -> ProbeBatch:
    masks = torch.zeros(N, 16, 16, dtype=torch.bool)
    masks[:, 4:12, 4:12] = True
    cue_masks = torch.zeros(N, 16, 16, dtype=torch.bool)
    cue_masks[:, :3, :3] = True  # a corner marker
    return ProbeBatch(images=torch.rand(N, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                      labels=torch.arange(N) % 4, masks=masks, cue_masks=cue_masks)


class Published:
    """A CAAPCallback's table with both swap tests (their ratios and follow shares)."""

    def __init__(self, probe: ProbeBatch) -> None:
        self.methods, self.probe, self.last = ["caap"], probe, None
        self.logged = logged_table(self.methods, ["background_swap_ratio", "cue_swap_ratio"],
                                   lambda method, scalar: f"caap/{scalar}", probe, probe)
        self.logged_metrics = [*self.logged, "caap/swap_probe_skill", "caap/seconds"]


def follows(ones: int, zeros: int) -> torch.Tensor:
    """Per pair: 1 follows the swapped region, 0 does not, NaN not scored (the rest of the probe)."""
    return torch.cat([torch.ones(ones), torch.zeros(zeros), torch.full((N - ones - zeros,), torch.nan)])


def result(probe: ProbeBatch, cue_ratio: float, cue_follows=(41, 23)) -> ProbeResult:
    """A judged check: the background's ratio 1.5 and follow share 30 of 60 (0.5); the cue's ``cue_ratio`` and
    ``cue_follows`` (follows, does not follow) pairs."""
    ratios = torch.linspace(0.5, 2.0, N)
    ones, zeros = cue_follows
    return ProbeResult(
        # A model sure of its clean swap probe (skill 0.9): the check is judged (issue 29).
        epoch=2, step=30, stage="fit", metrics={BACKGROUND: 1.5, CUE: cue_ratio, BACKGROUND_SHARE: 0.5,
                                                CUE_SHARE: ones / (ones + zeros), "caap/swap_probe_skill": 0.9},
        targets=probe.labels.clone(), scores=torch.full((N,), 0.9), method_maps={"caap": torch.rand(N, 2, 2)},
        probe=probe, mean=(0.5,) * 3, std=(0.5,) * 3, swap_probe=probe,
        model_test_image_values={BACKGROUND: ratios, CUE: ratios, BACKGROUND_SHARE: follows(30, 30),
                                 CUE_SHARE: follows(ones, zeros)},
    )


def alarm(tmp_path, cue_ratio: float, watched: str = BACKGROUND, cue_follows=(41, 23), **monitor_kwargs):
    probe = probe_with_cues()
    monitor = SpuriousCueMonitor(num_images=2, strategies=False, **monitor_kwargs)
    monitor.watch([Published(probe)])
    assert monitor.monitor_key == watched
    with pytest.warns(UserWarning, match="alarm at epoch 2") as record:
        monitor.read(stand_in(tmp_path), result(probe, cue_ratio, cue_follows))
    (line,) = [str(w.message) for w in record if "alarm at epoch" in str(w.message)]
    text = (tmp_path / "caap_images" / "version_0" / "spurious_alarm_step30.md").read_text()
    return line, text


def ratio_alarm(tmp_path, cue_ratio: float, **kwargs):
    """The background's swap ratio watched at the ratio's own threshold of 1.1."""
    return alarm(tmp_path, cue_ratio, monitor=BACKGROUND, threshold=1.1, **kwargs)


def test_the_alarm_names_the_cue_when_its_swap_ratio_is_past_the_threshold_too(tmp_path):
    line, text = ratio_alarm(tmp_path, cue_ratio=1.3)
    assert len(line) <= CONSOLE_CHARACTERS and "\n" not in line
    assert line.startswith("SpuriousCueMonitor: alarm at epoch 2 (step 30): caap/background_swap_ratio = 1.500 > 1.1; "
                           "41 of 64 probe images follow the cue, not the rest of the image "
                           "(caap/cue_swap_ratio = 1.300 too). Next: break the cue's tie to the class")
    # The details: the rule, what the score means, each swap test's follow count, the next step, the images.
    assert "(best 1.500; 1 checks in a row" in text and "The score is on probe images given the background" in text
    assert "- `caap/background_swap_ratio` = 1.500: 30 of 60 probe images follow the background, not the object." in text
    assert "- `caap/cue_swap_ratio` = 1.300: 41 of 64 probe images follow the cue, not the rest of the image." in text
    assert "Next step: break the cue's tie to the class in the training data." in text
    assert len([row for row in text.splitlines() if row.startswith("| #")]) == 2


def test_the_alarm_names_the_background_when_the_cue_does_not_explain_it(tmp_path):
    line, _ = ratio_alarm(tmp_path, cue_ratio=0.8)
    assert len(line) <= CONSOLE_CHARACTERS
    assert "; 30 of 60 probe images follow the background, not the object. Next: train on varied backgrounds" in line
    assert "cue" not in line


def test_a_follow_share_alarm_names_the_cue_when_its_follow_share_is_past_the_threshold_too(tmp_path):
    """Issue 29: the default watch, the background's follow share at 0.4; the cue's follow share (41 of 64) is past
    0.4 too, so the cue carries the shortcut."""
    line, text = alarm(tmp_path, cue_ratio=0.8, watched=BACKGROUND_SHARE)
    assert len(line) <= CONSOLE_CHARACTERS and "\n" not in line
    assert line.startswith("SpuriousCueMonitor: alarm at epoch 2 (step 30): caap/background_swap_follow_share = 0.500 "
                           "> 0.4; 41 of 64 probe images follow the cue, not the rest of the image "
                           "(caap/cue_swap_follow_share = 0.641 too). Next: break the cue's tie to the class")
    # The cue's swap ratio (0.8) is below the ratio's scale: the watched kind decides, not the other one.
    assert "caap/cue_swap_ratio" not in line
    assert "The score is the share of probe images given the background" in text
    assert "Next step: break the cue's tie to the class in the training data." in text


def test_a_follow_share_alarm_names_the_background_when_the_cues_share_is_under_the_threshold(tmp_path):
    """The cue's follow share 20 of 64 (0.312) is under 0.4, however far its swap ratio (1.3) is past 1.1."""
    line, _ = alarm(tmp_path, cue_ratio=1.3, watched=BACKGROUND_SHARE, cue_follows=(20, 44))
    assert line.startswith("SpuriousCueMonitor: alarm at epoch 2 (step 30): caap/background_swap_follow_share = 0.500 "
                           "> 0.4; 30 of 60 probe images follow the background, not the object. Next: train on varied "
                           "backgrounds")
    assert "cue" not in line


def test_the_console_line_stays_within_its_length():
    head = "SpuriousCueMonitor: alarm at epoch 1 (step 2): " + "x" * 400
    line = console_line(head, "the model relies on the cue", "cue", "'spurious/alarm' in TensorBoard")
    assert len(line) == CONSOLE_CHARACTERS and line.endswith("…")
    short = console_line("alarm", "the model relies on the cue", "cue", "'spurious/alarm' in TensorBoard")
    assert short == ("alarm; the model relies on the cue. Next: break the cue's tie to the class in the training "
                     "data. Details: 'spurious/alarm' in TensorBoard.")


def test_a_fit_writes_a_custom_scalars_layout_with_the_alarm_first(tmp_path, data_factory, classifier_factory,
                                                                   trainer_factory):
    """TensorBoard's Custom Scalars tab: the monitor's alarm and score first, as unsmoothed margin charts, then the
    callback's swap ratios and follow shares."""
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    from caap_lightning.callbacks import CAAPCallback

    caap = CAAPCallback(num_images=4, swap_images=8, metrics=["background_swap_ratio", "border_swap_ratio"],
                        log_images=False)
    monitor = SpuriousCueMonitor(threshold=None, strategies=False)
    trainer = trainer_factory(tmp_path, [caap, monitor], max_epochs=1, limit_train_batches=1)
    trainer.fit(classifier_factory(), datamodule=data_factory())
    (path,) = glob.glob(f"{trainer.logger.log_dir}/events.out.tfevents.*")
    events = EventAccumulator(path, size_guidance={"tensors": 0})
    events.Reload()
    (config,) = events.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    assert [category.title for category in layout.category] == ["spurious", "caap"]
    alarm, score, judged = layout.category[0].chart
    assert alarm.title.startswith("alarm") and [alarm.margin.series[0].value, alarm.margin.series[0].lower,
                                                alarm.margin.series[0].upper] == ["spurious/alarm"] * 3
    assert score.title == "score (caap/background_swap_follow_share), unsmoothed"
    # The watched follow share is judged only where the model tells the swap images apart: the 0/1 series unsmoothed.
    assert judged.title.startswith("check judged") and judged.margin.series[0].value == "spurious/judged"
    ratios, shares, skill = layout.category[1].chart
    assert list(ratios.multiline.tag) == ["caap/background_swap_ratio", "caap/border_swap_ratio"]
    assert list(shares.multiline.tag) == ["caap/background_swap_follow_share", "caap/border_swap_follow_share"]
    assert list(skill.multiline.tag) == ["caap/swap_probe_skill"]
    # Every tag of the layout is a scalar the callback logs.
    assert {*ratios.multiline.tag, *shares.multiline.tag} <= set(caap.logged)
    assert set(skill.multiline.tag) <= set(caap.logged_metrics)


def test_a_check_after_a_slow_one_says_what_it_does(caplog):
    import logging

    from caap_lightning.callbacks.drawing import SLOW_CHECK_SECONDS, announce_if_slow

    probe = probe_with_cues()

    def callback(seconds):
        history = [] if seconds is None else [{"epoch": 0, "caap/seconds": seconds}]
        return SimpleNamespace(history=history, prefix="caap", methods=["caap", "gradcam"], probe=probe,
                               swap_probe=probe)

    with caplog.at_level(logging.INFO):
        for seconds in (None, SLOW_CHECK_SECONDS / 2):
            announce_if_slow(callback(seconds))
        assert "checking the model" not in caplog.text
        announce_if_slow(callback(27.0))
    assert ("CAAPCallback: checking the model: CAAP, gradcam maps of 64 probe images and the swap tests on 64 images "
            "(the last check took 27 s; training goes on after it).") in caplog.text
