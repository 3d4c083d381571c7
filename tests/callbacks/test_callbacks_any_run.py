"""The callbacks on a user's own training run: their LightningModule, plain data, any logger.

Every fit here reads the logger's output back (TensorBoard event files, PNG files) and compares
the values with the callback's own result or with CAAP run directly.
"""

from __future__ import annotations

import sys
import textwrap
import warnings

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from caap_lightning import CAAP
from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.callbacks.probe import seeded_order
from caap_lightning.metrics import PointingGame, pointing_game

HALF = (0.5, 0.5, 0.5)


def tiny_vit(num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=32, patch_size=8, embed_dim=32,
        depth=2, num_heads=2,
    )


class BackboneClassifier(L.LightningModule):
    """The common user layout: a timm backbone without a head (``num_classes=0``) and the module's own head."""

    def __init__(self, num_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.backbone = tiny_vit(num_classes=0, seed=seed)
        self.classifier = nn.Linear(self.backbone.num_features, num_classes)

    def forward(self, x):
        return self.classifier(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch[:2] if isinstance(batch, (tuple, list)) else (batch["image"], batch["label"])
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class NetClassifier(BackboneClassifier):
    """A ViT with its own head, as ``self.net``."""

    def __init__(self, num_classes: int = 3, seed: int = 0) -> None:
        L.LightningModule.__init__(self)
        self.net = tiny_vit(num_classes=num_classes, seed=seed)

    def forward(self, x):
        return self.net(x)


def image_data(n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 3, 32, 32, generator=g) - 0.5) / 0.5  # normalised with mean = std = 0.5
    labels = torch.randint(0, 3, (n,), generator=g)
    masks = torch.zeros(n, 32, 32, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    return images, labels, masks


def quiet_trainer(root, callbacks, logger=None, max_epochs: int = 1, **kwargs) -> L.Trainer:
    cfg = dict(
        max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1,
        logger=TensorBoardLogger(str(root), name="tb", version=0) if logger is None else logger,
        default_root_dir=str(root),
    )
    cfg.update(kwargs)
    return L.Trainer(**cfg)


def loaders(batch_size: int = 8):
    images, labels, _ = image_data()
    data = TensorDataset(images, labels)
    return DataLoader(data, batch_size=batch_size, shuffle=True), DataLoader(data, batch_size=batch_size)


def test_plain_loaders_and_a_backbone_with_its_own_head(tmp_path, events_reader):
    caap = CAAPCallback(num_images=4, mean=HALF, std=HALF, on_error="raise")
    model = BackboneClassifier()
    train, val = loaders()
    quiet_trainer(tmp_path, [caap]).fit(model, train_dataloaders=train, val_dataloaders=val)
    images, labels, _ = image_data()
    # The probe is a seeded draw across the validation set.
    drawn = seeded_order(len(images))[:4]
    images, labels = images[drawn], labels[drawn]
    torch.testing.assert_close(caap.probe.images, images)
    assert torch.equal(caap.probe.labels, labels)
    # Its maps are those of the same ViT with the head built in.
    built_in = tiny_vit(num_classes=3)
    state = {k: v for k, v in model.backbone.state_dict().items()}
    state.update({"head.weight": model.classifier.weight, "head.bias": model.classifier.bias})
    built_in.load_state_dict(state)
    expected = CAAP(built_in.eval(), construction="parallel", mean=HALF, std=HALF).attribute(
        images, target=caap.last.targets, relative=True
    )
    torch.testing.assert_close(caap.last.maps, expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert torch.equal(caap.last.targets, built_in(images).argmax(-1))
    events = events_reader(tmp_path / "tb")
    (step,) = events["scalars"]["caap/insdel"]
    assert events["scalars"]["caap/insdel"][step] == pytest.approx(caap.last.metrics["caap/insdel"], rel=1e-5)
    assert events["images"]["caap/heatmaps"] == [step]


class DictDataset(Dataset):
    def __init__(self):
        self.images, self.labels, self.masks = image_data()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "label": self.labels[i], "mask": self.masks[i][None].float()}


class PlainDataModule(L.LightningDataModule):
    mean, std = HALF, HALF

    def train_dataloader(self):
        return DataLoader(DictDataset(), batch_size=8)

    def val_dataloader(self):
        return DataLoader(DictDataset(), batch_size=8)


class DictNet(NetClassifier):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["pixel_values"]), batch["label"])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.cross_entropy(self(batch["pixel_values"]), batch["label"]))


