"""OxfordPetDataModule on a tiny fixture in the exact layout torchvision's OxfordIIITPet reads."""

import numpy as np
import pytest
import torch
from PIL import Image

from caap_lightning.datamodules import OxfordPetDataModule, ProbeBatch
from caap_lightning.utils import unnormalize

W, H = 48, 32  # landscape, so the eval centre crop is exercised
SPLITS = {
    "trainval": [("Abyssinian_1", 1, 1), ("Abyssinian_2", 1, 1), ("american_bulldog_1", 2, 2), ("american_bulldog_2", 2, 2)],
    "test": [("Abyssinian_3", 1, 1), ("american_bulldog_3", 2, 2)],
}


def write_pet(root):
    """Pet on the left half (red), background on the right (blue), border (3) between them."""
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations" / "trimaps").mkdir(parents=True)
    image = np.zeros((H, W, 3), np.uint8)
    image[:, : W // 2] = (230, 20, 20)
    image[:, W // 2 :] = (20, 20, 230)
    trimap = np.full((H, W), 2, np.uint8)
    trimap[:, : W // 2 - 1] = 1
    trimap[:, W // 2 - 1] = 3
    for split, rows in SPLITS.items():
        lines = []
        for image_id, breed, species in rows:
            Image.fromarray(image).save(base / "images" / f"{image_id}.jpg", quality=95)
            Image.fromarray(trimap).save(base / "annotations" / "trimaps" / f"{image_id}.png")
            lines.append(f"{image_id} {breed} {species} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def pet_root(tmp_path):
    return write_pet(tmp_path)


def test_probe_masks_line_up_with_images(pet_root):
    dm = OxfordPetDataModule(root=str(pet_root), img_size=16, batch_size=2)
    batch = dm.probe_batch(2)
    assert isinstance(batch, ProbeBatch) and batch.images.shape == (2, 3, 16, 16)
    assert batch.masks.shape == (2, 16, 16) and batch.masks.dtype == torch.bool
    assert batch.cue_masks is None and batch.cue_labels is None
    # Resize 48x32 -> 24x16 and centre crop 16 (x in [4, 20)): the pet (original x < 24) fills crop columns < 8.
    assert batch.masks[:, :, :8].all() and not batch.masks[:, :, 8:].any()
    pixels = unnormalize(batch.images, dm.mean, dm.std)
    assert (pixels[:, 0, 8, 2] > 0.7).all() and (pixels[:, 2, 8, 2] < 0.3).all()
    assert (pixels[:, 2, 8, 14] > 0.7).all() and (pixels[:, 0, 8, 14] < 0.3).all()
    assert sorted(batch.labels.tolist()) == [0, 1]
    assert torch.equal(dm.probe_batch(2).images, batch.images)


def test_breeds_and_species(pet_root):
    breeds = OxfordPetDataModule(root=str(pet_root))
    assert breeds.num_classes == 37 and breeds.class_names == ["Abyssinian", "American Bulldog"]
    species = OxfordPetDataModule(root=str(pet_root), label_type="species", img_size=16)
    assert species.num_classes == 2 and species.class_names == ["Cat", "Dog"]
    assert sorted(species.probe_batch(2).labels.tolist()) == [0, 1]


def test_train_crops_keep_masks_aligned(pet_root):
    torch.manual_seed(0)
    dm = OxfordPetDataModule(root=str(pet_root), img_size=16, batch_size=4)
    dm.setup("fit")
    for _ in range(3):
        batch = next(iter(dm.train_dataloader()))
        red = unnormalize(batch.images, dm.mean, dm.std)[:, 0] > 0.5
        assert (red == batch.masks).float().mean() > 0.9
    assert len(dm.val_dataloader().dataset) == len(dm.test_dataloader().dataset) == 2


def test_missing_directory_names_layout_and_download(tmp_path):
    dm = OxfordPetDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"(?s)trainval\.txt.*trimaps.*download=True"):
        dm.setup("fit")


def test_incomplete_directory_names_missing_file(pet_root):
    (pet_root / "oxford-iiit-pet" / "annotations" / "trimaps" / "Abyssinian_3.png").unlink()
    with pytest.raises(FileNotFoundError, match="Abyssinian_3.png"):
        OxfordPetDataModule(root=str(pet_root)).probe_batch(1)


def test_rejects_unknown_label_type():
    with pytest.raises(ValueError, match="label_type"):
        OxfordPetDataModule(label_type="colour")


def test_download_happens_in_prepare_data(tmp_path, monkeypatch):
    """Lightning calls prepare_data on one process before any setup: the download belongs there."""
    from torchvision.datasets import OxfordIIITPet

    downloads = []

    def fake_download(self):  # torchvision's step that fetches and unpacks, unless the files are there
        if not (tmp_path / "oxford-iiit-pet").exists():
            downloads.append(str(self.root))
            write_pet(tmp_path)

    monkeypatch.setattr(OxfordIIITPet, "_download", fake_download)
    data = OxfordPetDataModule(root=str(tmp_path), download=True, img_size=32, batch_size=2)
    data.prepare_data()
    assert len(downloads) == 1 and (tmp_path / "oxford-iiit-pet" / "annotations" / "trainval.txt").exists()
    data.setup("fit")
    assert len(downloads) == 1  # setup (on every rank) finds the files and fetches nothing
    assert len(data.train_dataloader().dataset) == len(SPLITS["trainval"])


def save_truncated_jpeg(path, size=(W, H)):
    """A JPEG whose header is whole but whose pixel data stops halfway (as an interrupted copy leaves it)."""
    noise = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])


def test_trimap_of_another_size_fails_at_setup_naming_it(pet_root):
    # A training image: setup checks every trimap's size from the headers, not only the probe's.
    trimap = pet_root / "oxford-iiit-pet" / "annotations" / "trimaps" / "american_bulldog_2.png"
    Image.fromarray(np.full((H + 4, W), 1, np.uint8)).save(trimap)
    with pytest.raises(ValueError, match=rf"american_bulldog_2\.png is {W}x{H + 4} but american_bulldog_2\.jpg is {W}x{H}"):
        OxfordPetDataModule(root=str(pet_root), img_size=16).setup("fit")


@pytest.mark.parametrize("image_id", ["Abyssinian_3", "Abyssinian_1"], ids=["probe", "train"])
def test_trimap_with_other_values_is_rejected_naming_file_and_values(pet_root, image_id):
    trimap = np.full((H, W), 255, np.uint8)
    trimap[:, : W // 2] = 0  # a binary mask saved as 0/255: no 2, so it would all count as pet
    Image.fromarray(trimap).save(pet_root / "oxford-iiit-pet" / "annotations" / "trimaps" / f"{image_id}.png")
    dm = OxfordPetDataModule(root=str(pet_root), img_size=16, batch_size=4)
    match = rf"{image_id}\.png.*\[0, 255\]"
    if image_id == "Abyssinian_3":  # a probe file: setup reads it
        with pytest.raises(ValueError, match=match):
            dm.setup("fit")
    else:
        dm.setup("fit")
        with pytest.raises(ValueError, match=match):
            next(iter(dm.train_dataloader()))


def test_truncated_image_is_named_at_setup_when_probed_and_mid_epoch_otherwise(pet_root):
    images = pet_root / "oxford-iiit-pet" / "images"
    save_truncated_jpeg(images / "Abyssinian_2.jpg")
    dm = OxfordPetDataModule(root=str(pet_root), img_size=16, batch_size=4)
    dm.setup("fit")  # a training image: not read at setup
    with pytest.raises(ValueError, match=r"Abyssinian_2\.jpg.*truncated"):
        list(dm.train_dataloader())
    save_truncated_jpeg(images / "american_bulldog_3.jpg")
    with pytest.raises(ValueError, match=r"american_bulldog_3\.jpg.*truncated"):
        OxfordPetDataModule(root=str(pet_root), img_size=16).setup("fit")
