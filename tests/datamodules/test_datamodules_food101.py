"""Food101DataModule on a tiny fixture in the exact layout torchvision's Food101 reads."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from caap_lightning.datamodules import Food101DataModule
from caap_lightning.utils import unnormalize

COLOURS = {"apple_pie": (220, 40, 40), "sushi": (40, 220, 40)}


@pytest.fixture
def food_root(tmp_path):
    base = tmp_path / "food-101"
    (base / "meta").mkdir(parents=True)
    splits = {"train": ["1", "2"], "test": ["3"]}
    for split, ids in splits.items():
        listing = {}
        for name, colour in COLOURS.items():
            (base / "images" / name).mkdir(parents=True, exist_ok=True)
            for image_id in ids:
                Image.fromarray(np.full((20, 30, 3), colour, np.uint8)).save(base / "images" / name / f"{image_id}.jpg")
            listing[name] = [f"{name}/{image_id}" for image_id in ids]
        (base / "meta" / f"{split}.json").write_text(json.dumps(listing))
    return tmp_path


def test_probe_batch_has_no_masks(food_root):
    dm = Food101DataModule(root=str(food_root), img_size=16)
    assert dm.num_classes == 101 and dm.class_names == ["apple_pie", "sushi"]
    batch = dm.probe_batch(2)
    assert batch.images.shape == (2, 3, 16, 16) and batch.masks is None and batch.cue_masks is None
    pixels = unnormalize(batch.images, dm.mean, dm.std)
    for image, label in zip(pixels, batch.labels):
        colour = torch.tensor(COLOURS[dm.class_names[label]]) / 255
        assert torch.allclose(image[:, 8, 8], colour, atol=0.05)


def test_loaders(food_root):
    dm = Food101DataModule(root=str(food_root), img_size=16, batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (3, 3, 16, 16) and batch.masks is None
    assert sum(len(b) for b in dm.val_dataloader()) == 2


def test_missing_or_incomplete_directory(food_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)meta/train\.json.*download=True"):
        Food101DataModule(root=str(tmp_path / "nowhere")).setup("fit")
    (food_root / "food-101" / "images" / "sushi" / "3.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="sushi/3.jpg"):
        Food101DataModule(root=str(food_root)).setup("fit")
