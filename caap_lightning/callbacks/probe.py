"""The probe batch from whatever the user has: a batch in any common form, a Dataset, or the eval dataloader.

Pure functions that :class:`~caap_lightning.callbacks.CAAPCallback` calls in ``setup``: they turn a
batch (a :class:`ProbeBatch`, an image tensor, a tuple or a dict) into a checked ``ProbeBatch``,
find the raw validation/test dataloader the user gave the Trainer, and resolve and check the
images' normalisation.

Images-only probes (a tensor, a tuple without labels, a dict without a label key) get
``labels = UNKNOWN_LABEL`` (-1). Every metric works without labels (they read masks, or the
model's own scores); ``target="label"`` needs them, and heatmap titles show ``?`` for them.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, fields
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, Dataset, IterableDataset

from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.metrics._checks import _bad_images, check_masks
from caap_lightning.metrics.functional import scorable_regions
from caap_lightning.utils import IMAGENET_MEAN, IMAGENET_STD, model_normalization

# The label of an image whose class is not known (an images-only probe).
UNKNOWN_LABEL = -1
# ProbeBatch's fields, in its order: the order of a tuple batch's items too.
FIELDS = ("images", "labels", "masks", "cue_masks", "cue_labels")
# Un-normalised pixels may overshoot [0, 1] a little (resizing); a wrong mean/std overshoots far more.
PIXEL_MARGIN = 0.25
# Seeds the probe's draw from a loader's dataset: the same images on every rank, at every check and in every run.
PROBE_SEED = 0
Channels = Tuple[float, float, float]


@dataclass(frozen=True)
class ProbeKeys:
    """The key names of a dict batch's fields: each a name or a list of candidate names.

    At most one candidate of a field may be present in a batch. A field set here replaces its
    defaults, and a field set here must then be present; images are always required.
    """

    images: Union[str, Sequence[str]] = ("image", "images", "pixel_values", "x")
    labels: Union[str, Sequence[str]] = ("label", "labels", "target", "targets", "y")
    masks: Union[str, Sequence[str]] = ("mask", "masks", "segmentation")
    cue_masks: Union[str, Sequence[str]] = ("cue_mask", "cue_masks")
    cue_labels: Union[str, Sequence[str]] = ("cue_label", "cue_labels")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            names = (value,) if isinstance(value, str) else tuple(value)
            if not names or not all(isinstance(name, str) and name for name in names):
                raise ValueError(f"probe_keys[{f.name!r}] must be a key name or a list of them, got {value!r}")
            object.__setattr__(self, f.name, names)

    @classmethod
    def from_mapping(cls, keys: Union[None, "ProbeKeys", Mapping[str, Union[str, Sequence[str]]]]) -> "ProbeKeys":
        """``ProbeKeys`` from ``{"images": "pixel_values", ...}`` (``None``: the defaults)."""
        if keys is None:
            return cls()
        if isinstance(keys, ProbeKeys):
            return keys
        unknown = [name for name in keys if name not in FIELDS]
        if unknown:
            raise ValueError(f"probe_keys has unknown fields {unknown}; the fields are {list(FIELDS)}")
        return cls(**keys)

    def names(self, field: str) -> Tuple[str, ...]:
        return getattr(self, field)

    def is_set(self, field: str) -> bool:
        """Whether the field's names were given (not the defaults): then the batch must have one."""
        return self.names(field) != _DEFAULT_KEYS.names(field)


_DEFAULT_KEYS = ProbeKeys()
# What every function taking key names accepts: ProbeKeys, its fields as a mapping, or None (the defaults).
KeysLike = Union[None, ProbeKeys, Mapping[str, Union[str, Sequence[str]]]]


# ------------------------------------------------------------------ one batch
def to_probe_batch(obj: Any, keys: KeysLike = None) -> ProbeBatch:
    """One batch as a checked :class:`ProbeBatch`.

    ``obj`` is a ``ProbeBatch``; an image tensor ``(n, 3, H, W)`` (labels unknown); a tuple or list
    ``(images, labels[, masks[, cue_masks[, cue_labels]]])``; or a dict whose keys ``keys`` names
    (see :class:`ProbeKeys`). Missing labels are ``UNKNOWN_LABEL``.
    """
    if isinstance(obj, ProbeBatch):
        return check_probe(obj)
    found = {field: _tensor(value, field) for field, value in _fields(obj, ProbeKeys.from_mapping(keys)).items()}
    return check_probe(_probe_from_fields(found))


