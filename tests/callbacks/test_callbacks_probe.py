"""The probe batch from any batch form, a Dataset or the run's raw eval dataloader; its checks and normalisation."""

from __future__ import annotations

import random
import warnings
from typing import Dict, List, Optional

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from caap_lightning.callbacks.normalization import check_pixel_range, resolve_normalization
from caap_lightning.callbacks.probe import (
    UNKNOWN_LABEL,
    ProbeKeys,
    check_probe,
    probe_from_dataset,
    probe_from_loader,
    read_probe,
    seeded_order,
    to_probe_batch,
)
from caap_lightning.callbacks.probe_source import raw_eval_loader
from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.datamodules.base import ProbeBatch, collate_samples
from caap_lightning.utils import IMAGENET_MEAN, IMAGENET_STD, normalize

SIZE = 8


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    """ImageNet-normalised random images ``(n, 3, SIZE, SIZE)``."""
    pixels = torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)


def masks(n: int = 4) -> torch.Tensor:
    out = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    out[:, 2:6, 2:6] = True
    return out


# ------------------------------------------------------------------ to_probe_batch
def test_image_tensor_gets_unknown_labels():
    probe = to_probe_batch(images(3))
    assert probe.labels.tolist() == [UNKNOWN_LABEL] * 3 and probe.labels.dtype == torch.long
    assert probe.masks is None and probe.cue_masks is None and probe.cue_labels is None


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5])
def test_tuple_items_follow_probe_batch_order(length):
    x, y, m = images(), torch.tensor([0, 1, 2, 1], dtype=torch.int32), masks()
    cue = ~m
    items = (x, y, m[:, None].to(torch.uint8), cue.float(), torch.tensor([1, 1, 0, 0]))[:length]
    probe = to_probe_batch(list(items) if length % 2 else items)
    assert torch.equal(probe.images, x)
    assert probe.labels.dtype == torch.long
    assert probe.labels.tolist() == (y.tolist() if length >= 2 else [UNKNOWN_LABEL] * 4)
    assert (probe.masks is None) == (length < 3) and (probe.cue_masks is None) == (length < 4)
    if length >= 3:
        assert probe.masks.dtype == torch.bool and torch.equal(probe.masks, m)
    if length >= 4:
        assert torch.equal(probe.cue_masks, cue)
    if length == 5:
        assert probe.cue_labels.tolist() == [1, 1, 0, 0]


def test_tuple_of_six_items_is_refused():
    with pytest.raises(ValueError, match=r"\(images, labels\[, masks"):
        to_probe_batch((images(),) * 6)


def test_dict_with_default_keys():
    probe = to_probe_batch({"pixel_values": images(), "targets": [0, 1, 2, 3], "segmentation": masks(), "id": [7] * 4})
    assert probe.labels.tolist() == [0, 1, 2, 3] and torch.equal(probe.masks, masks())


def test_dict_with_named_keys():
    batch = {"img": images(), "cls": torch.arange(4), "fg": masks(), "label": torch.zeros(4)}
    probe = to_probe_batch(batch, {"images": "img", "labels": ["cls"], "masks": "fg"})
    assert probe.labels.tolist() == [0, 1, 2, 3] and probe.masks is not None


def test_dict_without_labels_has_unknown_labels():
    assert to_probe_batch({"image": images(2), "mask": None}).labels.tolist() == [UNKNOWN_LABEL] * 2


def test_dict_with_two_candidate_keys_is_ambiguous():
    with pytest.raises(ValueError, match=r"2 keys for labels: \['label', 'labels'\].*probe_keys=\{'labels': 'label'\}"):
        to_probe_batch({"image": images(), "label": torch.arange(4), "labels": torch.arange(4)})


def test_dict_without_an_image_key_lists_its_keys():
    with pytest.raises(ValueError, match=r"no images key.*its keys are \['img', 'label'\].*probe_keys=\{'images'"):
        to_probe_batch({"img": images(), "label": torch.arange(4)})


def test_named_key_must_be_present():
    with pytest.raises(ValueError, match=r"no masks key: looked for \['fg'\]"):
        to_probe_batch({"image": images()}, {"masks": "fg"})


def test_probe_batch_is_checked_and_kept():
    x = images()
    probe = to_probe_batch(ProbeBatch(x, torch.arange(4), masks=masks().to(torch.uint8)))
    assert probe.images is x and probe.masks.dtype == torch.bool


