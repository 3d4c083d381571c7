"""SpuriousCueMonitor reads what a CAAPCallback publishes and nothing else: here a hand-made logged table and
ProbeResults, with no Trainer run (a stand-in gives the loggers, none, and the folder the alarm is saved in)."""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

from caap_lightning.callbacks import ProbeResult, SpuriousCueMonitor
from caap_lightning.callbacks.metric_table import logged_table, resolve_metrics
from caap_lightning.callbacks.spurious_cue_monitor import (
    DEFAULT_SWAP_IMAGES, DEFAULT_THRESHOLD, default_key, default_threshold_warning,
)
from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.model_tests import JUDGED_SKILL

KEY = "caap/background_swap_follow_share"  # the default: the background swap test's follow share
SKILL_KEY = "caap/swap_probe_skill"


def probe_of(n: int = 4, size: int = 16) -> ProbeBatch:
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[:, 4:12, 4:12] = True
    return ProbeBatch(images=torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)),
                      labels=torch.arange(n) % 2, masks=masks)


class Published:
    """What a CAAPCallback publishes: its methods, probe, `logged` table and last result."""

    def __init__(self, probe: ProbeBatch) -> None:
        self.methods = ["caap"]
        self.probe = probe
        self.logged = logged_table(self.methods, ["background_mass", "background_swap_ratio"],
                                   lambda method, scalar: f"caap/{scalar}", probe, probe)
        # A swap test runs, so the swap probe's skill is published beside it (CAAPCallback.logged_metrics).
        self.logged_metrics = [*self.logged, SKILL_KEY, "caap/seconds"]
        self.last = None


def result(epoch: int, score: float, probe: ProbeBatch, per_image: torch.Tensor, skill: Optional[float] = 0.9) -> ProbeResult:
    """A published check; ``skill`` is the swap probe's (``None``: not logged, as where it was not finite)."""
    n = len(probe)
    metrics = {KEY: score, "caap/background_mass": 0.5, **({} if skill is None else {SKILL_KEY: skill})}
    return ProbeResult(
        epoch=epoch, step=10 * epoch, stage="fit", metrics=metrics,
        targets=probe.labels.clone(), scores=torch.full((n,), 0.9), method_maps={"caap": torch.rand(n, 2, 2)},
        probe=probe, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), swap_probe=probe,
        model_test_image_values={KEY: per_image},
    )


def stand_in(tmp_path) -> SimpleNamespace:
    return SimpleNamespace(loggers=[], is_global_zero=True, world_size=1, global_rank=0, default_root_dir=str(tmp_path))


def test_the_monitor_counts_and_reports_a_hand_made_result_without_a_trainer(tmp_path):
    probe = probe_of()
    source = Published(probe)
    monitor = SpuriousCueMonitor(num_images=3, strategies=False)
    monitor.watch([source])
    assert monitor.monitor_key == KEY and monitor.part == "background"
    # Per pair: 1 follows the donor's background, 0 does not, NaN not scored.
    per_image = torch.tensor([0.0, 1.0, torch.nan, 1.0])
    trainer = stand_in(tmp_path)
    monitor.read(trainer, result(0, 0.25, probe, per_image))
    assert monitor.history == [{"epoch": 0, "step": 0, "score": 0.25, "alarm": 0.0}] and monitor.alarms == []
    # One console line (issue 29): the region and a next step; what the score means is in the text entry.
    with pytest.warns(UserWarning, match=r"alarm at epoch 1 \(step 10\): caap/background_swap_follow_share = 0\.600 "
                      r"> 0\.4; 2 of 3 probe images follow the background, not the object\. Next: ") as record:
        monitor.read(trainer, result(1, 0.6, probe, per_image))
    assert all(len(str(w.message)) <= 300 and "\n" not in str(w.message) for w in record)
    assert monitor.alarms == [{"epoch": 1, "step": 10, "score": 0.6}] and monitor.alarmed
    text = (tmp_path / "caap_images" / "version_0" / "spurious_alarm_step10.md").read_text()
    assert "The score is the share of probe images given the background" in text
    rows = [line for line in text.splitlines() if line.startswith("| #")]
    # The images named by the published per-image values, highest first (stable among ties); the unscored image last.
    assert [row.split("|")[1].strip() for row in rows] == ["#1", "#3", "#0"]
    assert rows[0].endswith("| 1.000 |") and rows[2].endswith("| 0.000 |")
    assert "the image with another probe image's background" in text
    assert (tmp_path / "caap_images" / "version_0" / "spurious_alarm_images_step10.png").is_file()


