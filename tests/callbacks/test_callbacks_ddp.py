"""DDP on two CPU processes (gloo): the fit completes, rank zero logs the images once, and the
synced metrics are those one process computes on the same weights."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor


def test_ddp_two_processes_log_once_and_match_one_process(
    tmp_path, data_factory, classifier_factory, trainer_factory, events_reader
):
    # 5 probe images: the ranks get uneven shares (3 and 2); Grad-CAM takes gradients on each rank.
    caap = CAAPCallback(num_images=5, methods=["caap", "gradcam"], max_images_logged=5)
    trainer = L.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(str(tmp_path), name="ddp", version=0),
        callbacks=[caap, SpuriousCueMonitor()],
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

    single = CAAPCallback(num_images=5, methods=["caap", "gradcam"], log_images=False)
    trainer_factory(tmp_path, [single]).validate(model, datamodule=data, verbose=False)
    expected = {k: v for k, v in single.last.metrics.items() if k != "caap/seconds"}
    assert distributed.keys() == expected.keys()
    for name, value in expected.items():
        assert distributed[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
