"""The callbacks on a CNN in a fit: the project's classifier around a timm ResNet, a user's own torchvision ResNet.

Every fit reads the logged values back (TensorBoard event files) and compares them with the
methods and metrics run directly on the probe batch, as the ViT tests do.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from caap_lightning.attribution.baselines import GradCAM, InputXGradient
from caap_lightning.attribution.cnn import ConvCAAP
from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.datamodules import SyntheticSpuriousDataModule
from caap_lightning.metrics import attribution_mass, insertion_deletion, pointing_game
from caap_lightning.models import ViTClassifier
from caap_lightning.utils import IMAGENET_MEAN, IMAGENET_STD

SIZE = 64
STEPS = 16  # the callback's default insertion_deletion_steps


def resnet_classifier(seed: int = 0) -> ViTClassifier:
    L.seed_everything(seed, verbose=False)
    # img_size as the CLI passes it on; a CNN takes any size.
    return ViTClassifier(model_name="resnet18", pretrained=False, num_classes=4, img_size=SIZE, warmup_epochs=0)


def shapes(**kwargs) -> SyntheticSpuriousDataModule:
    # ImageNet's normalisation: resnet18's pretrained_cfg, so that the model does not warn.
    cfg = dict(num_classes=4, img_size=SIZE, num_train=16, num_val=8, num_test=8, batch_size=8)
    cfg.update(kwargs)
    return SyntheticSpuriousDataModule(**cfg)


def pixel_step() -> int:
    return math.ceil(SIZE * SIZE / STEPS)


def test_resnet_classifier_logs_caap_gradcam_and_input_x_gradient_and_the_monitor_reads_them(
    tmp_path, trainer_factory, events_reader
):
    caap = CAAPCallback(num_images=2, methods=["caap", "gradcam", "input_x_gradient"], on_error="raise")
    monitor = SpuriousCueMonitor(monitor="caap/cue_mass_ratio", threshold=None, min_delta=0.0)
    model, data = resnet_classifier(), shapes()
    trainer = trainer_factory(tmp_path, [caap, monitor], max_epochs=2, limit_train_batches=1)
    trainer.fit(model, datamodule=data)

    assert caap._model is model.model and (caap.construction, caap.window) == ("standard", None)
    probe, last = caap.probe, caap.last
    assert (caap.mean, caap.std) == (IMAGENET_MEAN, IMAGENET_STD)
    resnet = model.model.eval()
    expected = {
        "caap": ConvCAAP(resnet, mean=caap.mean, std=caap.std).attribute(probe.images, target=last.targets, relative=True),
        "gradcam": GradCAM(resnet).attribute(probe.images, target=last.targets),
        "input_x_gradient": InputXGradient(resnet).attribute(probe.images, target=last.targets),
    }
    assert list(last.method_maps) == list(expected)
    assert all(bool((maps.flatten(1).std(1) > 0).all()) for maps in expected.values())  # maps that rank the patches
    # ConvCAAP's default cut is layer2, at 1/8 of the image; the baselines read the last stage (1/32).
    assert last.maps.shape == (2, SIZE // 8, SIZE // 8) and last.method_maps["gradcam"].shape == (2, 2, 2)
    for name, maps in expected.items():
        torch.testing.assert_close(last.method_maps[name], maps, atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():
        assert torch.equal(last.targets, resnet(probe.images).argmax(-1))

    scalars = events_reader(trainer.logger.log_dir)["scalars"]
    val_steps = sorted(scalars["val/acc"])
    for name, maps in expected.items():
        tag = caap.tag(name, "{}")
        scores = insertion_deletion(resnet, probe.images, maps, target=last.targets, step=pixel_step())
        cue = attribution_mass(maps, probe.cue_masks, region="mask", normalize_by_area=True)
        computed = {
            "insdel": (scores.insertion - scores.deletion).mean().item(),
            "cue_mass_ratio": torch.nanmean(cue).item(),
            "pointing_game": torch.nanmean(pointing_game(maps, probe.masks)).item(),
        }
        for scalar, value in computed.items():
            logged = scalars[tag.format(scalar)]
            assert sorted(logged) == val_steps, tag.format(scalar)
            assert logged[val_steps[-1]] == pytest.approx(value, rel=1e-4, abs=1e-6), tag.format(scalar)
    # The monitor watches CAAP's cue mass ratio at every check of the fit.
    assert [h["score"] for h in monitor.history] == [row["caap/cue_mass_ratio"] for row in caap.history]
    assert sorted(scalars["spurious/score"]) == val_steps
    assert scalars["spurious/score"][val_steps[-1]] == pytest.approx(caap.history[-1]["caap/cue_mass_ratio"], rel=1e-6)


class OwnResNet(L.LightningModule):
    """A user's module: a torchvision ResNet as ``self.net``, plain ``(images, labels)`` batches."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torchvision.models.resnet18(num_classes=3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def plain_loaders(n: int = 16):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 3, SIZE, SIZE, generator=g) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    data = TensorDataset(images, torch.arange(n) % 3)
    return DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8)