def _fields(obj: Any, keys: ProbeKeys) -> Dict[str, Any]:
    """The probe fields present in one batch or sample (tensor, tuple/list or dict), values as found."""
    if isinstance(obj, torch.Tensor):
        return {"images": obj}
    if isinstance(obj, (tuple, list)):
        if not 1 <= len(obj) <= len(FIELDS):
            raise ValueError(
                f"a tuple batch is (images, labels[, masks[, cue_masks[, cue_labels]]]), got {len(obj)} items; "
                "pass a dict (with probe_keys) or a ProbeBatch for other layouts"
            )
        found = {field: value for field, value in zip(FIELDS, obj) if value is not None}
        for field in ("masks", "cue_masks"):
            if field in found and not _mask_like(found[field], found["images"]):
                del found[field]  # e.g. file names or ids after (images, labels): not masks
        return found
    if isinstance(obj, Mapping):
        found = {field: _find_key(obj, field, keys) for field in FIELDS}
        return {field: obj[key] for field, key in found.items() if key is not None}
    raise TypeError(
        f"cannot read a probe batch from a {type(obj).__name__}: give a ProbeBatch, an image tensor (n, 3, H, W), "
        "a tuple (images, labels[, masks[, cue_masks]]) or a dict of them"
    )


def _mask_like(value: Any, images: Any) -> bool:
    """Whether a tuple item can be masks of ``images``: tensors or arrays with at most a channel less.

    A mask of the wrong size is still taken, so that its check names the size; a list of file names
    or a vector of ids is not a mask.
    """
    mask_dims, image_dims = _ndim(value), _ndim(images)
    return mask_dims is not None and image_dims is not None and mask_dims >= image_dims - 1


def _ndim(value: Any) -> Optional[int]:
    """Dimensions of a tensor or array, or of a list of them stacked; ``None`` for anything else."""
    if hasattr(value, "shape") and not isinstance(value, (str, bytes)):
        return len(value.shape)
    if isinstance(value, (list, tuple)) and value and hasattr(value[0], "shape"):
        return 1 + len(value[0].shape)
    return None


def _find_key(batch: Mapping, field: str, keys: ProbeKeys) -> Optional[Any]:
    """The one key of ``batch`` that holds ``field``, or ``None`` where an optional field is absent."""
    present = [name for name in keys.names(field) if batch.get(name) is not None]
    if len(present) > 1:
        raise ValueError(
            f"the probe batch has {len(present)} keys for {field}: {present} (its keys: {list(batch)}); name the one "
            f"to use, e.g. CAAPCallback(probe_keys={{{field!r}: {present[0]!r}}})"
        )
    if present:
        return present[0]
    if field == "images" or keys.is_set(field):
        raise ValueError(
            f"the probe batch has no {field} key: looked for {list(keys.names(field))}, its keys are {list(batch)}; "
            f"name it, e.g. CAAPCallback(probe_keys={{{field!r}: '<key>'}})"
        )
    return None


def _tensor(value: Any, field: str) -> torch.Tensor:
    """``value`` (a tensor, array, number or a list of them) as a plain tensor."""
    if isinstance(value, torch.Tensor):
        return value.as_subclass(torch.Tensor)  # tv_tensors would re-wrap every result
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return _stack([v.as_subclass(torch.Tensor) for v in value], field)
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"the probe's {field} must be tensors or arrays, got {type(value).__name__}; e.g. turn PIL images into "
            "tensors with v2.ToImage() and v2.ToDtype(torch.float32, scale=True), then v2.Normalize(mean, std)"
        ) from exc


def _stack(values: List[torch.Tensor], field: str) -> torch.Tensor:
    try:
        return torch.stack(values)
    except RuntimeError as exc:
        shapes = sorted({tuple(v.shape) for v in values})
        raise ValueError(
            f"cannot stack the samples' {field}: their shapes differ ({shapes}); give every sample one size "
            "(e.g. v2.Resize and v2.CenterCrop in the dataset's transform)"
        ) from exc