def test_unknown_batch_type_says_what_is_accepted():
    with pytest.raises(TypeError, match="cannot read a probe batch from a str.*tuple"):
        to_probe_batch("images.png")
    with pytest.raises(TypeError, match="ToImage"):
        to_probe_batch({"image": object()})


def test_probe_keys_from_mapping():
    assert ProbeKeys.from_mapping(None) == ProbeKeys()
    keys = ProbeKeys.from_mapping({"images": "pixel_values"})
    assert keys.images == ("pixel_values",) and keys.labels == ProbeKeys().labels
    assert keys.is_set("images") and not keys.is_set("labels")
    with pytest.raises(ValueError, match=r"unknown fields \['image'\]"):
        ProbeKeys.from_mapping({"image": "x"})
    with pytest.raises(ValueError, match="a key name or a list"):
        ProbeKeys(labels=[])


# ------------------------------------------------------------------ check_probe
def test_masks_of_any_binary_form_become_bool():
    for form in (masks()[:, None].float(), masks().to(torch.uint8), masks().long()[:, None]):
        probe = check_probe(ProbeBatch(images(), torch.arange(4), masks=form, cue_masks=form))
        assert probe.masks.shape == (4, SIZE, SIZE) and probe.masks.dtype == torch.bool
        assert torch.equal(probe.masks, masks()) and torch.equal(probe.cue_masks, masks())


def test_trimap_is_refused_with_the_remedy():
    trimap = masks().long() + 1  # values 1, 2 ...
    trimap[:, 0, 0] = 3
    with pytest.raises(ValueError, match=r"the probe's masks: masks must be binary.*values \{1, 2, 3\}.*masks == 1"):
        check_probe(ProbeBatch(images(), torch.arange(4), masks=trimap))


def test_mask_size_and_count_are_checked():
    with pytest.raises(ValueError, match=r"cue_masks are \(4, 4\) but its images \(8, 8\)"):
        check_probe(ProbeBatch(images(), torch.arange(4), cue_masks=masks()[:, :4, :4]))
    with pytest.raises(ValueError, match="3 masks for 4 images"):
        check_probe(ProbeBatch(images(), torch.arange(4), masks=masks(3)))
    with pytest.raises(ValueError, match=r"the probe's masks: masks must be \(B, H, W\) or \(B, 1, H, W\)"):
        check_probe(ProbeBatch(images(), torch.arange(4), masks=masks()[:, None].expand(-1, 3, -1, -1)))


def test_images_must_be_float_nchw():
    with pytest.raises(ValueError, match="uint8.*ToDtype"):
        check_probe(ProbeBatch((images() > 0).to(torch.uint8) * 255, torch.arange(4)))
    with pytest.raises(ValueError, match=r"\(n, 3, H, W\).*image\[None\]"):
        check_probe(ProbeBatch(images()[0], torch.arange(3)))


def test_labels_must_be_integer_indices():
    assert check_probe(ProbeBatch(images(), torch.arange(4, dtype=torch.int16))).labels.dtype == torch.long
    with pytest.raises(ValueError, match=r"labels must be integer class indices, got torch.float32"):
        check_probe(ProbeBatch(images(), torch.arange(4).float()))
    with pytest.raises(ValueError, match=r"labels must be \(4,\).*argmax"):
        check_probe(ProbeBatch(images(), torch.eye(4)))
    with pytest.raises(ValueError, match=r"cue_labels must be \(4,\)"):
        check_probe(ProbeBatch(images(), torch.arange(4), cue_labels=torch.arange(3)))


# ------------------------------------------------------------------ probe_from_dataset
class DictSamples(Dataset):
    """Samples as TransformedDataset yields them: image, label and, for some datasets, masks."""

    def __init__(self, n: int, with_masks: bool = True):
        self.x, self.with_masks = images(n), with_masks

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Dict:
        sample = {"image": self.x[i], "label": i}
        if self.with_masks:
            sample.update(mask=masks(1)[0], cue_mask=~masks(1)[0], cue_label=0)
        return sample


def test_dataset_of_tuples_gives_its_first_samples():
    x = images(6)
    probe = probe_from_dataset(TensorDataset(x, torch.arange(6)), 4)
    assert torch.equal(probe.images, x[:4]) and probe.labels.tolist() == [0, 1, 2, 3]


