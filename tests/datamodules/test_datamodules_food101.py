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


def drop_class_from_test(food_root, name="apple_pie"):
    path = food_root / "food-101" / "meta" / "test.json"
    listing = json.loads(path.read_text())
    del listing[name]
    path.write_text(json.dumps(listing))


def sushi_labels(source):
    """Labels of a split's sushi images (the green ones)."""
    samples = [source[i] for i in range(len(source))]
    return [s["label"] for s in samples if np.asarray(s["image"])[0, 0, 1] > 128]


@pytest.mark.parametrize("classes_txt", [None, ["sushi", "apple_pie", "ramen"]], ids=["union", "classes.txt"])
def test_a_class_has_one_label_in_every_split(food_root, classes_txt):
    drop_class_from_test(food_root)  # test.json lacks apple_pie: sushi must not become class 0 there
    if classes_txt is not None:
        (food_root / "food-101" / "meta" / "classes.txt").write_text("\n".join(classes_txt) + "\n")
    dm = Food101DataModule(root=str(food_root), img_size=16)
    dm.setup("fit")
    expected = dm.class_names.index("sushi")
    assert dm.class_names == (classes_txt or ["apple_pie", "sushi"]) and expected == (0 if classes_txt else 1)
    train, test, _ = dm.sources()
    assert sushi_labels(train) == [expected, expected] and sushi_labels(test) == [expected] and len(test) == 1


def test_classes_txt_lacking_a_listed_class_is_named(food_root):
    (food_root / "food-101" / "meta" / "classes.txt").write_text("sushi\n")
    with pytest.raises(ValueError, match=r"\['apple_pie'\].*classes\.txt"):
        Food101DataModule(root=str(food_root)).setup("fit")


def test_truncated_listing_is_named(food_root):
    path = food_root / "food-101" / "meta" / "train.json"
    path.write_text(path.read_text()[:-7])
    with pytest.raises(ValueError, match=r"train\.json.*not valid JSON"):
        Food101DataModule(root=str(food_root)).setup("fit")


def test_corrupt_image_is_named(food_root):
    (food_root / "food-101" / "images" / "sushi" / "1.jpg").write_bytes(b"not a jpeg")
    dm = Food101DataModule(root=str(food_root), img_size=16, batch_size=4)
    dm.setup("fit")  # a training image: not a probe file
    with pytest.raises(ValueError, match=r"sushi/1\.jpg"):
        list(dm.train_dataloader())
    (food_root / "food-101" / "images" / "sushi" / "3.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"sushi/3\.jpg"):
        Food101DataModule(root=str(food_root), img_size=16).setup("fit")
