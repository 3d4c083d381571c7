"""CocoMaskDataModule on a COCO JSON fixture with polygon, uncompressed and compressed RLE instances."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from caap_lightning.datamodules import CocoMaskDataModule

W, H = 40, 30


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"counts": np.diff(np.concatenate([[0], changes])).tolist(), "size": [H, W]}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": rle["size"]}


def polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture
def coco_files(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(images / name)
    dog = np.zeros((H, W), bool)
    dog[:, 25:35] = True
    bird = np.zeros((H, W), bool)
    bird[10:20, 15:25] = True
    anns = [
        dict(id=1, image_id=1, category_id=1, segmentation=polygon(10, 5, 20, 25), area=200.0, bbox=[10, 5, 10, 20], iscrowd=0),
        dict(id=2, image_id=2, category_id=2, segmentation=uncompressed_rle(dog), area=300.0, bbox=[25, 0, 10, 30], iscrowd=1),
        dict(id=3, image_id=2, category_id=2, segmentation=polygon(5, 5, 10, 10), area=25.0, bbox=[5, 5, 5, 5], iscrowd=0),
        dict(id=4, image_id=2, category_id=1, segmentation=polygon(12, 20, 16, 24), area=16.0, bbox=[12, 20, 4, 4], iscrowd=0),
        dict(id=5, image_id=3, category_id=7, segmentation=compressed_rle(bird), area=100.0, bbox=[15, 10, 10, 10], iscrowd=1),
    ]
    coco = {
        "images": [dict(id=i, file_name=n, width=W, height=H) for i, n in enumerate(("a.png", "b.png", "c.png"), start=1)],
        "annotations": anns,
        "categories": [dict(id=1, name="cat"), dict(id=2, name="dog"), dict(id=7, name="bird")],
    }
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(coco))
    return str(images), str(annotations)


def make(coco_files, **kwargs):
    images, annotations = coco_files
    return CocoMaskDataModule(images, annotations, images, annotations, img_size=H, batch_size=2, **kwargs)


def test_labels_masks_and_skipped_images(coco_files):
    dm = make(coco_files, categories=["dog", "cat"])
    with pytest.warns(UserWarning, match=r"1 of 3 images.*c\.png"):
        dm.setup("fit")
    assert dm.num_classes == 2 and dm.class_names == ["dog", "cat"]
    assert dm.skipped_images == {"train": ["c.png"], "val": ["c.png"]}
    batch = next(iter(dm.val_dataloader()))
    assert batch.labels.tolist() == [1, 0]  # a.png: cat; b.png: dog (largest area beats the small cat)
    # Resize keeps 40x30; the centre crop 30 starts at x = 5.
    cat, dog = batch.masks
    assert cat[15, 15 - 5] and not cat[15, 30 - 5] and not cat[2, 15 - 5]
    assert dog[:, 26 - 5 : 34 - 5].all() and dog[7, 7 - 5]  # RLE instance and polygon instance
    assert not dog[22, 14 - 5]  # the cat instance on the dog image is not in the dog mask
    assert int(cat.sum()) == pytest.approx(200, abs=40)


def test_all_categories_by_id(coco_files):
    dm = make(coco_files)
    dm.setup("fit")
    assert dm.class_names == ["cat", "dog", "bird"] and dm.skipped_images["train"] == []
    batch = next(iter(dm.val_dataloader()))
    assert batch.labels.tolist() == [0, 1] and sorted(dm.probe_batch(3).labels.tolist()) == [0, 1, 2]
    bird = dm.val_dataloader().dataset[2]
    assert bird["label"] == 2 and int(bird["mask"].sum()) == 100 and bird["mask"][15, 20 - 5]


def test_unknown_category_and_missing_files(coco_files, tmp_path):
    with pytest.raises(ValueError, match="horse"):
        make(coco_files, categories=["horse"]).setup("fit")
    images, _ = coco_files
    missing = str(tmp_path / "none.json")
    with pytest.raises(FileNotFoundError, match="none.json"):
        CocoMaskDataModule(images, missing, images, missing).setup("fit")


def rewrite_annotations(coco_files, change):
    _, annotations = coco_files
    with open(annotations) as f:
        coco = json.load(f)
    change(coco)
    with open(annotations, "w") as f:
        json.dump(coco, f)


def test_truncated_annotation_file_is_named(coco_files):
    _, annotations = coco_files
    with open(annotations) as f:
        text = f.read()
    with open(annotations, "w") as f:
        f.write(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"instances\.json.*not valid JSON"):
        make(coco_files).setup("fit")


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (lambda rle: {**rle, "counts": rle["counts"][: len(rle["counts"]) // 2]}, r"runs cover \d+ pixels, not 30x40"),
        (lambda rle: {**rle, "counts": rle["counts"] + "Z"}, "do not decode"),
        (lambda rle: {**rle, "size": [H, W + 1]}, r"size \[30, 41\] is not the image's \[30, 40\]"),
    ],
    ids=["truncated", "dangling", "size"],
)
def test_corrupt_compressed_rle_is_named(coco_files, corrupt, problem):
    # pycocotools would decode these without an error, into a wrong mask or past its end.
    def corrupt_bird(coco):
        bird = coco["annotations"][4]
        bird["segmentation"] = corrupt(bird["segmentation"])

    rewrite_annotations(coco_files, corrupt_bird)
    with pytest.raises(ValueError, match=rf"annotation 5 \(image 3, c\.png\) in .*instances\.json.*{problem}"):
        make(coco_files).setup("fit")


def test_corrupt_uncompressed_rle_is_named(coco_files):
    rewrite_annotations(coco_files, lambda coco: coco["annotations"][1]["segmentation"]["counts"].append(7))
    with pytest.raises(ValueError, match=r"annotation 2 \(image 2, b\.png\).*runs cover 1207 pixels"):
        make(coco_files, categories=["dog", "cat"]).setup("fit")


def test_broken_polygon_is_named_where_pycocotools_fails(coco_files):
    def short_polygon_without_area(coco):
        coco["annotations"][0].update(segmentation=[[10, 5, 20]])
        del coco["annotations"][0]["area"]

    rewrite_annotations(coco_files, short_polygon_without_area)
    with pytest.raises(ValueError, match=r"annotation 1 \(image 1, a\.png\).*cannot read"):
        make(coco_files).setup("fit")


def test_corrupt_image_is_named_at_setup(coco_files):
    images, _ = coco_files
    with open(f"{images}/b.png", "r+b") as f:
        f.truncate(60)  # the header survives, the pixel data does not
    with pytest.raises(ValueError, match=r"b\.png.*truncated"):
        make(coco_files).setup("fit")  # the validation split is the probe's: every file of it is probed here


def test_annotations_without_images_are_named(coco_files):
    rewrite_annotations(coco_files, lambda coco: coco.update(images=[], annotations=[]))
    dm = make(coco_files)
    with pytest.raises(ValueError, match=r"instances\.json gives no image to classify: it lists 0 images"):
        dm.setup("fit")
        dm.probe_batch(4)  # where the empty set used to fail, with torch.stack's message