def test_dataset_of_dicts_and_of_images():
    probe = probe_from_dataset(DictSamples(5), 3)
    assert probe.labels.tolist() == [0, 1, 2] and probe.masks.shape == (3, SIZE, SIZE)
    assert probe.cue_labels.tolist() == [0, 0, 0]
    only_images = probe_from_dataset(list(images(3)), 10)  # any indexable of samples; shorter than n
    assert len(only_images) == 3 and only_images.labels.tolist() == [UNKNOWN_LABEL] * 3


def test_dataset_samples_of_different_sizes_are_refused():
    samples = [images(1)[0], torch.zeros(3, 4, 4)]
    with pytest.raises(ValueError, match=r"shapes differ.*v2.Resize"):
        probe_from_dataset(samples, 2)


# ------------------------------------------------------------------ probe_from_loader
def test_loader_batches_are_joined_up_to_n_and_read_no_further():
    x = images(10)
    read: List[int] = []

    def batches():
        for start in range(0, 10, 3):
            read.append(start)
            yield x[start : start + 3], torch.arange(start, min(start + 3, 10))

    probe = probe_from_loader(batches(), 5)
    assert probe.labels.tolist() == [0, 1, 2, 3, 4] and torch.equal(probe.images, x[:5])
    assert read == [0, 3]


def test_loader_of_dicts_and_of_probe_batches():
    dicts = probe_from_loader(DataLoader(DictSamples(5), batch_size=2), 3)  # default_collate: a dict of batches
    assert dicts.labels.tolist() == [0, 1, 2] and dicts.masks.dtype == torch.bool
    batches = DataLoader(DictSamples(5, with_masks=False), batch_size=2, collate_fn=collate_samples)  # ProbeBatches
    probes = probe_from_loader(batches, 4)
    assert probes.labels.tolist() == [0, 1, 2, 3] and probes.masks is None


def test_empty_loader_is_refused():
    with pytest.raises(ValueError, match="yielded no batches"):
        probe_from_loader([], 4)


# ------------------------------------------------------------------ raw_eval_loader in real runs
class TinyModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3 * SIZE * SIZE, 3)

    def step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x.flatten(1)), y)

    training_step = validation_step = test_step = step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class OwnLoaderModule(TinyModule):
    def val_dataloader(self):
        return DataLoader(dataset(), batch_size=2)


class NoValidationStep(TinyModule):
    validation_step = None  # type: ignore[assignment]


class PlainDataModule(L.LightningDataModule):
    def setup(self, stage: str) -> None:
        self.val_set = dataset()  # built in setup: the datamodule's setup runs before the callbacks'

    def train_dataloader(self):
        return DataLoader(dataset(), batch_size=4)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=3, shuffle=True)


class LoaderSpy(Callback):
    """Records what raw_eval_loader returns in setup, and the loaders Lightning then runs."""

    def __init__(self):
        self.raw: Dict[str, Optional[object]] = {}
        self.run_sampler: Optional[object] = None

    def setup(self, trainer, pl_module, stage):
        self.raw[stage] = raw_eval_loader(trainer, pl_module, stage)

    def on_validation_start(self, trainer, pl_module):
        loaders = trainer.val_dataloaders
        self.run_sampler = (loaders[0] if isinstance(loaders, list) else loaders).sampler


def dataset(n: int = 8) -> TensorDataset:
    return TensorDataset(images(n), torch.arange(n) % 3)


def loader(**kwargs) -> DataLoader:
    return DataLoader(dataset(), batch_size=kwargs.pop("batch_size", 4), **kwargs)


def run(fn: str, model: L.LightningModule, **kwargs) -> LoaderSpy:
    spy = LoaderSpy()
    trainer = L.Trainer(
        accelerator="cpu", devices=kwargs.pop("devices", 1), strategy=kwargs.pop("strategy", "auto"),
        max_steps=1, limit_train_batches=1, limit_val_batches=kwargs.pop("limit_val_batches", 1),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[spy],
    )
    getattr(trainer, fn)(model, **kwargs)
    return spy


def test_fit_loaders_given_to_fit():
    val = loader()
    assert run("fit", TinyModule(), train_dataloaders=loader(), val_dataloaders=val).raw["fit"] is val
    first, second = loader(), loader()
    assert run("fit", TinyModule(), train_dataloaders=loader(), val_dataloaders=[first, second]).raw["fit"] is first


