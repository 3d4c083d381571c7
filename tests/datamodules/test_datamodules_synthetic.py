import json
import math

import pytest
import torch
from jsonargparse import ArgumentError, ArgumentParser

from caap_lightning.datamodules import CUE_KINDS, ProbeBatch, SyntheticSpuriousDataModule
from caap_lightning.datamodules.cues import BACKGROUND_BRIGHTNESS, CUE_COLOURS, WATERMARK_COLOUR
from caap_lightning.datamodules.synthetic import SHAPES
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


def test_the_default_marker_draws_what_it_drew_before_cue_kinds():
    """Samples of ``small()`` as the code before ``cue=`` drew them: label, cue class, marker corner, pixels."""
    train, val, _ = small().sources()
    known = [  # split, i, label, cue label, marker's top-left, object pixels, RGB at (16, 16), sum of all pixels
        (train, 0, 0, 0, (1, 27), 173, [164, 147, 161], 496500),
        (train, 1, 1, 1, (1, 1), 196, [43, 14, 40], 311004),
        (val, 0, 0, 2, (1, 27), 411, [234, 255, 255], 607017),
        (val, 1, 1, 0, (27, 27), 441, [255, 255, 235], 612113),
    ]
    for split, i, label, cue_label, corner, area, centre, total in known:
        s = split[i]
        assert (s["label"], s["cue_label"]) == (label, cue_label)
        ys, xs = torch.nonzero(s["cue_mask"], as_tuple=True)
        assert (int(ys.min()), int(xs.min())) == corner and int(s["cue_mask"].sum()) == 16
        assert int(s["mask"].sum()) == area
        assert s["image"][:, 16, 16].tolist() == centre and int(s["image"].sum()) == total
    assert small().cue == "marker"


def expected_cue_mask(cue: str, label: int, obj: torch.Tensor) -> torch.Tensor:
    """The naive picture of each fixed cue at 64 px, cue_size 8 (margin 2)."""
    mask = torch.zeros(64, 64, dtype=torch.bool)
    if cue == "border":
        mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = True, True, True, True
    elif cue == "watermark":
        glyphs = {0: ["111", "101", "101", "101", "111"], 1: ["010", "110", "010", "010", "111"],
                  2: ["111", "001", "111", "100", "111"], 3: ["111", "001", "111", "001", "111"]}
        for row, text in enumerate(glyphs[label]):
            for col, ch in enumerate(text):
                # Each font pixel is 2x2; the 6x10 glyph ends 2 pixels from the right and bottom edges.
                mask[52 + 2 * row : 54 + 2 * row, 56 + 2 * col : 58 + 2 * col] = ch == "1"
    else:
        mask = ~obj
    return mask


@pytest.mark.parametrize("cue", ["watermark", "border", "background"])
def test_fixed_cue_kinds_are_drawn_where_and_as_documented(cue):
    plain = small(img_size=64, cue_size=8, cue_correlation=None).sources()[0]
    cued = small(img_size=64, cue_size=8, cue=cue).sources()[0]
    brightened = 0
    for i in range(12):
        s, base = cued[i], plain[i]
        cue_mask, obj = s["cue_mask"].bool(), s["mask"].bool()
        assert torch.equal(cue_mask, expected_cue_mask(cue, s["cue_label"], obj))
        assert not (obj & cue_mask).any()
        # The same shape in the same place: the cue only covers some of it.
        assert torch.equal(obj | cue_mask, base["mask"].bool() | cue_mask)
        image, before = s["image"].float() / 255, base["image"].float() / 255
        changed = (image != before).any(0)
        if cue == "background":
            # The background's level is the cue colour at half brightness, its texture kept.
            assert changed[cue_mask].float().mean() > 0.9
            level = BACKGROUND_BRIGHTNESS * torch.tensor(CUE_COLOURS[s["cue_label"]])
            assert (image[:, cue_mask].mean(1) - level).abs().max() < 0.03
            # The shape is the bright side of the contrast on it: a shape drawn dark without the cue is redrawn bright.
            assert image[:, obj].mean() - image[:, cue_mask].mean() > 0.4
            if changed[obj].any():
                assert before[:, obj].mean() < before[:, ~obj].mean() and changed[obj].all()
                brightened += 1
        else:
            assert not (changed & ~cue_mask).any()
            paint = WATERMARK_COLOUR if cue == "watermark" else CUE_COLOURS[s["cue_label"]]
            assert (image[:, cue_mask] - torch.tensor(paint)[:, None]).abs().max() == 0
    assert (brightened > 0) == (cue == "background")


def test_every_cue_kind_keeps_the_label_correlation():
    n, p = 1200, 0.7
    for cue in CUE_KINDS:
        train, val, _ = small(img_size=16, num_train=n, num_val=n, cue_correlation=p, cue=cue).sources()
        match = sum(train[i]["cue_label"] == train[i]["label"] for i in range(n)) / n
        assert abs(match - p) < 4 * math.sqrt(p * (1 - p) / n), cue
        independent = sum(val[i]["cue_label"] == val[i]["label"] for i in range(n)) / n
        assert abs(independent - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n), cue


def test_a_watermark_is_never_flipped():
    dm = small(cue="watermark", cue_correlation=0.5)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        for cue_mask, cue_label in zip(batch.cue_masks, batch.cue_labels):
            # Margin 1 at cue_size 4: the 3x5 digit in rows 26-30, columns 28-30.
            assert not cue_mask[:26].any() and not cue_mask[:, :28].any() and cue_mask[30, 28:31].all()
            assert int(cue_mask.sum()) == {0: 12, 1: 8, 2: 11, 3: 11}[int(cue_label)]


def test_yaml_sets_the_cue_kind():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SyntheticSpuriousDataModule, "data")
    config = parser.parse_string(json.dumps({"data": {"cue": "border", "cue_correlation": 0.8}}))
    data = parser.instantiate_classes(config).data
    assert (data.cue, data.cue_correlation) == ("border", 0.8)
    with pytest.raises(ArgumentError, match="data.cue"):
        parser.parse_string(json.dumps({"data": {"cue": "stripes"}}))


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
        (dict(cue="stripes"), "cue must be one of"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small(**kwargs)


def test_probe_batch_is_a_prefix_of_a_larger_one_and_stops_at_the_validation_set():
    data = small()
    with pytest.raises(ValueError, match="n >= 1"):
        data.probe_batch(0)
    whole, few = data.probe_batch(33), data.probe_batch(5)
    assert len(whole) == 32  # the validation set
    torch.testing.assert_close(few.images, whole.images[:5])
    torch.testing.assert_close(few.labels, whole.labels[:5])