def test_a_plain_datamodule_with_dict_batches_and_masks(tmp_path, events_reader):
    caap = CAAPCallback(num_images=5, on_error="raise")
    quiet_trainer(tmp_path, [caap]).fit(DictNet(), datamodule=PlainDataModule())
    images, labels, masks = image_data()
    assert torch.equal(caap.probe.masks, masks[:5]) and caap.probe.masks.dtype == torch.bool
    assert (caap.mean, caap.std) == (HALF, HALF)  # the datamodule's
    assert "caap/pointing_game" in caap.last.metrics and "caap/background_mass_ratio" in caap.last.metrics
    events = events_reader(tmp_path / "tb")
    for name in ("caap/pointing_game", "caap/aupr_fg", "caap/background_mass_ratio"):
        (value,) = events["scalars"][name].values()
        assert value == pytest.approx(caap.last.metrics[name], rel=1e-5)


def test_a_probe_given_as_a_tuple_with_one_channel_masks(tmp_path):
    images, labels, masks = image_data()
    caap = CAAPCallback(probe=(images[:4], labels[:4], masks[:4, None].int()), mean=HALF, std=HALF, on_error="raise")
    quiet_trainer(tmp_path, [caap]).validate(NetClassifier(), dataloaders=loaders()[1], verbose=False)
    assert caap.probe.masks.shape == (4, 32, 32) and "caap/aupr_fg" in caap.last.metrics


def test_the_classic_tensorboard_logger(tmp_path, events_reader):
    classic = pytest.importorskip("pytorch_lightning.loggers")
    caap = CAAPCallback(num_images=4, mean=HALF, std=HALF)
    logger = classic.TensorBoardLogger(str(tmp_path), name="classic", version=0)
    quiet_trainer(tmp_path, [caap], logger=logger).fit(NetClassifier(), *loaders())
    events = events_reader(tmp_path / "classic")
    assert "caap/heatmaps" in events["images"] and "caap/insertion_deletion" in events["images"]


def test_a_logger_without_images_gets_pngs_and_one_warning(tmp_path):
    caap = CAAPCallback(num_images=4, mean=HALF, std=HALF)
    with pytest.warns(UserWarning, match="cannot show images") as record:
        quiet_trainer(tmp_path, [caap], logger=CSVLogger(str(tmp_path), name="csv"), max_epochs=2).fit(
            NetClassifier(), *loaders()
        )
    assert sum("cannot show images" in str(w.message) for w in record) == 1
    pngs = sorted(tmp_path.glob("csv/**/*.png"))
    heatmaps = [p for p in pngs if "heatmaps" in p.name]
    assert len(heatmaps) == 2
    with Image.open(heatmaps[0]) as image:
        assert image.size[0] > 100 and image.size[1] > 100


def two_of_each(scripted, series_background):
    first = scripted(CAAPCallback(num_images=4, metrics=["background_mass_ratio"], log_images=False), series_background,
                     "caap/background_mass_ratio")
    second = CAAPCallback(num_images=4, methods=["gradcam"], metrics=["pointing_game"], log_images=False, prefix="caap_gradcam")
    monitors = [
        SpuriousCueMonitor(monitor="caap/background_mass_ratio", threshold=1.5, patience=3),
        SpuriousCueMonitor(monitor="caap_gradcam/pointing_game", threshold=0.5, alarm_on="low", patience=3,
                           prefix="spurious_pg"),
    ]
    return [first, second, *monitors]