def test_fit_plain_datamodule_shuffled_loader_is_read_in_the_seeded_order():
    datamodule = PlainDataModule()
    raw = run("fit", TinyModule(), datamodule=datamodule).raw["fit"]
    assert raw.dataset is datamodule.val_set and isinstance(raw.sampler, RandomSampler) and raw.batch_size == 3
    # The loader's shuffle plays no part: the probe is the seeded draw of its dataset, as from an unshuffled loader.
    assert read_probe(raw, 5).labels.tolist() == [i % 3 for i in seeded_order(8)[:5]]
    assert torch.equal(read_probe(raw, 5).images, read_probe(loader(), 5).images)


def test_validate_and_test_loaders():
    val, test = loader(), loader()
    assert run("validate", TinyModule(), dataloaders=val).raw["validate"] is val
    assert run("test", TinyModule(), dataloaders=test).raw["test"] is test


def test_modules_own_val_dataloader():
    raw = run("fit", OwnLoaderModule(), train_dataloaders=loader()).raw["fit"]
    assert isinstance(raw, DataLoader) and raw.batch_size == 2
    assert run("validate", OwnLoaderModule()).raw["validate"].batch_size == 2


def test_no_eval_loop_gives_none():
    assert run("fit", TinyModule(), train_dataloaders=loader()).raw["fit"] is None
    no_batches = run("fit", TinyModule(), train_dataloaders=loader(), val_dataloaders=loader(), limit_val_batches=0)
    assert no_batches.raw["fit"] is None
    no_step = run("fit", NoValidationStep(), train_dataloaders=loader(), val_dataloaders=loader())
    assert no_step.raw["fit"] is None


def test_users_distributed_sampler_plays_no_part():
    sampler = DistributedSampler(dataset(), num_replicas=2, rank=1, shuffle=False)
    given = DataLoader(dataset(), batch_size=2, sampler=sampler)
    raw = run("validate", TinyModule(), dataloaders=given).raw["validate"]
    assert raw is given  # rank 1's shard of the set: the probe reads the whole set in its seeded order all the same
    assert read_probe(raw, 4).labels.tolist() == [i % 3 for i in seeded_order(8)[:4]]


def test_ddp_run_reads_the_loader_before_lightning_adds_its_sampler():
    val = loader()
    spy = run("fit", TinyModule(), strategy="ddp", train_dataloaders=loader(), val_dataloaders=val)
    assert spy.raw["fit"] is val and isinstance(spy.raw["fit"].sampler, SequentialSampler)
    assert isinstance(spy.run_sampler, DistributedSampler)  # what Lightning ran: not what the probe reads


# ------------------------------------------------------------------ normalisation
class Holder:
    def __init__(self, mean=None, std=None):
        self.mean, self.std = mean, std


def test_normalization_order_of_sources(tiny_vit):
    m, s = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    assert resolve_normalization(m, s, Holder(IMAGENET_MEAN, IMAGENET_STD), None, tiny_vit) == (m, s, None)
    assert resolve_normalization(None, None, Holder(m, s), Holder((0, 0, 0), (1, 1, 1)), tiny_vit) == (m, s, None)
    buffers = Holder(torch.tensor(m).view(1, 3, 1, 1), torch.tensor(s).view(1, 3, 1, 1))
    got_m, got_s, message = resolve_normalization(None, None, Holder(), buffers, tiny_vit)
    assert got_m == pytest.approx(m) and got_s == pytest.approx(s) and message is None


def test_normalization_from_pretrained_cfg_then_imagenet(tiny_vit):
    mean, std, message = resolve_normalization(None, None, None, nn.Module(), tiny_vit)
    assert (mean, std) == (tuple(tiny_vit.pretrained_cfg["mean"]), tuple(tiny_vit.pretrained_cfg["std"]))
    assert "pretrained_cfg" in message
    mean, std, message = resolve_normalization(None, None, None, nn.Module(), nn.Linear(2, 2))
    assert (mean, std) == (IMAGENET_MEAN, IMAGENET_STD) and "ImageNet" in message


def test_normalization_arguments_are_checked():
    with pytest.raises(ValueError, match="both mean and std"):
        resolve_normalization([0.5] * 3, None, None, None, None)
    with pytest.raises(ValueError, match="datamodule's mean/std must be 3 channels each, std > 0"):
        resolve_normalization(None, None, Holder((0.5,) * 3, (0.5, 0.5, 0.0)), None, None)


