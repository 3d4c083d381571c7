import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser

from caap_lightning.datamodules import ProbeBatch
from caap_lightning.datamodules import fashion
from caap_lightning.datamodules.cues import CUE_COLOURS, WATERMARK_COLOUR
from caap_lightning.datamodules.fashion import IDX_FILES, FashionCanvasDataModule
from caap_lightning.utils import unnormalize

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
]
CUE_KINDS = ("marker", "watermark", "border", "background")
GARMENT_VALUE = 200  # fixture garments are flat ellipses this bright on black, as Fashion-MNIST's are light on black


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """``array`` (uint8) in the IDX format: magic 2051 for images, 2049 for labels, big-endian sizes."""
    magic = 2049 if array.ndim == 1 else 2051
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def fixture_garments(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28] + 0.5
    images = np.zeros((n, 28, 28), np.uint8)
    for k in range(n):
        cy, cx = rng.uniform(11, 17, 2)
        ry, rx = rng.uniform(6, 11, 2)
        images[k][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = GARMENT_VALUE
    return images


def write_fixture(folder: Path, gz: bool, num_train: int = 40, num_test: int = 20) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    arrays = {
        "train-images-idx3-ubyte": fixture_garments(num_train, 0),
        "train-labels-idx1-ubyte": np.arange(num_train) % 10,
        "t10k-images-idx3-ubyte": fixture_garments(num_test, 1),
        "t10k-labels-idx1-ubyte": np.arange(num_test) % 10,
    }
    for name, array in arrays.items():
        write_idx(folder / f"{name}{suffix}", array, gz)


@pytest.fixture
def debian_dir(tmp_path, monkeypatch) -> Path:
    """A stand-in for the Debian package's directory (empty until a test writes there)."""
    folder = tmp_path / "debian"
    monkeypatch.setattr(fashion, "DEBIAN_DIR", folder)
    return folder


@pytest.fixture
def root(tmp_path, debian_dir) -> str:
    """A data root that finds the fixture where Debian's package puts Fashion-MNIST: gzip'd."""
    write_fixture(debian_dir, gz=True)
    return str(tmp_path / "data")


def small(root: str, **kwargs) -> FashionCanvasDataModule:
    return FashionCanvasDataModule(root=root, **{"batch_size": 8, **kwargs})


def pixels(sample) -> torch.Tensor:
    return sample["image"].float() / 255


@pytest.mark.parametrize("layout", ["debian-gz", "root-gz", "root-plain", "raw-plain"])
def test_finds_idx_files_and_unpacks_them_for_torchvision(tmp_path, debian_dir, layout):
    root = tmp_path / "data"
    where = {"debian-gz": debian_dir, "root-gz": root, "root-plain": root, "raw-plain": root / "FashionMNIST" / "raw"}
    write_fixture(where[layout], gz=layout.endswith("gz"))
    dm = small(str(root))
    dm.prepare_data()
    assert all((root / "FashionMNIST" / "raw" / name).is_file() for name in IDX_FILES)
    train, val, test = dm.sources()
    assert (len(train), len(val), len(test)) == (40, 10, 10)
    assert dm.class_names == FASHION_CLASSES and dm.num_classes == 10


def test_missing_files_say_how_to_get_them(tmp_path, debian_dir):
    dm = small(str(tmp_path / "data"))
    for step in (dm.prepare_data, lambda: dm.probe_batch(4)):
        with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*FashionMNIST/raw") as info:
            step()
        assert "train-images-idx3-ubyte" in str(info.value) and "Nothing is downloaded" in str(info.value)


def test_probe_batch_fields_and_shapes(root):
    batch = small(root, cue="marker").probe_batch(8)
    assert isinstance(batch, ProbeBatch) and len(batch) == 8
    assert batch.images.shape == (8, 3, 64, 64) and batch.images.dtype == torch.float32
    assert batch.labels.dtype == batch.cue_labels.dtype == torch.long
    assert batch.masks.shape == batch.cue_masks.shape == (8, 64, 64)
    assert batch.masks.dtype == batch.cue_masks.dtype == torch.bool
    assert batch.masks.flatten(1).any(1).all() and batch.cue_masks.flatten(1).any(1).all()
    plain = small(root).probe_batch(4)
    assert plain.cue_masks is None and plain.cue_labels is None and plain.masks is not None


def test_masks_are_the_bright_pasted_garment(root):
    dm = small(root, mask_threshold=0.1)
    batch = dm.probe_batch(10)
    images = unnormalize(batch.images, dm.mean, dm.std)
    assert (images - images[:, :1]).abs().max() < 1e-5  # grey garments on a grey canvas
    grey = images[:, 0]
    for img, mask in zip(grey, batch.masks):
        assert (img[mask] >= 0.1 - 1 / 255).all()  # mask: the pasted garment above the threshold
        assert (img[~mask] < 0.4).all()  # elsewhere: the dark canvas
        assert (img[mask] > 0.5).float().mean() > 0.8  # the flat fixture garment, bright but for its resized rim
        assert mask.sum() > 30


def test_placement_varies_and_is_deterministic(root):
    def boxes(batch):
        out = []
        for mask in batch.masks:
            ys, xs = torch.nonzero(mask, as_tuple=True)
            out.append((int(ys.min()), int(xs.min()), int(ys.max()) - int(ys.min())))
        return out

    a, b, other = small(root, cue="border"), small(root, cue="border"), small(root, cue="border", seed=1)
    pa = a.probe_batch(10)
    pb = b.probe_batch(10)
    assert torch.equal(pa.images, pb.images) and torch.equal(pa.masks, pb.masks)
    assert torch.equal(pa.cue_labels, pb.cue_labels) and torch.equal(pa.cue_masks, pb.cue_masks)
    assert not torch.equal(pa.images, other.probe_batch(10).images)
    placed = boxes(pa)
    assert len({(y, x) for y, x, _ in placed}) >= 8 and len({size for _, _, size in placed}) >= 5
    # The same garment, shown twice in a longer split, is placed anew.
    train = small(root, num_train=80).sources()[0]
    assert train[3]["label"] == train[43]["label"] and not torch.equal(train[3]["mask"], train[43]["mask"])
    assert torch.equal(train[3]["image"], small(root, num_train=80).sources()[0][3]["image"])


@pytest.mark.parametrize("cue", CUE_KINDS)
def test_cue_masks_cover_the_drawn_cue(root, cue):
    plain = small(root).sources()[0]
    cued = small(root, cue=cue, cue_size=8).sources()[0]
    glyphs = {}
    for i in range(len(cued)):
        s, base = cued[i], plain[i]
        cue_mask, label = s["cue_mask"].bool(), s["cue_label"]
        drawn = (pixels(s) != pixels(base)).any(0)
        assert cue_mask.any() and not (drawn & ~cue_mask).any()  # every changed pixel is in the cue mask
        assert not (s["mask"].bool() & cue_mask).any()
        assert torch.equal(s["mask"].bool() | cue_mask, base["mask"].bool() | cue_mask)  # same garment, same place
        if cue == "background":
            assert torch.equal(cue_mask, ~s["mask"].bool())
            assert (pixels(s)[:, cue_mask].mean(1) - 0.5 * torch.tensor(CUE_COLOURS[label])).abs().max() < 0.03
            continue
        paint = WATERMARK_COLOUR if cue == "watermark" else CUE_COLOURS[label]
        inside = pixels(s)[:, cue_mask]
        assert (inside - torch.tensor(paint)[:, None]).abs().max() <= 1 / 255  # the colour, to uint8 rounding
        if cue == "marker":
            ys, xs = torch.nonzero(cue_mask, as_tuple=True)
            assert int(cue_mask.sum()) == 64 and int(ys.max() - ys.min()) == int(xs.max() - xs.min()) == 7
        if cue == "border":
            frame = torch.ones(64, 64, dtype=torch.bool)
            frame[2:-2, 2:-2] = False
            assert torch.equal(cue_mask, frame)
        if cue == "watermark":
            assert not cue_mask[:50].any() and not cue_mask[:, :54].any() and cue_mask[-2:].sum() == 0
            assert torch.equal(glyphs.setdefault(label, cue_mask), cue_mask)  # one glyph per class, in one place
    if cue == "watermark":
        assert len(glyphs) >= 5 and len({tuple(m.flatten().tolist()) for m in glyphs.values()}) == len(glyphs)


def test_the_marker_draws_what_it_drew_before_the_shared_cue_module(root):
    """Fixture canvases as the code before ``cues.py`` drew them: label, cue class, marker corner, pixels."""
    train, val, _ = small(root, cue="marker").sources()
    known = [  # split, i, label, cue label, marker's top-left, garment pixels, sum of all pixels
        (train, 0, 0, 0, (2, 2), 305, 341733),
        (train, 1, 1, 1, (54, 54), 519, 744360),
        (val, 0, 0, 6, (54, 54), 746, 956006),
        (val, 1, 1, 1, (2, 54), 807, 685803),
    ]
    for split, i, label, cue_label, corner, area, total in known:
        s = split[i]
        ys, xs = torch.nonzero(s["cue_mask"], as_tuple=True)
        assert (s["label"], s["cue_label"], (int(ys.min()), int(xs.min()))) == (label, cue_label, corner)
        assert int(s["mask"].sum()) == area and int(s["image"].sum()) == total


def test_classes_keeps_some_garments_and_relabels_them(root):
    dm = small(root, classes=[1, 8, 7, 6], cue="border", cue_correlation=1.0)
    train, val, test = dm.sources()
    assert dm.num_classes == 4 and dm.class_names == ["Trouser", "Bag", "Sneaker", "Shirt"]
    # The fixture's garment j has label j % 10: the kept ones are 1, 6, 7, 8, 11, ... in file order.
    assert (len(train), len(val), len(test)) == (16, 4, 4)
    assert [train[i]["label"] for i in range(8)] == [0, 3, 2, 1, 0, 3, 2, 1]
    assert all(train[i]["cue_label"] == train[i]["label"] for i in range(16))
    assert {val[i]["cue_label"] for i in range(4)} <= set(range(4))


def test_classes_sets_the_validation_cue_chance(root):
    n = 400
    val = small(root, classes=[1, 8, 7, 6], cue="watermark", cue_correlation=1.0, num_val=n).sources()[1]
    match = sum(val[i]["cue_label"] == val[i]["label"] for i in range(n)) / n
    assert abs(match - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    assert {val[i]["cue_label"] for i in range(n)} == {0, 1, 2, 3}


def test_cache_keeps_the_canvases_it_draws(root):
    drawn = small(root, cue="marker").sources()[0]
    cached = small(root, cue="marker", cache=True).sources()[0]
    for i in (0, 7, 39):
        first, again = cached[i], cached[i]
        assert all(torch.equal(first[k], drawn[i][k]) for k in ("image", "mask", "cue_mask"))
        assert first["image"] is again["image"]  # kept, not drawn again
        first["label"] = -1
        assert cached[i]["label"] == drawn[i]["label"]  # each read gets its own dict
    assert sorted(cached._drawn) == [0, 7, 39]


def test_train_cue_correlation_is_what_was_asked(root):
    n, p = 400, 0.7  # samples repeat the 40 fixture garments
    train = small(root, cue="watermark", cue_correlation=p, num_train=n).sources()[0]
    match = sum(train[i]["cue_label"] == train[i]["label"] for i in range(n)) / n
    assert abs(match - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_validation_and_test_cue_are_independent_of_label(root):
    n = 400
    _, val, test = small(root, cue="marker", cue_correlation=1.0, num_val=n, num_test=n).sources()
    for split in (val, test):
        pairs = [(split[i]["label"], split[i]["cue_label"]) for i in range(n)]
        match = sum(label == cue for label, cue in pairs) / n
        assert abs(match - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)
        assert len({cue for _, cue in pairs}) == 10


def test_loaders_yield_probe_batches(root):
    dm = small(root, cue="background")
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 5 and all(isinstance(b, ProbeBatch) and b.cue_masks is not None for b in train)
    assert sum(len(b) for b in dm.val_dataloader()) == 10 and sum(len(b) for b in dm.test_dataloader()) == 10


def test_probe_batch_runs_through_a_tiny_vit(root, vit_factory):
    batch = small(root, cue="marker").probe_batch(4)
    with torch.no_grad():
        logits = vit_factory(img_size=64, num_classes=10)(batch.images)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()


def test_yaml_configures_datamodule():
    args = dict(
        root="/data", cue="watermark", cue_correlation=0.8, object_size=[0.5, 0.7], num_train=1000, std=[0.5, 0.5, 0.5]
    )
    parser = ArgumentParser()
    parser.add_class_arguments(FashionCanvasDataModule, "data")
    data = parser.instantiate_classes(parser.parse_string(json.dumps({"data": args}))).data
    for key, value in args.items():
        actual = getattr(data, key)
        assert (list(actual) if isinstance(actual, tuple) else actual) == value, key


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cue="stripes"), "cue must be one of"),
        (dict(cue_correlation=1.5), "cue_correlation must be in"),
        (dict(object_size=(0.9, 0.5)), "object_size must be"),
        (dict(cue_size=30), "cue_size must be in"),
        (dict(mask_threshold=1.0), "mask_threshold must be in"),
        (dict(num_val=0), "must be positive or None"),
        (dict(classes=[3]), "classes must be 2 or more distinct"),
        (dict(classes=[1, 1]), "classes must be 2 or more distinct"),
        (dict(classes=[0, 10]), "classes must be 2 or more distinct"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FashionCanvasDataModule(**kwargs)


REAL = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not all((REAL / f"{name}.gz").is_file() for name in IDX_FILES),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    dm = FashionCanvasDataModule(root=str(tmp_path), cue="border")
    batch = dm.probe_batch(8)
    assert len(dm.sources()[0]) == 60000 and len(dm.sources()[1]) == len(dm.sources()[2]) == 5000
    assert batch.images.shape == (8, 3, 64, 64) and set(batch.labels.tolist()) <= set(range(10))
    share = batch.masks.float().mean((1, 2))
    assert (share > 0.02).all() and (share < 0.7).all()
