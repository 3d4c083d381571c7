"""The run is the run: a fit with CAAPCallback and SpuriousCueMonitor ends with the weights, the global random
states and the training batch order of the same fit without them, whatever the probe's source (plain loaders of
every kind, a datamodule's ``probe_batch``, ``probe=``) and the Trainer's features."""

from __future__ import annotations

import random
from typing import Any, Callable, Dict, List, Tuple

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor

# The checks' own warnings (a small probe, the low threshold's alarm) say nothing about the data safety tested here.
pytestmark = pytest.mark.filterwarnings("ignore")

HALF = (0.5, 0.5, 0.5)
CLASSES, SIZE, N_TRAIN, N_VAL, BATCH = 3, 32, 16, 12, 4


def pixels(n: int, seed: int) -> torch.Tensor:
    """Images normalised with mean = std = 0.5, from their own generator."""
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def sorted_labels(n: int) -> torch.Tensor:
    """Labels sorted by class, as a class-sorted folder (ImageFolder) lists them."""
    return torch.arange(n) * CLASSES // n


class AugmentedTrain(Dataset):
    """Training samples ``(image, label, index)`` flipped at random from the global torch generator, as a v2 random
    transform does: a probe read that moves that generator changes the images trained on."""

    def __init__(self) -> None:
        self.x, self.y = pixels(N_TRAIN, 1), torch.arange(N_TRAIN) % CLASSES

    def __len__(self) -> int:
        return N_TRAIN

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        image = self.x[i].flip(-1) if torch.rand(()) < 0.5 else self.x[i]
        return image, self.y[i], i


class ValSet(Dataset):
    """The validation samples, as tuples or as dicts."""

    def __init__(self, dicts: bool = False) -> None:
        self.x, self.y, self.dicts = pixels(N_VAL, 2), sorted_labels(N_VAL), dicts

    def __len__(self) -> int:
        return N_VAL

    def __getitem__(self, i: int) -> Any:
        return {"image": self.x[i], "label": self.y[i]} if self.dicts else (self.x[i], self.y[i])


class ValStream(IterableDataset):
    def __iter__(self):
        x, y = pixels(N_VAL, 2), sorted_labels(N_VAL)
        return iter(zip(x, y))


class Classifier(L.LightningModule):
    """A tiny ViT with dropout (a draw from the global generator at every training step); it records the samples
    each training step saw."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                       num_classes=CLASSES, drop_rate=0.1)
        self.seen: List[List[int]] = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.append(index.tolist())
        return nn.functional.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        self.log("val/loss", nn.functional.cross_entropy(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ProbeDataModule(L.LightningDataModule):
    """Plain loaders and a ``probe_batch(n)``."""

    def __init__(self, workers: int = 0) -> None:
        super().__init__()
        self.workers = workers

    def train_dataloader(self):
        return train_loader(self.workers)

    def val_dataloader(self):
        return DataLoader(ValSet(), batch_size=BATCH)

    def probe_batch(self, n: int):
        return pixels(N_VAL, 2)[:n], sorted_labels(N_VAL)[:n]


def train_loader(workers: int = 0) -> DataLoader:
    return DataLoader(AugmentedTrain(), batch_size=BATCH, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0)


# Each source: the val loader of the fit and the CAAPCallback's probe= argument (None: read from the source).
VAL_SOURCES: Dict[str, Callable[[], Tuple[Any, Any]]] = {
    "sorted": lambda: (DataLoader(ValSet(), batch_size=BATCH), None),
    "shuffled": lambda: (DataLoader(ValSet(), batch_size=BATCH, shuffle=True), None),
    "dicts": lambda: (DataLoader(ValSet(dicts=True), batch_size=BATCH), None),
    "iterable": lambda: (DataLoader(ValStream(), batch_size=BATCH), None),
    "workers": lambda: (DataLoader(ValSet(), batch_size=BATCH, num_workers=2), None),
    "datamodule": lambda: (None, None),
    "probe_tensor": lambda: (DataLoader(ValSet(), batch_size=BATCH), pixels(N_VAL, 2)),
    "probe_tuple": lambda: (DataLoader(ValSet(), batch_size=BATCH), (pixels(N_VAL, 2), sorted_labels(N_VAL))),
    "probe_dict": lambda: (DataLoader(ValSet(), batch_size=BATCH), {"image": pixels(N_VAL, 2), "label": sorted_labels(N_VAL)}),
    "probe_dataset": lambda: (DataLoader(ValSet(), batch_size=BATCH), TensorDataset(pixels(N_VAL, 2), sorted_labels(N_VAL))),
}
FEATURES: Dict[str, Dict[str, Any]] = {
    "plain": {},
    "bf16": {"precision": "bf16-mixed"},
    "resume": {},
    "accumulate": {"accumulate_grad_batches": 2},
    "workers": {},
    "val_check_interval": {"val_check_interval": 0.5},
}
CASES = [(source, "plain") for source in VAL_SOURCES] + [
    (source, feature) for feature in FEATURES if feature != "plain" for source in ("shuffled", "iterable")
]


def fit(root, source: str, feature: str, watched: bool) -> Dict[str, Any]:
    """One seeded 2-epoch fit; its final weights, global random states, training batch order and checks."""
    val, probe = VAL_SOURCES[source]()
    workers = 2 if feature == "workers" else 0
    caap = CAAPCallback(num_images=4, swap_images=8, probe=probe, mean=HALF, std=HALF, blank="noise")
    callbacks = [caap, SpuriousCueMonitor(strategies=True)] if watched else []
    module = Classifier()
    L.seed_everything(0, verbose=False)

    def trainer(max_epochs: int) -> L.Trainer:
        return L.Trainer(
            max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=callbacks, num_sanity_val_steps=0,
            logger=TensorBoardLogger(str(root), name="tb"), enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, log_every_n_steps=1, deterministic=True, **FEATURES[feature],
        )

    def run(t: L.Trainer, **kwargs) -> None:
        if val is None:
            t.fit(module, datamodule=ProbeDataModule(workers), **kwargs)
        else:
            t.fit(module, train_dataloaders=train_loader(workers), val_dataloaders=val, **kwargs)

    if feature == "resume":
        first = trainer(max_epochs=1)
        run(first)
        first.save_checkpoint(root / "epoch0.ckpt")
        # The resumed fit is a new Trainer with new callbacks, as in a new process.
        caap = CAAPCallback(num_images=4, swap_images=8, probe=probe, mean=HALF, std=HALF, blank="noise")
        callbacks[:] = [caap, SpuriousCueMonitor(strategies=True)] if watched else []
        run(trainer(max_epochs=2), ckpt_path=str(root / "epoch0.ckpt"))
    else:
        run(trainer(max_epochs=2))
    return {
        "weights": module.state_dict(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "seen": module.seen,
        "checks": len(caap.history),
    }


@pytest.mark.parametrize("source, feature", CASES)
def test_the_callbacks_leave_the_run_as_it_was(tmp_path, source, feature):
    plain = fit(tmp_path / "plain", source, feature, watched=False)
    watched = fit(tmp_path / "watched", source, feature, watched=True)
    assert watched["checks"] >= 1  # the callbacks did check (2 a fit, 1 after a resume, 4 at val_check_interval=0.5)
    assert plain["seen"] == watched["seen"]
    assert plain["weights"].keys() == watched["weights"].keys()
    for name, value in plain["weights"].items():
        assert torch.equal(value, watched["weights"][name]), name
    assert torch.equal(plain["torch"], watched["torch"])
    assert plain["python"] == watched["python"]
    np.testing.assert_equal(plain["numpy"], watched["numpy"])