def test_pixel_range_agrees_with_normalised_images():
    assert check_pixel_range(images(), IMAGENET_MEAN, IMAGENET_STD) is None
    assert check_pixel_range(torch.randn(4, 3, SIZE, SIZE), IMAGENET_MEAN, IMAGENET_STD) is None
    assert check_pixel_range(torch.rand(4, 3, SIZE, SIZE), (0, 0, 0), (1, 1, 1)) is None  # a model of [0, 1] pixels


def test_pixel_range_flags_raw_pixels():
    raw = torch.rand(4, 3, SIZE, SIZE)
    assert "un-normalised [0, 1] pixels" in check_pixel_range(raw, IMAGENET_MEAN, IMAGENET_STD)
    assert "[0, 255] pixels" in check_pixel_range((raw * 255).round(), IMAGENET_MEAN, IMAGENET_STD)
    assert "[0, 255] pixels" in check_pixel_range((raw * 255).round(), (0, 0, 0), (1, 1, 1))


def test_pixel_range_flags_another_normalisation():
    message = check_pixel_range(images(), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert message is not None and "fall outside [0, 1]" in message


# ------------------------------------------------------------------ the probe in real runs of a tiny ViT
VIT_SIZE = 32
HALF = (0.5, 0.5, 0.5)


def vit_images(n: int, seed: int = 0) -> torch.Tensor:
    """Images ``(n, 3, 32, 32)`` normalised with mean = std = 0.5."""
    return torch.rand(n, 3, VIT_SIZE, VIT_SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def sorted_set(n: int = 30, classes: int = 3, seed: int = 0) -> TensorDataset:
    """A set listed class by class, as ImageFolder lists a folder."""
    return TensorDataset(vit_images(n, seed), torch.arange(n) * classes // n)


class ViTModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = VisionTransformer(img_size=VIT_SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)

    def step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        return nn.functional.cross_entropy(self.model(x), y)

    def training_step(self, batch, batch_idx):
        return self.step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.step(batch, batch_idx))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self.step(batch, batch_idx))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def vit_trainer(callbacks: List, **kwargs) -> L.Trainer:
    cfg = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    cfg.update(kwargs)
    return L.Trainer(callbacks=callbacks, **cfg)


def quiet_caap(**kwargs) -> CAAPCallback:
    return CAAPCallback(**{"mean": HALF, "std": HALF, "log_images": False, "on_error": "raise", **kwargs})


def test_reading_a_loader_leaves_the_global_generators_and_depends_on_none():
    loader = DataLoader(sorted_set(), batch_size=4, shuffle=True, num_workers=1)
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()
    probe = read_probe(loader, 6)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    np.testing.assert_equal(np.random.get_state(), before[2])
    torch.manual_seed(4)  # another global state, as on another rank or at another call: the same probe
    assert torch.equal(read_probe(loader, 6).images, probe.images)


def test_an_iterable_dataset_is_read_from_a_fresh_iterator():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(vit_images(6), torch.arange(6)))

    loader = DataLoader(Stream(), batch_size=4)
    started = iter(loader)
    next(started)  # a loader already half read: the probe still starts at the stream's start
    assert read_probe(loader, 5).labels.tolist() == [0, 1, 2, 3, 4]


def test_a_class_sorted_set_gives_probes_of_many_classes():
    probe = read_probe(DataLoader(sorted_set(), batch_size=4), 12)
    assert len(set(probe.labels.tolist())) == 3
    assert len(set(probe.labels[:4].tolist())) >= 2  # the maps' probe: the swap probe's first images
    # In a run: the maps' probe is the first images of the swap probe, and both are spread over the classes.
    caap = quiet_caap(num_images=4, swap_images=12)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        vit_trainer([caap]).validate(ViTModule(), DataLoader(sorted_set(), batch_size=4), verbose=False)
    # Nothing to say about this probe (Lightning's own advice on logging names the scalar caap/swap_probe_skill).
    assert not [str(w.message) for w in said if "probe" in str(w.message) and "self.log(" not in str(w.message)]
    assert len(set(caap.swap_probe.labels.tolist())) == 3 and len(set(caap.probe.labels.tolist())) >= 2
    assert torch.equal(caap.probe.images, caap.swap_probe.images[:4])


