import math

import pytest
import torch

from caap_lightning.datamodules import ProbeBatch, SyntheticSpuriousDataModule
from caap_lightning.datamodules.synthetic import CUE_COLOURS, SHAPES
from caap_lightning.utils import unnormalize


def small(**kwargs) -> SyntheticSpuriousDataModule:
    cfg = dict(num_classes=4, img_size=32, cue_size=4, num_train=64, num_val=32, num_test=16, batch_size=16)
    cfg.update(kwargs)
    return SyntheticSpuriousDataModule(**cfg)


def test_probe_batch_fields_and_shapes():
    dm = small()
    batch = dm.probe_batch(8)
    assert isinstance(batch, ProbeBatch) and len(batch) == 8
    assert batch.images.shape == (8, 3, 32, 32) and batch.images.dtype == torch.float32
    assert batch.labels.dtype == torch.long and batch.cue_labels.dtype == torch.long
    assert batch.masks.shape == batch.cue_masks.shape == (8, 32, 32)
    assert batch.masks.dtype == batch.cue_masks.dtype == torch.bool
    assert batch.masks.flatten(1).any(1).all() and batch.cue_masks.flatten(1).any(1).all()
    assert not (batch.masks & batch.cue_masks).any()
    assert dm.class_names == list(SHAPES[:4]) and dm.num_classes == 4
    moved = batch.to("meta")
    assert moved.images.device.type == "meta" and moved.cue_labels.device.type == "meta"


def test_deterministic_by_seed():
    a, b, c = small(seed=3), small(seed=3), small(seed=4)
    pa, pb, pc = a.probe_batch(8), b.probe_batch(8), c.probe_batch(8)
    assert torch.equal(pa.images, pb.images) and torch.equal(pa.masks, pb.masks)
    assert torch.equal(pa.images, a.probe_batch(8).images)
    assert not torch.equal(pa.images, pc.images)
    # A shorter probe batch is the start of a longer one.
    assert torch.equal(a.probe_batch(4).images, pa.images[:4])


def test_masks_align_with_pixels_after_flips():
    dm = small(cue_correlation=0.5)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    pixels = unnormalize(batch.images, dm.mean, dm.std)
    for img, mask, cue, cue_label in zip(pixels, batch.masks, batch.cue_masks, batch.cue_labels):
        inside = img[:, mask]
        # The shape is one flat colour; every cue pixel is the cue's class colour.
        assert (inside - inside[:, :1]).abs().max() < 1e-5
        assert torch.allclose(img[:, cue], torch.tensor(CUE_COLOURS[cue_label])[:, None].expand(-1, int(cue.sum())), atol=1e-5)
        # The 1-pixel ring just outside the shape is background, not shape colour.
        ring = torch.nn.functional.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0].bool() & ~mask & ~cue
        assert ((img[:, ring] - inside[:, :1]).abs().sum(0) > 1e-3).float().mean() > 0.9


def test_train_cue_correlation_is_what_was_asked():
    n, p = 2000, 0.7
    dm = small(num_train=n, cue_correlation=p)
    train, _, _ = dm.sources()
    match = sum(train[i]["cue_label"] == train[i]["label"] for i in range(n)) / n
    assert abs(match - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_validation_cue_is_independent_of_label():
    n, k = 2000, 4
    dm = small(num_val=n, cue_correlation=1.0)
    _, val, _ = dm.sources()
    table = torch.zeros(k, k)
    for i in range(n):
        s = val[i]
        table[s["label"], s["cue_label"]] += 1
    expected = n / k**2
    chi2 = float(((table - expected) ** 2 / expected).sum())
    assert chi2 < 30.6  # chi-square, 9 degrees of freedom, p = 0.0003
    probe = dm.probe_batch(64)
    assert 0 < (probe.cue_labels == probe.labels).float().mean() < 0.6


def test_no_cue():
    batch = small(cue_correlation=None).probe_batch(4)
    assert batch.cue_masks is None and batch.cue_labels is None and batch.masks is not None


def test_loaders_yield_probe_batches():
    dm = small()
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 4 and all(isinstance(b, ProbeBatch) for b in train)
    assert sum(len(b) for b in dm.val_dataloader()) == 32
    assert sum(len(b) for b in dm.test_dataloader()) == 16


def test_custom_normalisation():
    dm = small(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    images = dm.probe_batch(4).images
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.min() < -0.2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_classes=1), r"num_classes must be in \[2, 6\]"),
        (dict(num_classes=7), r"num_classes must be in \[2, 6\]"),
        (dict(cue_correlation=1.5), "cue_correlation must be in"),
        (dict(object_size=(0.9, 0.5)), "object_size must be"),
        (dict(cue_size=20), "cue_size must be in"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small(**kwargs)


def test_probe_batch_size_is_checked():
    with pytest.raises(ValueError, match="n <= 32"):
        small().probe_batch(33)