def _probe_from_fields(found: Dict[str, torch.Tensor]) -> ProbeBatch:
    """A ProbeBatch (unchecked) from the fields found; absent labels are unknown."""
    if "labels" not in found and "images" in found and found["images"].dim() > 0:
        found["labels"] = torch.full((found["images"].shape[0],), UNKNOWN_LABEL, dtype=torch.long)
    return ProbeBatch(**{field: found.get(field) for field in FIELDS})


# ------------------------------------------------------------------ many samples
def probe_from_dataset(dataset: Dataset, n: int, keys: KeysLike = None) -> ProbeBatch:
    """The first ``n`` samples of ``dataset`` (fewer if it is shorter), collated into a checked ProbeBatch.

    A sample is one image ``(3, H, W)``, a tuple ``(image, label[, mask[, cue_mask[, cue_label]]])`` or
    a dict (keys as in :func:`to_probe_batch`). The global random generators are left as they were.
    """
    keys = ProbeKeys.from_mapping(keys)
    with preserved_rng():
        if isinstance(dataset, IterableDataset):
            samples: Iterable[Tuple[str, Any]] = ((f"sample {i}", s) for i, s in enumerate(iter(dataset)))
        else:
            samples = ((f"sample {i}", dataset[i]) for i in range(len(dataset)))
        parts = _read_parts(((name, _sample_as_batch(sample, keys)) for name, sample in samples), n, keys)
    if not parts:
        raise ValueError("the probe dataset has no samples")
    return first_samples(_concat(parts), n)


def _sample_as_batch(sample: Any, keys: ProbeKeys) -> Dict[str, torch.Tensor]:
    """One sample as a batch of one, in the dict form :func:`to_probe_batch` reads."""
    found = _fields(sample, keys)
    if "images" not in found:
        raise ValueError("every probe sample needs an image")
    return {field: _tensor(value, field).unsqueeze(0) for field, value in found.items()}


def probe_from_loader(loader: Iterable[Any], n: int, keys: KeysLike = None) -> ProbeBatch:
    """The first ``n`` samples a dataloader yields (fewer if it runs out), as one checked ProbeBatch.

    Its batches may take any form :func:`to_probe_batch` reads; it is iterated only as far as needed.
    """
    parts = _read_parts(((f"batch {i}", batch) for i, batch in enumerate(loader)), n, ProbeKeys.from_mapping(keys))
    if not parts:
        raise ValueError("the probe dataloader yielded no batches")
    return first_samples(_concat(parts), n)


def read_probe(loader: Iterable[Any], n: int, keys: KeysLike = None) -> ProbeBatch:
    """``n`` samples of an evaluation dataloader (fewer where it has fewer), read without touching the run.

    A DataLoader is never iterated: iterating it draws its seed from the global torch generator and
    would shift every later random draw of the training. Its map-style dataset is indexed in a
    seeded order (:data:`PROBE_SEED`), so that the probe is drawn across the whole set (a set sorted
    by class gives a probe of many classes), the same on every rank and at every call, whatever the
    loader's sampler; its IterableDataset is read from a fresh iterator, from the start. Each sample
    goes through the loader's ``collate_fn``. Any other iterable is read from its start. Every
    global random generator (torch, CUDA, Python's, NumPy's) is restored afterwards, so that random
    transforms in the dataset leave the run alone too.
    """
    if not isinstance(loader, DataLoader):
        with preserved_rng():
            return probe_from_loader(loader, n, keys)
    keys = ProbeKeys.from_mapping(keys)
    dataset = loader.dataset
    with preserved_rng():
        if isinstance(dataset, IterableDataset):
            items: Iterable[Tuple[str, Any]] = ((f"sample {i}", s) for i, s in enumerate(iter(dataset)))
        else:
            items = ((f"dataset index {i}", dataset[i]) for i in seeded_order(len(dataset)))
        # Automatic batching off: each item is a batch already, which collate_fn only converts.
        collate = loader.collate_fn if loader.batch_sampler is None else lambda sample: loader.collate_fn([sample])
        parts = _read_parts(((name, collate(item)) for name, item in items), n, keys)
    if not parts:
        raise ValueError("the probe dataloader's dataset has no samples")
    return first_samples(_concat(parts), n)