def test_a_users_own_torchvision_resnet_is_found_and_attributed(tmp_path, trainer_factory, events_reader):
    caap = CAAPCallback(num_images=2, mean=IMAGENET_MEAN, std=IMAGENET_STD, methods=["caap", "gradcam"], on_error="raise")
    module = OwnResNet()
    trainer = trainer_factory(tmp_path, [caap], max_epochs=1, limit_train_batches=1)
    trainer.fit(module, *plain_loaders())
    assert caap._model is module.net
    net = module.net.eval()
    images = caap.probe.images
    torch.testing.assert_close(
        caap.last.maps, ConvCAAP(net, mean=IMAGENET_MEAN, std=IMAGENET_STD).attribute(images, target=caap.last.targets,
                                                                                      relative=True),
        atol=1e-5, rtol=1e-4,
    )
    torch.testing.assert_close(caap.last.method_maps["gradcam"], GradCAM(net).attribute(images, target=caap.last.targets),
                               atol=1e-5, rtol=1e-4)
    scalars = events_reader(trainer.logger.log_dir)["scalars"]
    for tag in ("caap/insdel", "caap/gradcam/insdel"):
        (value,) = scalars[tag].values()
        assert value == pytest.approx(caap.last.metrics[tag], rel=1e-5)


def test_a_stage_name_as_layer_cutoff(tmp_path, trainer_factory):
    caap = CAAPCallback(num_images=4, layer_cutoff="layer3", metrics=["pointing_game"], log_images=False, on_error="raise")
    model, data = resnet_classifier(), shapes()
    trainer_factory(tmp_path, [caap]).validate(model, datamodule=data, verbose=False)
    assert caap._methods["caap"].layer_cutoff == 3 and caap.last.maps.shape == (4, SIZE // 16, SIZE // 16)
    expected = ConvCAAP(model.model.eval(), layer_cutoff="layer3").attribute(
        caap.probe.images, target=caap.last.targets, relative=True
    )
    torch.testing.assert_close(caap.last.maps, expected, atol=1e-5, rtol=1e-4)


def test_a_coarser_patch_grid(tmp_path, trainer_factory):
    caap = CAAPCallback(num_images=2, grid=4, metrics=["pointing_game"], log_images=False, on_error="raise")
    model, data = resnet_classifier(), shapes()
    trainer_factory(tmp_path, [caap]).validate(model, datamodule=data, verbose=False)
    # layer2's map is 8x8 at 64 px: a 4x4 grid takes 2x2 cells per patch.
    expected = ConvCAAP(model.model.eval(), grid=4).attribute(caap.probe.images, target=caap.last.targets, relative=True)
    assert caap.last.maps.shape == (2, 4, 4) and bool((expected.flatten(1).std(1) > 0).all())
    torch.testing.assert_close(caap.last.maps, expected, atol=1e-5, rtol=1e-4)


def test_auto_layer_cutoff_is_calibrated_once_and_kept_on_resume(tmp_path, monkeypatch, trainer_factory, events_reader):
    sweeps = []
    calibrate = ConvCAAP.calibrate

    def counted(self, *args, **kwargs):
        sweeps.append(self.layer_cutoff)
        return calibrate(self, *args, **kwargs)

    monkeypatch.setattr(ConvCAAP, "calibrate", counted)

    def callbacks(run: int):
        checkpoint = ModelCheckpoint(dirpath=tmp_path / f"ckpt{run}", save_last=True)
        caap = CAAPCallback(num_images=2, layer_cutoff="auto", insertion_deletion_steps=8, metrics=["pointing_game"],
                            log_images=False)
        return caap, checkpoint

    # The sweep's first cuts have a patch per 4x4 pixels: 32 px images keep it cheap.
    data = shapes(img_size=32, cue_size=6)
    caap, checkpoint = callbacks(0)
    trainer = trainer_factory(tmp_path, [caap, checkpoint], max_epochs=2, limit_train_batches=1, enable_checkpointing=True)
    trainer.fit(resnet_classifier(), datamodule=data)
    rows = caap.calibration
    # One sweep, at the first check, from the middle cut (layer2); every cut 0..4 scored.
    assert sweeps == [2] and [r["layer_cutoff"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["cut"] for r in rows] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert caap.calibrated_cutoff == max(rows, key=lambda r: r["insdel"])["layer_cutoff"]
    assert caap._methods["caap"].layer_cutoff == caap.calibrated_cutoff
    assert "caap/layer_cutoff_sweep/text_summary" in events_reader(trainer.logger.log_dir)["texts"]

    resumed, checkpoint = callbacks(1)
    trainer = trainer_factory(tmp_path, [resumed, checkpoint], max_epochs=3, limit_train_batches=1, enable_checkpointing=True)
    trainer.fit(resnet_classifier(seed=1), datamodule=data, ckpt_path=str(tmp_path / "ckpt0" / "last.ckpt"))
    assert sweeps == [2]  # no second sweep
    assert resumed.calibrated_cutoff == caap.calibrated_cutoff and resumed.calibration == rows
    assert resumed._methods["caap"].layer_cutoff == caap.calibrated_cutoff
    assert resumed.history[:2] == caap.history and len(resumed.history) == 3


def test_insertion_deletion_steps_none_is_one_image_row_per_step(tmp_path, trainer_factory):
    caap = CAAPCallback(num_images=1, insertion_deletion_steps=None, metrics=["insertion_deletion"], log_images=False,
                        on_error="raise")
    model = resnet_classifier()
    trainer_factory(tmp_path, [caap]).validate(model, datamodule=shapes(img_size=32, cue_size=6), verbose=False)
    assert caap._meters["caap"]["insertion_deletion"].step == 32
    scores = insertion_deletion(model.model.eval(), caap.probe.images, caap.last.maps, target=caap.last.targets, step=32)
    assert caap.last.metrics["caap/insdel"] == pytest.approx((scores.insertion - scores.deletion).mean().item(), rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"construction": "windowed"}, r"construction='windowed' does not apply to a CNN.*\('standard', 'frozen'\)"),
        ({"construction": "parallel"}, r"construction='parallel' does not apply to a CNN"),
        ({"window": 3}, r"window=3 is the radius of a ViT's windowed construction.*remove window="),
        ({"head": "classifier"}, r"head='classifier' completes a timm ViT.*\(ResNet\) is a CNN.*remove head="),
        ({"layer_cutoff": "layer9"}, r"layer_cutoff='layer9' is not a stage.*\['stem', 'layer1'"),
        ({"methods": ["caap", "rollout"]}, r"'rollout' applies to timm Vision Transformers only.*'gradcam'"),
    ],
)
def test_settings_a_cnn_does_not_take_fail_in_setup(tmp_path, trainer_factory, kwargs, message):
    trainer = trainer_factory(tmp_path, [CAAPCallback(num_images=2, **kwargs)])
    with pytest.raises(ValueError, match=message):
        trainer.fit(resnet_classifier(), datamodule=shapes())
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"construction": "frozen"}, r"construction='frozen' does not apply to a timm ViT.*'windowed'"),
        ({"layer_cutoff": "layer2"}, r"layer_cutoff='layer2' names a stage, which only a CNN has"),
        ({"layer_cutoff": "best"}, r"layer_cutoff='best' names a stage.*an int.*'auto'"),
        ({"grid": 4}, r"grid=\(4, 4\) sets a CNN's patch grid.*remove grid="),
    ],
)
def test_settings_a_vit_does_not_take_fail_in_setup(tmp_path, data_factory, classifier_factory, trainer_factory,
                                                    kwargs, message):
    trainer = trainer_factory(tmp_path, [CAAPCallback(num_images=2, **kwargs)])
    with pytest.raises(ValueError, match=message):
        trainer.fit(classifier_factory(), datamodule=data_factory())
    assert trainer.global_step == 0