def test_a_probe_of_one_class_or_of_fewer_images_is_said_once_in_setup():
    one_class = TensorDataset(vit_images(8), torch.zeros(8, dtype=torch.long))
    train = DataLoader(sorted_set(8), batch_size=4)
    with pytest.warns(UserWarning) as said:
        vit_trainer([quiet_caap(num_images=4, swap_images=8), SpuriousCueMonitor()], max_epochs=3).fit(
            ViTModule(), train, DataLoader(one_class, batch_size=4)
        )
    messages = [str(w.message) for w in said]
    assert sum("every probe image has label 0" in m for m in messages) == 1
    short = TensorDataset(vit_images(3), torch.arange(3))
    with pytest.warns(UserWarning, match=r"the probe has 3 images, fewer than num_images=4"):
        vit_trainer([quiet_caap(num_images=4, metrics=["insertion_deletion"])]).validate(
            ViTModule(), DataLoader(short, batch_size=4), verbose=False
        )


def test_validate_test_and_a_new_fit_take_the_probe_of_their_own_loaders():
    caap = quiet_caap(num_images=4, swap_images=4)
    module = ViTModule()
    train = DataLoader(sorted_set(8, seed=0), batch_size=4)
    val, other, test, refit = (DataLoader(sorted_set(8, seed=s), batch_size=4) for s in (1, 2, 3, 4))
    trainer = vit_trainer([caap], limit_train_batches=1)
    trainer.fit(module, train, val)
    assert torch.equal(caap.probe.images, read_probe(val, 4).images) and caap.last.stage == "fit"
    trainer.validate(module, other, verbose=False)
    assert torch.equal(caap.last.probe.images, read_probe(other, 4).images) and caap.last.stage == "validate"
    trainer.test(module, test, verbose=False)
    assert torch.equal(caap.last.probe.images, read_probe(test, 4).images) and caap.last.stage == "test"
    vit_trainer([caap], limit_train_batches=1).fit(module, train, refit)
    assert torch.equal(caap.last.probe.images, read_probe(refit, 4).images) and caap.last.stage == "fit"
    # A new loader over the same data is the same source: its probe is kept, not read again.
    kept = caap.probe
    trainer.validate(module, DataLoader(refit.dataset, batch_size=2), verbose=False)
    assert caap.probe is kept


