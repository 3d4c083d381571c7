"""Tiny synthetic data, a tiny ViTClassifier and a quiet CPU trainer for the callback tests."""

from __future__ import annotations

import glob
from typing import Dict, List

import lightning as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from caap_lightning.datamodules import SyntheticSpuriousDataModule
from caap_lightning.models import ViTClassifier

HALF = (0.5, 0.5, 0.5)  # vit_tiny's normalisation, so that the model does not warn


def tiny_data(**kwargs) -> SyntheticSpuriousDataModule:
    cfg = dict(num_classes=3, img_size=32, cue_size=6, num_train=48, num_val=16, num_test=8, batch_size=16, mean=HALF, std=HALF)
    cfg.update(kwargs)
    return SyntheticSpuriousDataModule(**cfg)


def tiny_classifier(seed: int = 0, **kwargs) -> ViTClassifier:
    L.seed_everything(seed, verbose=False)
    cfg = dict(num_classes=3, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, warmup_epochs=0)
    cfg.update(kwargs)
    return ViTClassifier(**cfg)


def tiny_trainer(root, callbacks: List, max_epochs: int = 2, **kwargs) -> L.Trainer:
    cfg = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(root), name="tb", version=0),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    cfg.update(kwargs)
    return L.Trainer(**cfg)


def read_events(log_dir) -> Dict[str, Dict]:
    """Every scalar, image and text of the TensorBoard event files under ``log_dir``: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True))
    out: Dict[str, Dict] = {"scalars": {}, "images": {}, "texts": {}, "files": files}
    for path in files:
        events = EventAccumulator(path, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out["scalars"].setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
        for tag in events.Tags()["images"]:
            for e in events.Images(tag):
                out["images"].setdefault(tag, []).append(e.step)
        for tag in events.Tags()["tensors"]:
            if tag.endswith("text_summary"):
                for e in events.Tensors(tag):
                    out["texts"].setdefault(tag, {})[e.step] = e.tensor_proto.string_val[0].decode()
    return out


def script_scores(caap, series, key: str = "caap/cue_mass_ratio"):
    """Make ``caap`` report ``series[epoch]`` for ``key`` instead of the measured value."""
    finish = caap._gather_result

    def fake(*args):
        result = finish(*args)
        result.metrics[key] = series[result.epoch]
        return result

    caap._gather_result = fake
    return caap


@pytest.fixture
def scripted():
    """``scripted(caap, series, key)``: the callback reports the scripted scores."""
    return script_scores


@pytest.fixture
def data_factory():
    return tiny_data


@pytest.fixture
def classifier_factory():
    return tiny_classifier


@pytest.fixture
def trainer_factory():
    return tiny_trainer


@pytest.fixture
def events_reader():
    return read_events
