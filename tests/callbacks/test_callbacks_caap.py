"""CAAPCallback end to end on tiny synthetic data: TensorBoard output, errors, resume."""

from __future__ import annotations

import math

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from caap_lightning import CAAP
from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.callbacks.distributed import in_probe_order
from caap_lightning.callbacks.discovery import find_attribution_model
from caap_lightning.model_tests import MODEL_TESTS, InsertionRatio, SwapPairs, SwapRatio, border_masks, rest_colour
from caap_lightning.callbacks.probe import seeded_order


def test_fit_logs_heatmaps_and_finite_scalars_at_the_validation_steps(
    tmp_path, data_factory, classifier_factory, trainer_factory, events_reader
):
    caap = CAAPCallback(num_images=6, max_images_logged=3)
    trainer = trainer_factory(tmp_path, [caap, SpuriousCueMonitor()], max_epochs=2)
    trainer.fit(classifier_factory(), datamodule=data_factory())

    events = events_reader(trainer.logger.log_dir)
    scalars = events["scalars"]
    val_steps = sorted(scalars["val/acc"])
    assert len(val_steps) == 2
    expected = {
        "caap/aupr_fg", "caap/aupr_fg_lift", "caap/aupr_bg", "caap/aupr_bg_lift", "caap/pointing_game",
        "caap/insertion", "caap/deletion", "caap/insdel", "caap/background_mass",
        "caap/background_mass_ratio", "caap/cue_mass", "caap/cue_mass_ratio", "caap/seconds",
    }
    assert expected <= set(scalars)
    for name in expected:
        assert sorted(scalars[name]) == val_steps, name
    # insdel_informative is NaN, so not logged, when every probe image's substrate is the target.
    for name in [n for n in scalars if n.startswith("caap/")]:
        assert set(scalars[name]) <= set(val_steps), name
        assert all(math.isfinite(v) for v in scalars[name].values()), name
    assert sorted(scalars["spurious/score"]) == val_steps
    assert events["images"]["caap/heatmaps"] == val_steps
    assert events["images"]["caap/insertion_deletion"] == val_steps

    assert [row["epoch"] for row in caap.history] == [0, 1]
    last = caap.last
    assert last.maps.shape == (6, 4, 4) and last.targets.shape == (6,)
    # The logged values are the history's.
    assert scalars["caap/cue_mass_ratio"][val_steps[-1]] == pytest.approx(caap.history[-1]["caap/cue_mass_ratio"], rel=1e-5)


def test_every_n_epochs_and_validate_and_test_runs(tmp_path, data_factory, classifier_factory, trainer_factory):
    caap = CAAPCallback(every_n_epochs=2, num_images=4, metrics=["pointing_game"], log_images=False)
    trainer = trainer_factory(tmp_path, [caap], max_epochs=3, limit_train_batches=1)
    model, data = classifier_factory(), data_factory()
    trainer.fit(model, datamodule=data)
    assert [row["epoch"] for row in caap.history] == [1]
    trainer.validate(model, datamodule=data, verbose=False)
    trainer.test(model, datamodule=data, verbose=False)
    assert len(caap.history) == 3
    assert set(caap.history[-1]) == {"epoch", "step", "stage", "caap/pointing_game", "caap/seconds"}
    assert [row["stage"] for row in caap.history] == ["fit", "validate", "test"]


