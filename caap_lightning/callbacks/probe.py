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

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.metrics._checks import _bad_images, check_masks

# The label of an image whose class is not known (an images-only probe).
UNKNOWN_LABEL = -1
# ProbeBatch's fields, in its order: the order of a tuple batch's items too.
FIELDS = ("images", "labels", "masks", "cue_masks", "cue_labels")
# Seeds the probe's draw from a loader's dataset: the same images on every rank, at every check and in every run.
PROBE_SEED = 0


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
