"""DDP on two CPU processes (gloo): the fit completes, rank zero logs the images once, and the
synced metrics are those one process computes on the same weights."""

from __future__ import annotations

import sys
import warnings

import lightning as L
import torch
from timm.models.vision_transformer import VisionTransformer
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.callbacks.metric_table import METRIC_NAMES


class SavesPerImage(L.Callback):
    """Rank zero saves the model tests' per-image values of the last check (ddp_spawn keeps the callbacks' state
    in the spawned processes)."""

    def __init__(self, caap: CAAPCallback, path) -> None:
        self.caap, self.path = caap, path

    def on_validation_end(self, trainer, pl_module):
        if trainer.is_global_zero and self.caap.last is not None:
            torch.save(self.caap.last.model_test_image_values, self.path)


def test_ddp_two_processes_log_once_and_match_one_process(
    tmp_path, data_factory, classifier_factory, trainer_factory, events_reader
):
    # 5 probe images and 7 swap images: the ranks get uneven shares (3 and 2, 4 and 3), and some donors are on the
    # other rank; Grad-CAM takes gradients on each rank. Every metric, the insertion ratios too.
    settings = dict(num_images=5, swap_images=7, methods=["caap", "gradcam"], metrics=list(METRIC_NAMES))
    caap = CAAPCallback(**settings, max_images_logged=5)
    trainer = L.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(str(tmp_path), name="ddp", version=0),
        callbacks=[caap, SpuriousCueMonitor(), SavesPerImage(caap, tmp_path / "per_image.pt")],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model, data = classifier_factory(), data_factory()
    trainer.fit(model, datamodule=data)  # ddp_spawn loads the trained weights back into `model`
    distributed = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("caap/") and k != "caap/seconds"}
    assert "caap/cue_mass_ratio" in distributed and "caap/insdel" in distributed and "caap/gradcam/insdel" in distributed

    events = events_reader(tmp_path / "ddp")
    assert len(events["files"]) == 1  # rank zero alone writes
    (step,) = events["scalars"]["val/acc"]
    assert events["images"]["caap/heatmaps"] == [step]
    assert events["images"]["caap/insertion_deletion"] == [step]
    assert list(events["scalars"]["spurious/score"]) == [step]

    single = CAAPCallback(**settings, log_images=False)
    trainer_factory(tmp_path, [single]).validate(model, datamodule=data, verbose=False)
    expected = {k: v for k, v in single.last.metrics.items() if k != "caap/seconds"}
    assert distributed.keys() == expected.keys()
    for name, value in expected.items():
        assert distributed[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    # The model tests' per-image values, gathered rank by rank, come back in the probe's order.
    per_image = torch.load(tmp_path / "per_image.pt")
    # Each swap test's follow share too (issue 29): 1 where the pair follows the swapped region, 0 where not.
    regions = ("background", "cue", "border", "surround")
    assert set(per_image) == {f"caap/{region}_{test}_ratio" for region in regions
                              for test in ("insertion", "swap")} | {f"caap/{region}_swap_follow_share" for region in regions}
    for name, values in per_image.items():
        # Every image of the test's own probe (a swap's: the whole swap probe), as one process computes them.
        torch.testing.assert_close(values, single.last.model_test_image_values[name], rtol=1e-4, atol=1e-5,
                                   equal_nan=True)  # NaN: skipped


class FailsOnRankOne(VisionTransformer):
    """A ViT whose plain forward (the callback's classification of the probe) fails on rank 1 only."""

    def forward(self, x):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            raise RuntimeError("boom on rank 1")
        return super().forward(x)


class RankFailingClassifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = FailsOnRankOne(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)

    def _logits(self, x):  # the steps go round the failing forward
        return self.model.forward_head(self.model.forward_features(x))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self._logits(batch.images), batch.labels)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.nn.functional.cross_entropy(self._logits(batch.images), batch.labels), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_failure_on_rank_one_is_reported_there_and_by_rank_zero(tmp_path, capfd, data_factory):
    caap = CAAPCallback(num_images=4, log_images=False)
    trainer = L.Trainer(
        strategy="ddp_fork", accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0,
        logger=False, callbacks=[caap], enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        # Every process prints its warnings to the shared stderr (pytest would keep the children's to themselves).
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *args, **kwargs: sys.stderr.write(f"{message}\n")
        trainer.fit(RankFailingClassifier(), datamodule=data_factory())
    err = capfd.readouterr().err
    # Rank 1 says why, once; rank 0, whose own share worked, says which rank made every rank skip.
    assert err.count("classifying the probe images failed at epoch 0 on rank 1 (RuntimeError: boom on rank 1)") == 1
    assert err.count("failed at epoch 0 on rank(s) [1]") == 1
    assert "CAAPCallback: classifying the probe images failed at epoch 0 on rank(s) [1]" in err  # the step that failed
    assert "on rank 0 (" not in err