class SortedDataModule(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(sorted_set(8, seed=0), batch_size=4)

    def val_dataloader(self):
        return DataLoader(sorted_set(8, seed=1), batch_size=4)

    def probe_batch(self, n: int):
        return vit_images(n, seed=9), torch.arange(n) % 3


def test_loaders_given_to_test_after_a_fit_on_a_datamodule_give_their_own_probe():
    caap = quiet_caap(num_images=4, swap_images=4)
    module, trainer = ViTModule(), vit_trainer([caap], limit_train_batches=1)
    trainer.fit(module, datamodule=SortedDataModule())
    assert torch.equal(caap.probe.images, vit_images(4, seed=9))  # the datamodule's probe_batch
    test = DataLoader(sorted_set(8, seed=3), batch_size=4)
    trainer.test(module, test, verbose=False)  # the Trainer keeps the datamodule; the test reads `test`
    assert torch.equal(caap.last.probe.images, read_probe(test, 4).images) and caap.last.stage == "test"


class RankShardedStream(IterableDataset):
    """Each process streams its own share of the set, as a rank-sharded IterableDataset (WebDataset) does."""

    def __iter__(self):
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if (
            torch.distributed.is_initialized()) else (0, 1)
        return iter(zip(vit_images(16)[rank::world], (torch.arange(16) % 3)[rank::world]))


class SavesProbe(Callback):
    def __init__(self, caap: CAAPCallback, root) -> None:
        self.caap, self.root = caap, root

    def on_validation_end(self, trainer, pl_module):
        torch.save((self.caap.probe.images, self.caap.swap_probe.images), self.root / f"probe{trainer.global_rank}.pt")


def test_ddp_ranks_with_sharded_streams_explain_rank_zeros_probe(tmp_path, monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)  # an earlier DDP run in this process may still hold its port
    caap = quiet_caap(num_images=2, swap_images=4)
    trainer = vit_trainer(
        [caap, SavesProbe(caap, tmp_path)], strategy="ddp_spawn", devices=2, limit_train_batches=1,
    )
    trainer.fit(ViTModule(), DataLoader(sorted_set(8), batch_size=2), DataLoader(RankShardedStream(), batch_size=2))
    maps0, swap0 = torch.load(tmp_path / "probe0.pt")
    maps1, swap1 = torch.load(tmp_path / "probe1.pt")
    assert torch.equal(swap0, vit_images(16)[0::2][:4])  # rank 0's stream, from its start
    assert torch.equal(swap1, swap0) and torch.equal(maps1, maps0) and torch.equal(maps0, swap0[:2])


# ------------------------------------------------------------------ data that used to fail late or silently
class Samples(Dataset):
    """Tuple samples of a tiny ViT's size; ``make(i)`` gives sample i's items beyond the image and label."""

    def __init__(self, n: int, extra=lambda i: (), image=lambda i: vit_images(1, i)[0]) -> None:
        self.n, self.extra, self.image = n, extra, image

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        return (self.image(i), i % 3, *self.extra(i))


def square_mask(i: int = 0) -> torch.Tensor:
    mask = torch.zeros(VIT_SIZE, VIT_SIZE, dtype=torch.bool)
    mask[8:24, 8:24] = True
    return mask


def test_masks_in_only_some_samples_fail_in_setup_naming_them():
    some = Samples(8, extra=lambda i: (square_mask(),) if i % 2 == 0 else ())
    with pytest.raises(ValueError, match=r"the probe's masks are in dataset index \d.* but not in dataset index \d.*give "
                                         r"every sample its masks"):
        vit_trainer([quiet_caap(num_images=4)]).validate(ViTModule(), DataLoader(some, batch_size=1), verbose=False)
    batches = [(vit_images(2), torch.arange(2), torch.stack([square_mask()] * 2)), (vit_images(2, 1), torch.arange(2))]
    with pytest.raises(ValueError, match=r"masks are in batch 0 but not in batch 1"):
        read_probe(batches, 4)
    with pytest.raises(ValueError, match=r"masks are in sample 0, sample 2, sample 4 and 1 more but not in sample 1, sample 3"):
        probe_from_dataset(some, 8)


def test_nan_pixels_fail_in_setup():
    broken = vit_images(4)
    broken[2, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf pixels \(image\(s\) 2 of its 4\)"):
        quiet_caap(probe=broken)
    nan_sample = Samples(8, image=lambda i: vit_images(1, i)[0] * (float("inf") if i == 5 else 1))
    with pytest.raises(ValueError, match=r"dataset index 5 of the probe's source: .*NaN or inf pixels"):
        vit_trainer([quiet_caap(num_images=4)]).validate(ViTModule(), DataLoader(nan_sample, batch_size=4), verbose=False)


def test_blank_masks_of_the_maps_probe_fail_in_setup_though_the_swap_probes_are_fine():
    masks = torch.stack([square_mask()] * 8)
    masks[:4] = False  # the maps' probe: no object anywhere; the rest of the swap probe has one
    caap = quiet_caap(probe=(vit_images(8), torch.arange(8) % 3, masks), num_images=4, swap_images=8)
    with pytest.raises(ValueError, match=r"cannot watch caap/aupr_fg on this probe of 4 image\(s\): every one of the 4 "
                                         r"masks is empty"):
        vit_trainer([caap]).validate(ViTModule(), DataLoader(sorted_set(8), batch_size=4), verbose=False)


def test_two_image_sizes_fail_naming_the_sizes_and_the_remedy():
    mixed = Samples(8, image=lambda i: torch.zeros(3, 40, 40) if i % 2 else vit_images(1, i)[0])
    with pytest.raises(ValueError, match=r"shapes differ \(.*\(3, 40, 40\) in dataset index.*v2.Resize and v2.CenterCrop"):
        vit_trainer([quiet_caap(num_images=4)]).validate(ViTModule(), DataLoader(mixed, batch_size=2), verbose=False)


def test_file_names_and_ids_after_the_labels_are_not_masks():
    named = Samples(8, extra=lambda i: (f"img_{i}.png",))
    caap = quiet_caap(num_images=4, swap_images=8)
    vit_trainer([caap]).validate(ViTModule(), DataLoader(named, batch_size=4), verbose=False)
    assert caap.probe.masks is None and len(caap.history) == 1
    drawn = seeded_order(8)[:4]
    assert caap.probe.labels.tolist() == [i % 3 for i in drawn]
    assert to_probe_batch((images(), torch.arange(4), torch.arange(4))).masks is None  # sample ids
    with pytest.raises(ValueError, match=r"masks are \(4, 4\) but its images \(8, 8\)"):  # a mask of the wrong size
        to_probe_batch((images(), torch.arange(4), masks()[:, :4, :4]))