class PlainConvNet(L.LightningModule):
    """A CNN of the user's own design (an nn.Sequential): nothing ConvCAAP reads."""

    def __init__(self, attribute: str) -> None:
        super().__init__()
        setattr(self, attribute, nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))
        self.attribute = attribute

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(getattr(self, self.attribute)(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "attribute, message",
    [
        # `.model` is taken as it is and the methods refuse it; anything else is not found.
        ("model", r"cannot attribute PlainConvNet \(attribution model: Sequential\).*timm Vision Transformer.*CNN "
                  r"\(torchvision ResNet.*get_attribution_model\(\)"),
        ("net", r"cannot attribute PlainConvNet: no supported ViT nor CNN found.*"
                r"get_attribution_model\(\).*a ViT \(timm VisionTransformer.*or a CNN that ConvCAAP reads \(torchvision ResNet"),
    ],
)
def test_an_unsupported_conv_net_names_both_families_and_the_hook(tmp_path, trainer_factory, attribute, message):
    trainer = trainer_factory(tmp_path, [CAAPCallback(num_images=2, mean=IMAGENET_MEAN, std=IMAGENET_STD)])
    with pytest.raises(ValueError, match=message):
        trainer.fit(PlainConvNet(attribute), *plain_loaders())
    assert trainer.global_step == 0