def seeded_order(length: int) -> List[int]:
    """``range(length)`` in the probe's seeded order: any first ``n`` of it are spread over the whole range."""
    return torch.randperm(length, generator=torch.Generator().manual_seed(PROBE_SEED)).tolist()


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Every global random generator as it was on entry, on exit: torch's (and the current CUDA device's), Python's
    and NumPy's."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    # The current device only: forking every visible GPU would open a context on each, from each process.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _read_parts(batches: Iterable[Tuple[str, Any]], n: int, keys: ProbeKeys) -> List[Tuple[str, ProbeBatch]]:
    """Named batches as checked ProbeBatches, read until they hold ``n`` samples; an error names its batch."""
    parts: List[Tuple[str, ProbeBatch]] = []
    count = 0
    for name, batch in batches:
        try:
            probe = to_probe_batch(batch, keys)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name} of the probe's source: {exc}") from exc
        parts.append((name, probe))
        count += len(probe)
        if count >= n:
            break
    return parts


def _concat(parts: List[Tuple[str, ProbeBatch]]) -> ProbeBatch:
    """Named batches joined; raises, naming the batches, where a field is in some only or where sizes differ."""
    values: Dict[str, Optional[torch.Tensor]] = {}
    for field in FIELDS:
        having = [name for name, part in parts if getattr(part, field) is not None]
        if having and len(having) < len(parts):
            lacking = [name for name, part in parts if getattr(part, field) is None]
            raise ValueError(
                f"the probe's {field} are in {_listed(having)} but not in {_listed(lacking)}: give every sample its "
                f"{field} (an empty one where the region is absent), or none"
            )
        if not having:
            values[field] = None
            continue
        by_shape: Dict[Tuple[int, ...], List[str]] = {}
        for name, part in parts:
            by_shape.setdefault(tuple(getattr(part, field).shape[1:]), []).append(name)
        if len(by_shape) > 1:
            shapes = "; ".join(f"{shape} in {_listed(names)}" for shape, names in by_shape.items())
            raise ValueError(
                f"cannot join the probe's {field}: their shapes differ ({shapes}); give every sample one size "
                "(e.g. v2.Resize and v2.CenterCrop in the dataset's transform)"
            )
        values[field] = torch.cat([getattr(part, field) for _, part in parts])
    return ProbeBatch(**values)