def test_the_monitor_refuses_a_scalar_the_table_does_not_list():
    monitor = SpuriousCueMonitor(monitor="caap/cue_swap_ratio")
    with pytest.raises(ValueError, match=r"monitor='caap/cue_swap_ratio' is not among the metrics CAAPCallback logs"):
        monitor.watch([Published(probe_of())])


class Recorder:
    """A logger that keeps what ``log_metrics`` is given, with a folder for the text entries (it shows no text)."""

    def __init__(self, root) -> None:
        self.log_dir, self.logged = str(root), []

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, dict(metrics)))


def test_a_check_the_model_cannot_judge_is_not_counted_and_is_said(tmp_path, caplog):
    """Issue 29: a swap check whose skill is under min_skill leaves the count, history and alarm as they were, however
    far past the threshold its score, and says why; the same score from a model that is sure of the probe alarms."""
    probe = probe_of()
    monitor = SpuriousCueMonitor(num_images=2, strategies=False, patience=1)
    monitor.watch([Published(probe)])
    assert monitor.judges_skill and monitor.min_skill == JUDGED_SKILL == 0.3
    logger = Recorder(tmp_path)
    trainer = SimpleNamespace(loggers=[logger], is_global_zero=True, world_size=1, global_rank=0,
                              default_root_dir=str(tmp_path))
    per_image = torch.ones(len(probe))
    monitor.read(trainer, result(0, 0.3, probe, per_image, skill=0.9))
    counted = list(monitor.history)
    assert counted == [{"epoch": 0, "step": 0, "score": 0.3, "alarm": 0.0}]
    assert logger.logged[-1] == (0, {"spurious/score": 0.3, "spurious/alarm": 0.0, "spurious/judged": 1.0})
    for epoch, skill, shown in ((1, 0.29, "0.29"), (2, None, "unknown")):
        with caplog.at_level(logging.INFO), warnings.catch_warnings():
            warnings.simplefilter("error")  # not counted is not an alarm
            monitor.read(trainer, result(epoch, 1.0, probe, per_image, skill=skill))
        assert monitor.history == counted and monitor.wait == 0 and monitor.alarms == [] and not monitor.alarmed
        assert monitor.best == 0.3
        assert logger.logged[-1] == (10 * epoch, {"spurious/score": 1.0, "spurious/judged": 0.0})
        said = caplog.records[-1].getMessage()
        assert f"the check at epoch {epoch} is not judged (caap/background_swap_follow_share 1.000)" in said
        assert f"skill on the clean swap probe is {shown}, below min_skill=0.3" in said
        assert "the count stays at 0 of 1" in said
        text = (tmp_path / "caap_images" / f"spurious_not_judged_step{10 * epoch}.md").read_text()
        assert text.startswith(f"Epoch {epoch}: not judged: ") and f"is {shown}, below min_skill=0.3" in text
    # The same score at a skill of min_skill counts, and alarms.
    with pytest.warns(UserWarning, match=r"alarm at epoch 3 \(step 30\): caap/background_swap_follow_share = 1\.000"):
        monitor.read(trainer, result(3, 1.0, probe, per_image, skill=0.3))
    assert monitor.history[-1] == {"epoch": 3, "step": 30, "score": 1.0, "alarm": 1.0} and len(monitor.history) == 2
    assert monitor.alarms == [{"epoch": 3, "step": 30, "score": 1.0}]
    assert logger.logged[-1] == (30, {"spurious/score": 1.0, "spurious/alarm": 1.0, "spurious/judged": 1.0})


def test_without_min_skill_or_off_a_swap_test_every_check_counts(tmp_path):
    probe = probe_of()
    for monitor in (SpuriousCueMonitor(strategies=False, patience=1, min_skill=None),
                    SpuriousCueMonitor(monitor="caap/background_mass", threshold=0.4, strategies=False, patience=1)):
        monitor.watch([Published(probe)])
        assert not monitor.judges_skill
        with pytest.warns(UserWarning, match="alarm at epoch 0"):
            monitor.read(stand_in(tmp_path), result(0, 1.0, probe, torch.ones(len(probe)), skill=0.0))
        assert len(monitor.history) == 1 and monitor.alarmed