def test_two_callbacks_and_two_monitors_in_one_trainer_across_a_resume(tmp_path, scripted, data_factory, classifier_factory, events_reader):
    from lightning.pytorch.callbacks import ModelCheckpoint

    background = [1.0, 2.0, 2.0, 2.0]
    callbacks = two_of_each(scripted, background)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(tmp_path, callbacks + [checkpoint], max_epochs=2, limit_train_batches=1, enable_checkpointing=True)
    trainer.fit(classifier_factory(), datamodule=data_factory())
    first, second, bg_monitor, pg_monitor = callbacks
    assert bg_monitor.wait == 1 and len(second.history) == 2 and "caap_gradcam/pointing_game" in second.history[0]

    resumed = two_of_each(scripted, background)
    trainer = quiet_trainer(tmp_path, resumed, max_epochs=4, limit_train_batches=1)
    with pytest.warns(UserWarning, match="alarm at epoch 3"):
        trainer.fit(classifier_factory(), datamodule=data_factory(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    r_first, r_second, r_bg, r_pg = resumed
    # Each instance got its own state back: histories continue, the background count reached patience 3.
    assert [row["epoch"] for row in r_first.history] == [0, 1, 2, 3]
    assert [row["epoch"] for row in r_second.history] == [0, 1, 2, 3]
    assert [a["epoch"] for a in r_bg.alarms] == [3]
    assert len(r_pg.history) == 4
    events = events_reader(tmp_path / "tb")
    assert "spurious/score" in events["scalars"] and "spurious_pg/score" in events["scalars"]
    assert "caap_gradcam/pointing_game" in events["scalars"]


def test_validate_after_a_fit_does_not_advance_the_alarm(tmp_path, scripted, data_factory, classifier_factory):
    caap = scripted(CAAPCallback(num_images=4, metrics=["cue_mass_ratio"], log_images=False), [1.0, 2.0, 2.0, 2.0])
    monitor = SpuriousCueMonitor(monitor="caap/cue_mass_ratio", threshold=1.5, patience=2)
    trainer = quiet_trainer(tmp_path, [caap, monitor], max_epochs=2, limit_train_batches=1)
    model, data = classifier_factory(), data_factory()
    trainer.fit(model, datamodule=data)
    assert monitor.wait == 1 and not monitor.alarmed
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="SpuriousCueMonitor: alarm")
        trainer.validate(model, datamodule=data, verbose=False)
    assert monitor.wait == 1 and len(monitor.history) == 2
    assert [row["stage"] for row in caap.history] == ["fit", "fit", "validate"]


def test_single_valued_metrics_log_as_torchmetrics_do(tmp_path):
    class LogsPointingGame(NetClassifier):
        def __init__(self):
            super().__init__()
            self.pg = PointingGame()

        def validation_step(self, batch, batch_idx):
            x, _ = batch
            maps = x.mean(1)  # any map: this checks the logging, not the metric
            masks = torch.zeros_like(maps, dtype=torch.bool)
            masks[:, 8:24, 8:24] = True
            self.pg.update(maps, masks)
            self.log("val/pg", self.pg)

    trainer = quiet_trainer(tmp_path, [])
    (logged,) = trainer.validate(LogsPointingGame(), dataloaders=loaders()[1], verbose=False)
    images, _, masks = image_data()  # the loader's images, and the same centre masks
    expected = pointing_game(images.mean(1), masks).mean()  # over the epoch, not the last batch
    assert logged["val/pg"] == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: CAAPCallback(probe=torch.rand(4, 3, 32, 32), mean=HALF, std=HALF, target="label"), "labels"),
        (lambda: CAAPCallback(probe=(torch.rand(4, 3, 32, 32), torch.zeros(4).long(), torch.full((4, 32, 32), 2))),
         "masks"),
        (lambda: CAAPCallback(probe=(torch.rand(4, 3, 32, 32), torch.zeros(4).long(), torch.ones(4, 16, 16).bool())),
         "masks"),
        (lambda: CAAPCallback(score="log-prob"), "score='log-prob'"),
        (lambda: CAAPCallback(prefix="caap/x"), "prefix"),
        (lambda: SpuriousCueMonitor(alarm_on="max"), "alarm_on='max'"),
    ],
)
def test_bad_arguments_fail_early_with_what_to_change(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        callback = make()
        quiet_trainer(tmp_path, [callback]).validate(NetClassifier(), dataloaders=loaders()[1], verbose=False)


def test_setup_errors_name_the_remedy(tmp_path, data_factory, classifier_factory):
    class TwoViTs(NetClassifier):
        def __init__(self):
            super().__init__()
            self.teacher = tiny_vit()

    with pytest.raises(ValueError, match="get_attribution_model"):
        quiet_trainer(tmp_path, [CAAPCallback(mean=HALF, std=HALF)]).validate(TwoViTs(), dataloaders=loaders()[1])
    with pytest.raises(ValueError, match="prefix"):
        quiet_trainer(tmp_path, [CAAPCallback(), CAAPCallback(methods=["gradcam"])]).validate(
            classifier_factory(), datamodule=data_factory(), verbose=False
        )


def test_settings_that_can_never_run_warn_once_in_setup(tmp_path):
    with pytest.warns(UserWarning, match="never runs") as record:
        quiet_trainer(tmp_path, [CAAPCallback(every_n_epochs=3, mean=HALF, std=HALF)], max_epochs=2,
                      limit_train_batches=1).fit(NetClassifier(), *loaders())
    assert sum("never runs" in str(w.message) for w in record) == 1
    images, labels, _ = image_data()
    with pytest.warns(UserWarning, match="no validation loop"):
        quiet_trainer(tmp_path, [CAAPCallback(probe=(images[:4], labels[:4]), mean=HALF, std=HALF)],
                      limit_train_batches=1, limit_val_batches=0).fit(NetClassifier(), *loaders())
    # No validation data and no probe: the same warning, not an error about the probe.
    caap = CAAPCallback(mean=HALF, std=HALF)
    with pytest.warns(UserWarning, match="no validation loop"):
        quiet_trainer(tmp_path, [caap, SpuriousCueMonitor()], limit_train_batches=1).fit(
            NetClassifier(), train_dataloaders=loaders()[0]
        )
    assert caap.history == []


def test_normalisation_guess_is_said_and_a_contradicting_probe_warns(tmp_path):
    images, labels, _ = image_data()
    pixels = images * 0.5 + 0.5  # raw [0, 1] pixels, while the model's config says ImageNet
    with pytest.warns(UserWarning, match="pixel"):
        quiet_trainer(tmp_path, [CAAPCallback(probe=(pixels[:4], labels[:4]))]).validate(
            NetClassifier(), dataloaders=loaders()[1], verbose=False
        )


def test_a_module_swapped_during_the_fit_is_attributed_fresh(tmp_path):
    class Swaps(NetClassifier):
        def on_validation_epoch_start(self):
            if self.current_epoch == 1:
                self.net = tiny_vit(seed=7)

    caap = CAAPCallback(num_images=4, mean=HALF, std=HALF, on_error="raise")
    module = Swaps()
    quiet_trainer(tmp_path, [caap], max_epochs=2, limit_train_batches=1).fit(module, *loaders())
    images, _, _ = image_data()
    expected = CAAP(module.net.eval(), construction="parallel", mean=HALF, std=HALF).attribute(
        images[seeded_order(len(images))[:4]], target=caap.last.targets, relative=True
    )
    torch.testing.assert_close(caap.last.maps, expected, atol=1e-5, rtol=1e-4)


def test_lightning_cli_with_the_users_own_module(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    (tmp_path / "user_module.py").write_text(textwrap.dedent('''
        import lightning as L, timm, torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset

        class UserModule(L.LightningModule):
            def __init__(self, num_classes: int = 3):
                super().__init__()
                self.backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                                                  img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
                self.head = nn.Linear(32, num_classes)

            def forward(self, x):
                return self.head(self.backbone(x))

            def training_step(self, batch, i):
                return nn.functional.cross_entropy(self(batch[0]), batch[1])

            def validation_step(self, batch, i):
                self.log("val/loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

            def _data(self):
                g = torch.Generator().manual_seed(0)
                return DataLoader(TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 3), batch_size=4)

            def train_dataloader(self):
                return self._data()

            def val_dataloader(self):
                return self._data()
    '''))
    (tmp_path / "config.yaml").write_text(textwrap.dedent(f'''
        model:
          class_path: user_module.UserModule
        trainer:
          max_epochs: 1
          accelerator: cpu
          enable_progress_bar: false
          enable_checkpointing: false
          num_sanity_val_steps: 0
          default_root_dir: {tmp_path}
          logger:
            class_path: lightning.pytorch.loggers.TensorBoardLogger
            init_args: {{save_dir: {tmp_path}, name: cli}}
          callbacks:
            - class_path: caap_lightning.callbacks.CAAPCallback
              init_args: {{num_images: 4, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5], on_error: raise}}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = LightningCLI(args=["fit", "--config", str(tmp_path / "config.yaml")], save_config_kwargs={"overwrite": True})
    (callback,) = [cb for cb in run.trainer.callbacks if isinstance(cb, CAAPCallback)]
    assert len(callback.history) == 1 and "caap/insdel" in callback.history[0]
    sys.modules.pop("user_module", None)


def test_the_callbacks_leave_the_training_run_as_it_was(tmp_path, data_factory, classifier_factory, trainer_factory):
    """A fit with every check on (maps of two methods, a noise blank, images, the monitor's strategies) ends with the
    weights of the same fit without callbacks: no check draws from the training's random streams or moves a weight."""

    def fit(callbacks):
        data, module = data_factory(cue_correlation=0.9), classifier_factory(seed=0)
        L.seed_everything(0, verbose=False)
        trainer_factory(tmp_path / str(len(callbacks)), callbacks, max_epochs=2).fit(module, datamodule=data)
        return module.state_dict()

    plain = fit([])
    caap = CAAPCallback(methods=["caap", "gradcam"], num_images=8, blank="noise")
    # min_skill=None: the untrained model's swap checks count, so the alarm's report runs too (issue 29).
    monitor = SpuriousCueMonitor(strategies=True, num_images=2, threshold=0.5, min_skill=None)
    with pytest.warns(UserWarning):  # a probe of 8 for strategies, and the alarm the low threshold raises
        watched = fit([caap, monitor])
    # Both checks ran in full: maps of both methods, the monitor's score, strategies and its alarm report.
    assert caap.last.epoch == 1 and list(caap.last.method_maps) == ["caap", "gradcam"]
    assert len(monitor.history) == 2 and monitor.alarmed and "all" in monitor.last_strategies
    assert plain.keys() == watched.keys()
    assert all(torch.equal(plain[k], watched[k]) for k in plain)
    # The fit did train: the weights are not the initial ones.
    assert not torch.equal(classifier_factory(seed=0).state_dict()["model.head.weight"], plain["model.head.weight"])
