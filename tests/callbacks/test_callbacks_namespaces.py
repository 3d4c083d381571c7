"""The callbacks under both of Lightning's namespaces: ``lightning.pytorch`` and the classic ``pytorch_lightning``.

Each fit uses only the namespace under test (its Trainer, LightningModule, LightningDataModule and
loggers), as a user's run written against that namespace would, and reads the logger's output back.
"""

from __future__ import annotations

import csv
import importlib
from types import ModuleType

import pytest
import timm
import torch
from torch import nn

from caap_lightning._lightning import NAMESPACES, is_overridden, lightning_base
from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor

HALF = (0.5, 0.5, 0.5)
EPOCHS = 2
MONITORED = "caap/cue_mass_ratio"  # a map metric: defined whatever the untrained model predicts


def namespaces():
    for name in NAMESPACES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pytorch-lightning is in the dev extra; a user's env may lack it
            yield pytest.param(None, id=name, marks=pytest.mark.skip(f"{name} is not installed"))
        else:
            yield pytest.param(module, id=name)


def classifier(pl: ModuleType) -> nn.Module:
    """A user's LightningModule of namespace ``pl``: a tiny timm ViT trained on the synthetic shapes' batches."""

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = timm.create_model(
                "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8, embed_dim=32,
                depth=2, num_heads=2,
            )

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch.images), batch.labels)

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", nn.functional.cross_entropy(self(batch.images), batch.labels))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Classifier()


def user_datamodule(pl: ModuleType, data) -> object:
    """A user's LightningDataModule of namespace ``pl`` over the synthetic shapes' loaders (object and cue masks)."""

    class Shapes(pl.LightningDataModule):
        def setup(self, stage: str) -> None:
            data.setup(stage)

        def train_dataloader(self):
            return data.train_dataloader()

        def val_dataloader(self):
            return data.val_dataloader()

    return Shapes()


def fit(pl: ModuleType, root, logger, data, as_datamodule: bool):
    caap = CAAPCallback(num_images=4, swap_images=4, mean=HALF, std=HALF, on_error="raise")
    monitor = SpuriousCueMonitor(monitor=MONITORED, threshold=1.5, on_error="raise")
    trainer = pl.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=logger, callbacks=[caap, monitor],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        limit_train_batches=1, log_every_n_steps=1, default_root_dir=str(root),
    )
    if as_datamodule:
        trainer.fit(classifier(pl), datamodule=user_datamodule(pl, data))
    else:
        data.setup("fit")
        trainer.fit(classifier(pl), train_dataloaders=data.train_dataloader(), val_dataloaders=data.val_dataloader())
    return caap, monitor


def assert_checks_ran(caap: CAAPCallback, monitor: SpuriousCueMonitor) -> None:
    assert [(row["epoch"], row["stage"]) for row in caap.history] == [(e, "fit") for e in range(EPOCHS)]
    assert caap.last.maps.shape == (4, 4, 4) and torch.isfinite(caap.last.maps).all()
    assert [row["score"] for row in monitor.history] == [row[MONITORED] for row in caap.history]


@pytest.mark.parametrize("as_datamodule", [False, True], ids=["loaders", "datamodule"])
@pytest.mark.parametrize("pl", list(namespaces()))
def test_fit_logs_to_the_namespaces_tensorboard_logger(pl, as_datamodule, tmp_path, data_factory, events_reader):
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    caap, monitor = fit(pl, tmp_path, logger, data_factory(), as_datamodule)
    assert_checks_ran(caap, monitor)
    events = events_reader(tmp_path / "tb")
    caap_scalars = {tag: steps for tag, steps in events["scalars"].items() if tag.startswith("caap/")}
    steps = [row["step"] for row in caap.history]
    for name, value in caap.last.metrics.items():
        assert caap_scalars[name][steps[-1]] == pytest.approx(value, rel=1e-5), name
    assert sorted(caap_scalars[MONITORED]) == steps
    assert sorted(events["scalars"]["spurious/score"]) == steps
    assert events["images"]["caap/heatmaps"] == steps
    assert sorted(events["texts"].get("spurious/alarm/text_summary", {})) == [a["step"] for a in monitor.alarms]


@pytest.mark.parametrize("pl", list(namespaces()))
def test_fit_logs_to_the_namespaces_csv_logger(pl, tmp_path, data_factory):
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    caap, monitor = fit(pl, tmp_path, logger, data_factory(), as_datamodule=True)
    assert_checks_ran(caap, monitor)
    run = tmp_path / "csv" / "version_0"
    with open(run / "metrics.csv") as f:
        logged = [float(row[MONITORED]) for row in csv.DictReader(f) if row.get(MONITORED)]
    assert logged == pytest.approx([row[MONITORED] for row in caap.history], rel=1e-5)
    # A CSVLogger shows no images: the heatmap grids are PNG files beside its metrics.
    assert sorted(p.name for p in (run / "caap_images").glob("caap_heatmaps_step*.png")) == sorted(
        f"caap_heatmaps_step{row['step']}.png" for row in caap.history
    )


@pytest.mark.parametrize("pl", list(namespaces()))
def test_is_overridden_answers_for_either_namespace(pl):
    module = classifier(pl)
    assert lightning_base(module) is pl.LightningModule
    assert is_overridden("validation_step", module) and not is_overridden("test_step", module)
    datamodule = user_datamodule(pl, data=None)
    assert lightning_base(datamodule) is pl.LightningDataModule
    assert is_overridden("val_dataloader", datamodule) and not is_overridden("test_dataloader", datamodule)
    assert lightning_base(CAAPCallback()).__module__.startswith("lightning.pytorch")
    assert not is_overridden("validation_step", None)


def test_objects_of_neither_namespace_are_refused_with_the_remedy():
    with pytest.raises(TypeError, match="not a LightningModule, LightningDataModule or Callback"):
        is_overridden("validation_step", nn.Linear(2, 2))