@pytest.mark.parametrize("min_skill", [1.0, -0.1, 2.0])
def test_a_min_skill_outside_zero_to_one_is_refused(min_skill):
    with pytest.raises(ValueError, match=r"min_skill=.* must be in \[0, 1\) \(0: chance, 1: certain\) or None"):
        SpuriousCueMonitor(min_skill=min_skill)


def default_source(probe: ProbeBatch) -> SimpleNamespace:
    """What a default CAAPCallback publishes on ``probe`` (its default metrics, the probe its own swap probe)."""
    metrics = resolve_metrics(None, probe, len(probe))
    return SimpleNamespace(methods=["caap"], logged=logged_table(["caap"], metrics, lambda method, scalar: f"caap/{scalar}",
                                                                 probe, probe))


@pytest.mark.parametrize("masks, cue_masks, expected", [
    (True, True, "caap/background_swap_follow_share"),  # object masks first, cue masks or not
    (True, False, "caap/background_swap_follow_share"),
    (False, True, "caap/cue_swap_follow_share"),
    (False, False, "caap/border_swap_follow_share"),
])
def test_the_default_key_is_the_follow_share_the_masks_allow(masks, cue_masks, expected):
    """Issue 29: the default watches a swap test's follow share, matched by its tag (its metric is the swap ratio's)."""
    probe = probe_of(8)
    corner = torch.zeros(8, 16, 16, dtype=torch.bool)
    corner[:, :3, :3] = True
    probe = ProbeBatch(images=probe.images, labels=probe.labels, masks=probe.masks if masks else None,
                       cue_masks=corner if cue_masks else None)
    source = default_source(probe)
    key = default_key([source], sorted(source.logged))
    assert key == expected and source.logged[key].metric == expected.split("/")[1].replace("_follow_share", "_ratio")
    assert key.replace("_follow_share", "_ratio") in source.logged  # the ratio is logged too, and not chosen


def test_the_default_key_names_the_follow_shares_when_none_is_logged():
    probe = probe_of(8)
    source = SimpleNamespace(methods=["caap"], logged=logged_table(["caap"], ["background_mass"],
                                                                   lambda method, scalar: f"caap/{scalar}", probe, probe))
    with pytest.raises(ValueError, match=r"default watches caap/background_swap_follow_share \(with object masks\), "
                       r"caap/cue_swap_follow_share \(with cue masks\) or caap/border_swap_follow_share"):
        default_key([source], sorted(source.logged))


def test_the_default_threshold_warns_off_a_follow_share_on_a_full_swap_probe():
    """Issue 29: 0.4 was chosen for the follow shares on DEFAULT_SWAP_IMAGES (64) swap images: silent there; a follow
    share on fewer, or any other score (a swap ratio included), is warned about."""
    assert DEFAULT_SWAP_IMAGES == 64 and DEFAULT_THRESHOLD == 0.4

    def table(n: int):
        probe = probe_of(n)
        return logged_table(["caap"], ["background_swap_ratio", "background_density_ratio"],
                            lambda method, scalar: f"caap/{scalar}", probe, probe)

    full, small = table(64), table(16)
    assert default_threshold_warning(full["caap/background_swap_follow_share"]) is None
    few = default_threshold_warning(small["caap/background_swap_follow_share"])
    assert few is not None and ("watching caap/background_swap_follow_share at the default threshold 0.4 on 16 swap "
                                "images; it was chosen on 64, and on fewer the share is noisy") in few
    for other in ("caap/background_swap_ratio", "caap/background_density_ratio"):
        for images in (full, small):
            said = default_threshold_warning(images[other])
            assert said is not None and said.startswith(
                f"SpuriousCueMonitor: watching {other} at the default threshold 0.4, which was chosen for the swap "
                "tests' follow shares")


def test_a_swap_ratio_watched_at_the_default_threshold_warns_once(tmp_path):
    probe = probe_of(64)
    monitor = SpuriousCueMonitor(monitor=KEY.replace("_follow_share", "_ratio"), strategies=False)
    with pytest.warns(UserWarning, match=r"watching caap/background_swap_ratio at the default threshold 0\.4, which "
                      r"was chosen for the swap tests' follow shares") as record:
        monitor.watch([Published(probe)])
    assert sum("default threshold" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default follow share on 64 swap images: nothing to say
        SpuriousCueMonitor(strategies=False).watch([Published(probe)])