def test_maps_are_the_engines_relative_maps(tmp_path, data_factory, classifier_factory, trainer_factory):
    caap = CAAPCallback(num_images=4, metrics=["insertion_deletion"], target="label", log_images=False)
    model, data = classifier_factory(), data_factory()
    trainer_factory(tmp_path, [caap]).validate(model, datamodule=data, verbose=False)
    probe = data.probe_batch(4)
    # The callback's default construction is CAAP's own, parallel.
    engine = CAAP(model.model, construction="parallel", mean=data.mean, std=data.std)
    expected = engine.attribute(probe.images, target=probe.labels, relative=True)
    torch.testing.assert_close(caap.last.maps, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(caap.last.targets, probe.labels)


def test_auto_blank_maps_are_relative_to_the_blank_it_chose(tmp_path, data_factory, classifier_factory, trainer_factory):
    caap = CAAPCallback(num_images=4, metrics=["insertion_deletion"], target="label", log_images=False, blank="auto")
    model, data = classifier_factory(), data_factory()
    trainer_factory(tmp_path, [caap]).validate(model, datamodule=data, verbose=False)
    probe = data.probe_batch(4)
    engine = CAAP(model.model, construction="parallel", mean=data.mean, std=data.std, blank="auto")
    expected = engine.attribute(probe.images, target=probe.labels, relative=True)
    fixed = CAAP(model.model, construction="parallel", mean=data.mean, std=data.std, blank=engine.last_blank)
    torch.testing.assert_close(caap.last.maps, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(expected, fixed.attribute(probe.images, target=probe.labels, relative=True))


def test_metric_that_needs_missing_masks_fails_in_setup(tmp_path, data_factory, classifier_factory, trainer_factory):
    trainer = trainer_factory(tmp_path, [CAAPCallback(metrics=["pointing_game", "cue_mass_ratio"])])
    with pytest.raises(ValueError, match=r"\['cue_mass_ratio'\] need cue_masks.*remove them from `metrics`"):
        trainer.fit(classifier_factory(), datamodule=data_factory(cue_correlation=None))
    assert trainer.global_step == 0


def test_default_metrics_are_those_the_probe_allows(tmp_path, data_factory, classifier_factory, trainer_factory):
    caap = CAAPCallback(num_images=4)
    trainer_factory(tmp_path, [caap]).validate(classifier_factory(), datamodule=data_factory(cue_correlation=None), verbose=False)
    assert caap.active_metrics == [
        "aupr_fg", "aupr_bg", "pointing_game", "insertion_deletion", "background_mass", "background_mass_ratio",
        "background_density_ratio", "fixed_position_ratio", "background_swap_ratio", "border_swap_ratio",
        "surround_swap_ratio",
    ]  # not the insertion ratios: they are computed where named


def test_model_tests_run_once_with_the_primary_method_and_match_a_direct_call(
    tmp_path, data_factory, classifier_factory, trainer_factory
):
    """The insertion ratios test the model, not a map: logged under the callback's name only, per image in probe order."""
    data = data_factory(cue_correlation=0.9)
    metrics = ["background_insertion_ratio", "cue_insertion_ratio", "border_insertion_ratio", "cue_density_ratio"]
    caap = CAAPCallback(num_images=6, methods=["caap", "gradcam"], metrics=metrics, log_images=False)
    model = classifier_factory()
    trainer_factory(tmp_path, [caap]).validate(model, datamodule=data, verbose=False)
    logged = set(caap.last.metrics)
    assert {"caap/background_insertion_ratio", "caap/cue_insertion_ratio", "caap/border_insertion_ratio",
            "caap/gradcam/cue_density_ratio"} <= logged
    assert not any(key.startswith("caap/gradcam/") and "insertion" in key for key in logged)
    assert not any("gradcam" in key and "insertion" in key for key in caap.logged_metrics)
    probe = caap.probe
    for scalar, masks, region in (
        ("background_insertion_ratio", probe.masks, "outside"),
        ("cue_insertion_ratio", probe.cue_masks, "mask"),
        ("border_insertion_ratio", border_masks(len(probe), tuple(probe.images.shape[-2:])), "mask"),
    ):
        # The stand-in colour is the whole probe's, so that every rank shows the same one.
        metric = InsertionRatio(model, region=region, colour=rest_colour(probe.images, masks), image_ratios=True)
        metric.update(probe.images, masks, target=caap.last.targets)
        out = metric.compute_details()
        assert caap.last.metrics[f"caap/{scalar}"] == pytest.approx(float(out["insertion_ratio"]), rel=1e-5)
        torch.testing.assert_close(caap.last.per_image[f"caap/{scalar}"], out["image_ratios"].float())


def test_swap_tests_pair_each_probe_image_with_the_one_half_the_probe_on_and_match_a_direct_call(
    tmp_path, data_factory, classifier_factory, trainer_factory
):
    """The swap ratios compare the top-1 classes of each image and its donor, whatever class the maps explain."""
    data = data_factory(cue_correlation=0.9)
    metrics = ["background_swap_ratio", "cue_swap_ratio", "border_swap_ratio"]
    caap = CAAPCallback(
        num_images=6, swap_images=6, methods=["caap", "gradcam"], metrics=metrics, target="label", log_images=False
    )
    model = classifier_factory(seed=1)
    trainer_factory(tmp_path, [caap]).validate(model, datamodule=data, verbose=False)
    assert not any("gradcam" in key for key in caap.logged_metrics)
    probe = caap.probe
    donors = SwapPairs(len(probe)).donors
    assert donors.tolist() == [3, 4, 5, 0, 1, 2]
    # The maps explain the labels; the swaps compare top-1 classes, which here differ from every partner's.
    with torch.no_grad():
        top1 = model.eval()(probe.images).argmax(1)
    assert top1.tolist() == [2, 2, 2, 1, 1, 1] and top1.tolist() != probe.labels.tolist()
    for scalar, masks, region in (
        ("background_swap_ratio", probe.masks, "outside"),
        ("cue_swap_ratio", probe.cue_masks, "mask"),
        ("border_swap_ratio", border_masks(len(probe), tuple(probe.images.shape[-2:])), "mask"),
    ):
        metric = SwapRatio(model, region=region, image_ratios=True)
        metric.update(probe.images, masks, probe.images[donors], masks[donors])  # no targets: each clean image's top-1
        out = metric.compute_details()
        assert int(out["count"]) == 6  # every pair's two classes differ
        assert caap.last.metrics[f"caap/{scalar}"] == pytest.approx(float(out["swap_ratio"]), rel=1e-5)
        torch.testing.assert_close(caap.last.per_image[f"caap/{scalar}"], out["image_ratios"].float())
    # A model that gives every probe image one class has no pair to score: the ratios are not logged, only the swap
    # probe's skill (its clean confidence, issue 29).
    collapsed = CAAPCallback(num_images=6, swap_images=6, metrics=metrics, log_images=False)
    trainer_factory(tmp_path, [collapsed]).validate(classifier_factory(seed=0), datamodule=data, verbose=False)
    assert [key for key in collapsed.last.metrics if "swap" in key] == ["caap/swap_probe_skill"]


def test_swap_ratios_run_on_their_own_larger_probe_whose_start_the_maps_explain(
    tmp_path, data_factory, classifier_factory, trainer_factory
):
    data = data_factory(cue_correlation=0.9)
    caap = CAAPCallback(num_images=3, swap_images=8, log_images=False)
    model = classifier_factory(seed=1)
    trainer_factory(tmp_path, [caap]).validate(model, datamodule=data, verbose=False)
    swap_probe, probe = caap.swap_probe, caap.probe
    assert len(probe) == 3 and len(swap_probe) == 8 and caap.last.maps.shape[0] == 3
    torch.testing.assert_close(probe.images, swap_probe.images[:3])
    assert caap.last.swap_probe is swap_probe
    donors = SwapPairs(8).donors
    metric = SwapRatio(model, region="outside", image_ratios=True)
    metric.update(swap_probe.images, swap_probe.masks, swap_probe.images[donors], swap_probe.masks[donors])
    out = metric.compute_details()
    assert caap.last.metrics["caap/background_swap_ratio"] == pytest.approx(float(out["swap_ratio"]), rel=1e-5)
    # Per image: the maps' images only, as the alarm report names and draws them.
    torch.testing.assert_close(
        caap.last.per_image["caap/background_swap_ratio"], out["image_ratios"][:3].float(), equal_nan=True
    )
    # Without a swap ratio only the maps' images are taken.
    plain = CAAPCallback(num_images=3, swap_images=8, metrics=["border_insertion_ratio"], log_images=False)
    trainer_factory(tmp_path, [plain]).validate(model, datamodule=data, verbose=False)
    assert plain.swap_probe is None and len(plain.probe) == 3


def test_a_swap_probe_smaller_than_asked_warns_that_the_ratios_are_noisy(
    tmp_path, data_factory, classifier_factory, trainer_factory
):
    data = data_factory(cue_correlation=0.9)
    caap = CAAPCallback(num_images=4, swap_images=10_000, log_images=False)
    with pytest.warns(UserWarning, match=r"the swap ratios run on the \d+ probe images there are, fewer than swap_images=10000"):
        trainer_factory(tmp_path, [caap]).validate(classifier_factory(), datamodule=data, verbose=False)
    assert len(caap.swap_probe) == len(data.probe_batch(10_000)) and len(caap.probe) == 4


def test_a_probe_of_one_image_has_no_swap_tests(tmp_path, data_factory, classifier_factory, trainer_factory):
    data = data_factory(cue_correlation=0.9)
    one = data.probe_batch(1)
    caap = CAAPCallback(num_images=1, probe=one, log_images=False)
    trainer_factory(tmp_path, [caap]).validate(classifier_factory(), datamodule=data, verbose=False)
    assert "insertion_deletion" in caap.active_metrics and not any("swap" in m for m in caap.active_metrics)
    asked = CAAPCallback(num_images=1, probe=one, metrics=["border_swap_ratio"], log_images=False)
    with pytest.raises(ValueError, match=r"\['border_swap_ratio'\] swap a region between probe images, but the probe has 1"):
        trainer_factory(tmp_path, [asked]).validate(classifier_factory(), datamodule=data, verbose=False)


def test_per_image_values_gathered_rank_by_rank_return_to_the_probe_order():
    # 5 images on 2 ranks: rank 0 holds images 0, 2, 4 and rank 1 images 1, 3; torchmetrics gathers them in that order.
    gathered = torch.tensor([0.0, 2.0, 4.0, 1.0, 3.0])
    assert in_probe_order(gathered, 5, 2).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert in_probe_order(gathered, 5, 1).tolist() == gathered.tolist()


class ConvClassifier(L.LightningModule):
    """A CNN: nothing CAAP can attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.model(batch.images), batch.labels)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_unsupported_model_fails_in_setup(tmp_path, data_factory, trainer_factory):
    trainer = trainer_factory(tmp_path, [CAAPCallback()])
    with pytest.raises(ValueError, match=r"cannot attribute ConvClassifier \(attribution model: Sequential\).*get_attribution_model"):
        trainer.fit(ConvClassifier(), datamodule=data_factory())
    assert trainer.global_step == 0


def test_image_size_mismatch_fails_in_setup(tmp_path, data_factory, classifier_factory, trainer_factory):
    trainer = trainer_factory(tmp_path, [CAAPCallback()])
    with pytest.raises(ValueError, match="differs from the model's img_size"):
        trainer.fit(classifier_factory(), datamodule=data_factory(img_size=48))


def test_plain_dataloaders_give_the_probe(tmp_path, data_factory, classifier_factory, trainer_factory):
    data = data_factory()
    data.setup()
    caap = CAAPCallback(num_images=4, log_images=False)
    trainer_factory(tmp_path, [caap]).validate(classifier_factory(), dataloaders=data.val_dataloader(), verbose=False)
    whole = next(iter(data.val_dataloader()))  # one batch holds the whole validation set
    drawn = seeded_order(len(whole))[:4]  # the probe is a seeded draw across it
    torch.testing.assert_close(caap.probe.images, whole.images[drawn])
    assert torch.equal(caap.probe.masks, whole.masks[drawn]) and torch.equal(caap.probe.cue_masks, whole.cue_masks[drawn])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every_n_epochs": 0}, "every_n_epochs >= 1"),
        ({"metrics": ["aupr"]}, "unknown: \\['aupr'\\]"),
        ({"selection": "box3"}, "selection='box3'"),
        ({"blank": "grey"}, "blank='grey'"),
        ({"construction": "fast"}, "construction='fast'"),
        ({"target": "true"}, "target='true'"),
        ({"on_error": "ignore"}, "on_error='ignore'"),
        ({"precision": "bf16"}, "precision='bf16'"),
        ({"layer_cutoff": "auto", "methods": ["gradcam"]}, "calibrates CAAP"),
        ({"insertion_deletion_steps": 0}, "insertion_deletion_steps"),
    ],
)
def test_arguments_are_validated_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CAAPCallback(**kwargs)


def test_error_with_on_error_warn_leaves_training_running(
    tmp_path, monkeypatch, data_factory, classifier_factory, trainer_factory
):
    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(CAAP, "attribute", broken)
    caap = CAAPCallback(num_images=4)
    trainer = trainer_factory(tmp_path, [caap], max_epochs=2, limit_train_batches=1)
    with pytest.warns(UserWarning, match=r"computing the CAAP maps and metric updates failed at epoch \d \(RuntimeError: boom\)"):
        trainer.fit(classifier_factory(), datamodule=data_factory())
    assert trainer.current_epoch == 2 and trainer.global_step == 2
    # The model tests run apart from the maps: a failing map skips its metrics, not the swap ratios.
    assert [row["epoch"] for row in caap.history] == [0, 1] and caap.last.method_maps == {}
    tests = {f"caap/{scalar}" for name in caap.active_metrics if name in MODEL_TESTS for scalar in MODEL_TESTS[name].scalars}
    assert tests and set(caap.last.metrics) <= tests | {"caap/swap_probe_skill", "caap/seconds"}
    assert "caap/swap_probe_skill" in caap.last.metrics  # the swap probe's skill is the model tests' too
    assert set(caap.last.model_test_image_values) == tests


def test_error_with_on_error_raise_stops(tmp_path, monkeypatch, data_factory, classifier_factory, trainer_factory):
    monkeypatch.setattr(CAAP, "attribute", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    trainer = trainer_factory(tmp_path, [CAAPCallback(num_images=4, on_error="raise")], limit_train_batches=1)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(classifier_factory(), datamodule=data_factory())


@pytest.mark.filterwarnings("ignore:SpuriousCueMonitor")
def test_resume_restores_both_histories(tmp_path, monkeypatch, data_factory, classifier_factory, trainer_factory):
    runs = []

    def callbacks():
        checkpoint = ModelCheckpoint(dirpath=tmp_path / f"ckpt{len(runs)}", save_last=True)
        runs.append(checkpoint)
        caap = CAAPCallback(num_images=4, metrics=["cue_mass_ratio"], log_images=False)
        monitor = SpuriousCueMonitor(monitor="caap/cue_mass_ratio", threshold=None, min_delta=0.0)
        return [caap, monitor, checkpoint]

    first = callbacks()
    trainer = trainer_factory(tmp_path, first, max_epochs=2, limit_train_batches=1, enable_checkpointing=True)
    trainer.fit(classifier_factory(), datamodule=data_factory())
    assert len(first[0].history) == 2 and len(first[1].history) == 2

    restored = []  # the resumed monitor's state right after Lightning restores it
    load = SpuriousCueMonitor.load_state_dict

    def recording(self, state):
        load(self, state)
        restored.append((self.best, self.wait, len(self.history)))

    monkeypatch.setattr(SpuriousCueMonitor, "load_state_dict", recording)
    second = callbacks()
    trainer = trainer_factory(tmp_path, second, max_epochs=3, limit_train_batches=1, enable_checkpointing=True)
    trainer.fit(classifier_factory(seed=1), datamodule=data_factory(), ckpt_path=str(tmp_path / "ckpt0" / "last.ckpt"))
    assert restored == [(first[1].best, first[1].wait, 2)]
    assert second[0].history[:2] == first[0].history
    assert [row["epoch"] for row in second[0].history] == [0, 1, 2]
    assert second[1].history[:2] == first[1].history and len(second[1].history) == 3
    state = {k: v for k, v in first[1].state_dict().items() if k != "history"}
    assert state["best"] == min(row["score"] for row in first[1].history)
    # The resumed monitor carries on from the restored best and count: as one fed all three scores.
    fresh = SpuriousCueMonitor(threshold=None, min_delta=0.0)
    for row in second[1].history:
        fresh.update(row["score"])
    assert (second[1].best, second[1].wait) == (fresh.best, fresh.wait)


class LitViT(VisionTransformer, L.LightningModule):
    """A LightningModule that is itself a timm ViT (no ``model``, no hook)."""

    def __init__(self) -> None:
        super().__init__(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)

    def validation_step(self, batch, batch_idx):
        pass


def test_attribution_model_resolution(tmp_path, data_factory, trainer_factory, classifier_factory):
    classifier = classifier_factory()
    assert find_attribution_model(classifier) == (classifier.model, None)  # the hook

    class Wrapped(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)

    wrapped = Wrapped()
    assert find_attribution_model(wrapped) == (wrapped.model, None)

    lit = LitViT()
    assert find_attribution_model(lit) == (lit, None)
    caap = CAAPCallback(num_images=4, metrics=["pointing_game"], log_images=False)
    trainer_factory(tmp_path, [caap]).validate(lit, datamodule=data_factory(), verbose=False)
    assert len(caap.history) == 1


@pytest.mark.parametrize("precision, autocast", [("trainer", True), ("32", False)])
def test_check_runs_in_the_trainers_autocast_unless_told_32(
    tmp_path, monkeypatch, data_factory, classifier_factory, trainer_factory, precision, autocast
):
    seen = []
    attribute = CAAP.attribute

    def recording(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return attribute(self, *args, **kwargs)

    monkeypatch.setattr(CAAP, "attribute", recording)
    caap = CAAPCallback(num_images=4, log_images=False, on_error="raise", precision=precision)
    trainer = trainer_factory(tmp_path, [caap], max_epochs=1, limit_train_batches=1, precision="bf16-mixed")
    trainer.fit(classifier_factory(), datamodule=data_factory())
    assert seen == [autocast]
    assert all(math.isfinite(v) for k, v in caap.history[0].items() if k.startswith("caap/"))


def test_bf16_true_training_is_checked_in_bf16(tmp_path, monkeypatch, data_factory, classifier_factory, trainer_factory):
    seen = []
    attribute = CAAP.attribute

    def recording(self, images, *args, **kwargs):
        seen.append((next(self.model.parameters()).dtype, images.dtype))
        return attribute(self, images, *args, **kwargs)

    monkeypatch.setattr(CAAP, "attribute", recording)
    caap = CAAPCallback(num_images=4, log_images=False, on_error="raise")
    trainer = trainer_factory(tmp_path, [caap], max_epochs=1, limit_train_batches=1, precision="bf16-true")
    model = classifier_factory()
    trainer.fit(model, datamodule=data_factory())
    assert seen == [(torch.bfloat16, torch.bfloat16)]  # the check ran on the bf16 weights, with bf16 inputs
    row = caap.history[0]
    for name in ("caap/insdel", "caap/aupr_fg", "caap/pointing_game", "caap/cue_mass_ratio"):
        assert math.isfinite(row[name]), name
    assert caap.last.maps.dtype == torch.float32 and caap.last.maps.std() > 0


def test_auto_layer_cutoff_is_calibrated_once_at_the_first_check_and_kept_on_resume(
    tmp_path, monkeypatch, data_factory, classifier_factory, trainer_factory, events_reader
):
    import copy

    from caap_lightning.metrics.functional import insertion_deletion

    sweeps = []  # (step, the weights swept)
    calibrate = CAAP.calibrate

    def recording(self, *args, **kwargs):
        sweeps.append((kwargs.get("step"), copy.deepcopy(self.model)))
        return calibrate(self, *args, **kwargs)

    monkeypatch.setattr(CAAP, "calibrate", recording)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    caap = CAAPCallback(num_images=4, layer_cutoff="auto", insertion_deletion_steps=8, log_images=False)
    trainer = trainer_factory(tmp_path, [caap, checkpoint], max_epochs=2, limit_train_batches=1, enable_checkpointing=True)
    model, data = classifier_factory(), data_factory()
    with torch.no_grad():  # sharper than timm's init, so that the cutoffs give different maps
        for name, p in model.model.named_parameters():
            if p.dim() >= 2 or "token" in name or "pos_embed" in name:
                p.mul_(4.0)
    trainer.fit(model, datamodule=data)

    assert [step for step, _ in sweeps] == [32 * 32 // 8]  # once, with the check's Insertion/Deletion step
    rows = caap.calibration
    assert [r["layer_cutoff"] for r in rows] == [0, 1, 2]
    # k = L - 1 and k = L give the same maps under CLS pooling (the last block's patch outputs are unread).
    assert len({round(r["insdel"], 6) for r in rows}) == 2, rows
    assert caap.calibrated_cutoff == max(rows, key=lambda r: r["insdel"])["layer_cutoff"]
    assert caap._methods["caap"].layer_cutoff == caap.calibrated_cutoff
    # The sweep's InsDel of the pick is the RISE score of the maps CAAP gives with that cutoff.
    swept, probe = sweeps[0][1], caap.probe
    reference = CAAP(swept, layer_cutoff=caap.calibrated_cutoff, construction=caap.construction, window=caap.window,
                     mean=caap.mean, std=caap.std)
    scores = insertion_deletion(swept, probe.images, reference.attribute(probe.images), step=128)
    picked = next(r for r in rows if r["layer_cutoff"] == caap.calibrated_cutoff)
    assert picked["insdel"] == pytest.approx((scores.insertion - scores.deletion).mean().item(), abs=1e-5)
    assert "caap/layer_cutoff_sweep/text_summary" in events_reader(trainer.logger.log_dir)["texts"]

    resumed = CAAPCallback(num_images=4, layer_cutoff="auto", insertion_deletion_steps=8, log_images=False)
    trainer = trainer_factory(tmp_path, [resumed], max_epochs=3, limit_train_batches=1)
    trainer.fit(classifier_factory(seed=1), datamodule=data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert len(sweeps) == 1  # not swept again
    assert resumed.calibrated_cutoff == caap.calibrated_cutoff and resumed.calibration == rows
    assert resumed._methods["caap"].layer_cutoff == caap.calibrated_cutoff


def test_auto_layer_cutoff_in_a_validate_run_is_calibrated_at_the_check(
    tmp_path, data_factory, classifier_factory, trainer_factory
):
    caap = CAAPCallback(num_images=4, layer_cutoff="auto", metrics=["pointing_game"], log_images=False)
    trainer = trainer_factory(tmp_path, [caap])
    trainer.validate(classifier_factory(), datamodule=data_factory(), verbose=False)
    assert [r["layer_cutoff"] for r in caap.calibration] == [0, 1, 2]
    assert caap._methods["caap"].layer_cutoff == caap.calibrated_cutoff
    assert len(caap.history) == 1


def test_a_setting_changed_between_runs_rebuilds_caap(tmp_path, data_factory, classifier_factory, trainer_factory):
    caap = CAAPCallback(num_images=4, metrics=["pointing_game"], log_images=False, on_error="raise")
    model, data = classifier_factory(), data_factory()
    trainer_factory(tmp_path, [caap]).validate(model, datamodule=data, verbose=False)
    assert caap._methods["caap"].construction == "parallel"
    caap.construction = "windowed"
    trainer_factory(tmp_path, [caap]).validate(model, datamodule=data, verbose=False)
    assert caap._methods["caap"].construction == "windowed"
    expected = CAAP(model.model, construction="windowed", window=2, mean=caap.mean, std=caap.std).attribute(
        caap.probe.images, target=caap.last.targets, relative=True
    )
    torch.testing.assert_close(caap.last.maps, expected, atol=1e-6, rtol=0)


class BuiltInConfigureModel(L.LightningModule):
    """A module whose (compiled) ViT exists only from configure_model on, as under FSDP or with torch.compile."""

    def __init__(self):
        super().__init__()
        self.model = None

    def configure_model(self):
        if self.model is None:
            L.seed_everything(0, verbose=False)
            vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
            self.model = torch.compile(vit, backend="eager")

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.model(batch.images), batch.labels)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.nn.functional.cross_entropy(self.model(batch.images), batch.labels))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_model_built_in_configure_model_is_found_before_the_first_check_and_unwrapped(
    tmp_path, data_factory, trainer_factory
):
    caap = CAAPCallback(num_images=4, metrics=["border_swap_ratio"], log_images=False)
    module = BuiltInConfigureModel()
    trainer_factory(tmp_path, [caap], max_epochs=1, limit_train_batches=1).fit(module, datamodule=data_factory())
    assert caap._model is module.model._orig_mod and isinstance(caap._model, VisionTransformer)
    assert [row["epoch"] for row in caap.history] == [0] and caap.last.maps.shape == (4, 4, 4)