def _listed(names: List[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def first_samples(probe: ProbeBatch, n: int) -> ProbeBatch:
    """The first ``n`` samples of ``probe`` (all of them if it has fewer)."""
    values = {field: getattr(probe, field) for field in FIELDS}
    return ProbeBatch(**{field: None if value is None else value[:n] for field, value in values.items()})


# ------------------------------------------------------------------ the raw eval dataloader
def raw_eval_loader(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> Optional[Iterable[Any]]:
    """The evaluation dataloader the user gave this run, as given: no sampler Lightning added (e.g. DDP's).

    ``stage`` is the ``setup`` hook's: ``"fit"`` (the validation loader: ``val_dataloaders=``, the
    datamodule's or the module's ``val_dataloader()``), ``"validate"`` (``dataloaders=`` or
    ``val_dataloader()``) or ``"test"`` (``dataloaders=`` or ``test_dataloader()``). The first loader
    where there are several; ``None`` where the stage runs no evaluation (no loader, no
    ``validation_step``/``test_step``, or a batch limit of 0), and for ``"predict"``. Read it with
    :func:`read_probe`, which neither iterates it nor depends on its sampler.

    Call it in ``setup``: the datamodule's ``setup`` has run by then, the module's has not.
    """
    source = eval_source(trainer, pl_module, stage)
    if source is None:
        return None
    # CombinedLoader flattens lists/dicts of loaders in the order Lightning numbers them (dataloader_idx).
    with preserved_rng():  # the loader hook is the user's code
        loaders = [dl for dl in CombinedLoader(source.dataloader(), "sequential").flattened if not _is_empty(dl)]
    return loaders[0] if loaders else None


def eval_source(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> Optional[Any]:
    """Where ``stage``'s evaluation loader comes from, or ``None`` when the stage runs no evaluation loop.

    No loader is requested: this is cheap, and answers "will this fit validate?" in ``setup``.
    """
    loop = _eval_loop(trainer, stage)
    if loop is None:
        return None
    testing = stage == "test"
    limit = trainer.limit_test_batches if testing else trainer.limit_val_batches
    if limit == 0 or not is_overridden("test_step" if testing else "validation_step", pl_module):
        return None  # Lightning runs no loop then, and never asks for its loader
    # Lightning keeps where the loader comes from (the loaders given, the datamodule or the module) in
    # the loop's private `_data_source` until the loop starts; only then does it add a DistributedSampler.
    source = loop._data_source
    return source if source.is_defined() else None


def _is_empty(loader: Any) -> bool:
    """``None`` or an empty list/dict: what a hook returns for "no loader"."""
    return loader is None or isinstance(loader, (list, tuple, dict)) and len(loader) == 0


def _eval_loop(trainer: L.Trainer, stage: str) -> Optional[Any]:
    if stage == "fit":
        return trainer.fit_loop.epoch_loop.val_loop
    if stage == "validate":
        return trainer.validate_loop
    if stage == "test":
        return trainer.test_loop
    return None


# ------------------------------------------------------------------ the probe's source
def probe_source(trainer: L.Trainer, pl_module: L.LightningModule, stage: str, user_probe: Optional[ProbeBatch]) -> Any:
    """Where ``stage``'s probe comes from: the user's probe, else a datamodule with ``probe_batch(n)`` where the stage
    reads that datamodule's loaders, else the stage's evaluation dataloader (:func:`raw_eval_loader`): loaders given
    to ``validate``/``test`` after a fit on a datamodule give their own probe. Raises, naming the remedies, where
    there is none."""
    if user_probe is not None:
        return user_probe
    datamodule = trainer.datamodule
    if callable(getattr(datamodule, "probe_batch", None)):
        given = eval_source(trainer, pl_module, stage)
        if given is None or given.instance is datamodule:
            return datamodule
    loader = raw_eval_loader(trainer, pl_module, stage)
    if loader is None:
        raise ValueError(
            "CAAPCallback found no probe images: pass probe=... (images, a tuple, a dict or a Dataset), give "
            f"the datamodule a probe_batch(n) method, or give the Trainer's {stage} a validation dataloader."
        )
    return loader


def probe_source_key(source: Any) -> Any:
    """The object whose identity says the probe is still the same: a DataLoader's dataset (a new loader over the same
    data holds the same images), else the source itself. Compare with ``is``, and keep it, so its id is not reused."""
    return source.dataset if isinstance(source, DataLoader) else source


def take_probe(trainer: L.Trainer, source: Any, n: int, keys: KeysLike = None) -> ProbeBatch:
    """The probe of ``n`` images (fewer where the source has fewer) from a :func:`probe_source`, checked, on the CPU.

    Under DDP rank 0 reads it and every rank takes rank 0's, so that ranks whose loaders read other
    shards (a rank-sharded IterableDataset) still explain the same images.
    """
    if isinstance(source, ProbeBatch):
        return source
    if trainer.world_size == 1:
        return _read_source(source, n, keys)
    outcome: Union[None, ProbeBatch, str] = None
    error: Optional[Exception] = None
    if trainer.is_global_zero:
        try:
            outcome = _read_source(source, n, keys)
        except Exception as exc:  # every rank must reach the broadcast, then fail with rank 0's reason
            outcome, error = f"{type(exc).__name__}: {exc}", exc
    outcome = trainer.strategy.broadcast(outcome, src=0)
    if error is not None:
        raise error
    if isinstance(outcome, str):
        raise ValueError(f"reading the probe on rank 0 failed: {outcome}")
    return outcome


def _read_source(source: Any, n: int, keys: KeysLike) -> ProbeBatch:
    if isinstance(source, DataLoader) or not callable(getattr(source, "probe_batch", None)):
        return check_probe(read_probe(source, n, keys).to("cpu"))
    with preserved_rng():
        batch = source.probe_batch(n)
    return check_probe(to_probe_batch(batch, keys).to("cpu"))


def probe_shortfall(probe: ProbeBatch, num_images: int) -> Optional[str]:
    """A sentence where the probe taken is less than asked: fewer than ``num_images`` images, or images of one class
    alone; else ``None``."""
    said = []
    if len(probe) < num_images:
        said.append(f"the probe has {len(probe)} images, fewer than num_images={num_images}: its source has no more")
    labels = probe.labels[probe.labels != UNKNOWN_LABEL]
    if len(probe) > 1 and len(labels) == len(probe) and bool((labels == labels[0]).all()):
        said.append(
            f"every probe image has label {int(labels[0])}: the maps explain one class, and a swap test, which scores "
            "only pairs of images the model classifies differently, may score none at all; draw the probe across "
            "the classes (a dataset of many classes, a datamodule's probe_batch(n), or probe=...)"
        )
    return "; ".join(said) or None


# ------------------------------------------------------------------ checks
def check_probe(probe: ProbeBatch) -> ProbeBatch:
    """``probe`` with its fields checked and put in the callback's form.

    Images float ``(n, 3, H, W)``; labels (and cue labels) integer ``(n,)``, returned long
    (missing labels: ``UNKNOWN_LABEL``); masks ``(n, H, W)`` or ``(n, 1, H, W)``, bool or 0/1 of any
    dtype, returned ``(n, H, W)`` bool. Raises ``ValueError`` naming the field and the remedy.
    """
    images = _check_images(probe.images)
    n, size = images.shape[0], tuple(images.shape[-2:])
    labels = probe.labels
    if labels is None:
        labels = torch.full((n,), UNKNOWN_LABEL, dtype=torch.long)
    return ProbeBatch(
        images=images,
        labels=_check_classes(labels, "labels", n),
        masks=_check_mask(probe.masks, "masks", n, size),
        cue_masks=_check_mask(probe.cue_masks, "cue_masks", n, size),
        cue_labels=None if probe.cue_labels is None else _check_classes(probe.cue_labels, "cue_labels", n),
    )


def _check_images(images: Any) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"the probe's images must be a tensor (n, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(
            f"the probe's images must be (n, 3, H, W) with n >= 1, got shape {tuple(images.shape)}; add a batch "
            "dimension to a single image (image[None]) and give grayscale images 3 channels (x.expand(-1, 3, -1, -1))"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"the probe's images are {images.dtype}: give float images normalised as the model expects, e.g. "
            "v2.ToDtype(torch.float32, scale=True) then v2.Normalize(mean, std)"
        )
    bad = _bad_images(images)
    if bad:
        raise ValueError(
            f"the probe's images hold NaN or inf pixels (image(s) {_listed([str(i) for i in bad])} of its "
            f"{images.shape[0]}), which would fail every check: fix the dataset's transform (e.g. a std of 0 in "
            "v2.Normalize) or leave those samples out"
        )
    return images


def _check_classes(classes: Any, field: str, n: int) -> torch.Tensor:
    classes = _tensor(classes, field)
    if tuple(classes.shape) != (n,):
        raise ValueError(
            f"the probe's {field} must be ({n},) class indices, one per image, got shape {tuple(classes.shape)}; "
            "for one-hot or soft labels use labels.argmax(1)"
        )
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise ValueError(f"the probe's {field} must be integer class indices, got {classes.dtype}; use {field}.long()")
    return classes.long()


def _check_mask(mask: Any, field: str, n: int, size: Tuple[int, int]) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    try:  # the metrics' own check of the mask forms and of binary values
        mask = check_masks(_tensor(mask, field))
    except ValueError as exc:
        raise ValueError(f"the probe's {field}: {exc}") from exc
    if mask.shape[0] != n:
        raise ValueError(f"the probe has {mask.shape[0]} {field} for {n} images; give one mask per image")
    if tuple(mask.shape[1:]) != size:
        raise ValueError(
            f"the probe's {field} are {tuple(mask.shape[1:])} but its images {size}: resize each mask with its "
            "image (nearest-neighbour, e.g. one v2 transform on the image and a tv_tensors.Mask)"
        )
    return mask


def check_probe_regions(
    probe: ProbeBatch, swap_probe: Optional[ProbeBatch], metrics: Mapping[str, Any], prefix: str
) -> None:
    """Raise where a mask field that a metric reads marks no image's region, in the probe that metric reads.

    ``metrics`` maps the active metrics' names (``<prefix>/<name>`` is how they are logged) to
    their specs, each with ``needs`` (the mask field it reads) and ``swap``: a swap test reads
    ``swap_probe`` (where there is one), every other metric ``probe``. Blank (or whole-image)
    masks would fail every check the same way; here they fail once, in ``setup``.
    """
    for name, spec in metrics.items():
        if spec.needs is None:
            continue
        tested, which = (swap_probe, "swap probe") if spec.swap and swap_probe is not None else (probe, "probe")
        try:
            scorable_regions(getattr(tested, spec.needs))
        except ValueError as exc:
            raise ValueError(
                f"CAAPCallback cannot watch {prefix}/{name} on this {which} of {len(tested)} image(s): {exc}. Give "
                f"{spec.needs} that mark part of each image (the maps' probe is the first images), or leave out the "
                f"metrics that read {spec.needs}"
            ) from exc


# ------------------------------------------------------------------ normalisation
def resolve_normalization(
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    datamodule: Any,
    pl_module: Any,
    model: Any,
) -> Tuple[Channels, Channels, Optional[str]]:
    """The images' ``(mean, std)`` and a sentence to say once where no one gave them (else ``None``).

    In order: the callback's own ``mean``/``std``, the datamodule's ``mean``/``std`` attributes,
    the LightningModule's (numbers or tensors, e.g. buffers), the model's timm ``pretrained_cfg``,
    ImageNet's. The sentence names the source for the last two, which are guesses.
    """
    if (mean is None) != (std is None):
        raise ValueError(f"give CAAPCallback both mean and std, or neither; got mean={mean}, std={std}")
    given = (
        ("CAAPCallback's mean/std", mean, std),
        ("the datamodule's mean/std", getattr(datamodule, "mean", None), getattr(datamodule, "std", None)),
        ("the LightningModule's mean/std", getattr(pl_module, "mean", None), getattr(pl_module, "std", None)),
    )
    for source, m, s in given:
        if m is not None and s is not None:
            return _channels(m, s, source) + (None,)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("mean") is not None and cfg.get("std") is not None:
        m, s = _channels(*model_normalization(model), "the model's pretrained_cfg")
        return m, s, (f"normalising with the model's pretrained_cfg mean={m}, std={s} (no mean/std from the callback, "
                      "the datamodule or the module); pass mean=/std= if the images are normalised otherwise")
    m, s = _channels(IMAGENET_MEAN, IMAGENET_STD, "ImageNet")
    return m, s, (f"no mean/std given (callback, datamodule, module or the model's pretrained_cfg): assuming "
                  f"ImageNet's mean={m}, std={s}; pass mean=/std= if the images are normalised otherwise")


def _channels(mean: Any, std: Any, source: str) -> Tuple[Channels, Channels]:
    """Three floats each (from a sequence or a tensor of any shape), std positive."""
    m = tuple(float(v) for v in torch.as_tensor(mean, dtype=torch.float64).flatten().tolist())
    s = tuple(float(v) for v in torch.as_tensor(std, dtype=torch.float64).flatten().tolist())
    if len(m) != 3 or len(s) != 3 or min(s) <= 0:
        raise ValueError(f"{source} must be 3 channels each, std > 0; got mean={m}, std={s}")
    return m, s  # type: ignore[return-value]


def check_pixel_range(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Optional[str]:
    """A warning when the probe's pixel values contradict ``mean``/``std``; ``None`` when they agree.

    It flags images that look like [0, 255] pixels, like un-normalised [0, 1] pixels while
    ``mean``/``std`` normalise, or that un-normalise with ``mean``/``std`` far outside [0, 1].
    """
    x = images.detach().float()
    lo, hi = x.min().item(), x.max().item()
    said = f"the probe images range over [{lo:.3g}, {hi:.3g}] but mean={tuple(mean)}, std={tuple(std)}"
    if lo >= 0 and hi > 1.5 and (x == x.round()).float().mean().item() >= 0.9:
        return (f"{said}: they look like [0, 255] pixels; scale and normalise them "
                "(v2.ToDtype(torch.float32, scale=True), then v2.Normalize(mean, std))")
    identity = all(abs(m) < 1e-6 for m in mean) and all(abs(s - 1) < 1e-6 for s in std)
    if lo >= 0 and hi <= 1 and not identity:
        return (f"{said}: they look like un-normalised [0, 1] pixels; normalise them (v2.Normalize(mean, std)), "
                "or pass mean=[0, 0, 0], std=[1, 1, 1] if the model takes [0, 1] pixels")
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    pixels = x * s + m  # not utils.unnormalize: its clamp would hide the overshoot
    outside = ((pixels < -PIXEL_MARGIN) | (pixels > 1 + PIXEL_MARGIN)).float().mean().item()
    if outside > 0.01:
        return (f"{said}: un-normalised with them, {outside:.0%} of the pixel values fall outside [0, 1] (range "
                f"[{pixels.min().item():.3g}, {pixels.max().item():.3g}]); pass the mean/std the images were "
                "normalised with")
    return None
