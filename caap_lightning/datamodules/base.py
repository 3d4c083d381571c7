"""The shared base of every datamodule: joint image/mask transforms, loaders and the probe batch."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import torch
import torchvision.transforms.v2 as v2
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import tv_tensors

from caap_lightning.utils import IMAGENET_MEAN, IMAGENET_STD

# Keys of a sample dict beside "image" and "label"; each may be absent from a dataset's samples.
MASK_KEYS = ("mask", "cue_mask")


@dataclass
class ProbeBatch:
    """A batch of normalised images with labels, and object/cue masks where the dataset has them.

    ``images`` ``(n, 3, H, W)`` float, normalised with the datamodule's ``mean``/``std``;
    ``labels`` ``(n,)`` long; ``masks`` ``(n, H, W)`` bool object (foreground) masks aligned to
    the images; ``cue_masks`` ``(n, H, W)`` bool masks of the spurious cue; ``cue_labels``
    ``(n,)`` long, the class the cue points to (cue-consistent where ``cue_labels == labels``).
    Every loader of the datamodules yields this type too.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: Optional[torch.Tensor] = None
    cue_masks: Optional[torch.Tensor] = None
    cue_labels: Optional[torch.Tensor] = None

    def to(self, device: Any, non_blocking: bool = False) -> "ProbeBatch":
        moved = {
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
        }
        return ProbeBatch(**moved)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def collate_samples(samples: Sequence[Dict[str, Any]]) -> ProbeBatch:
    """Stack sample dicts (``image``, ``label`` and optional ``mask``/``cue_mask``/``cue_label``)."""

    def stack(key: str) -> Optional[torch.Tensor]:
        values = [s.get(key) for s in samples]
        if any(v is None for v in values):
            return None
        return torch.stack([torch.as_tensor(v) for v in values])

    return ProbeBatch(
        images=stack("image"),
        labels=stack("label"),
        masks=stack("mask"),
        cue_masks=stack("cue_mask"),
        cue_labels=stack("cue_label"),
    )


class TransformedDataset(Dataset):
    """Applies one joint transform to the image and masks of each sample of a source dataset.

    The source yields dicts: ``image`` (PIL image or ``tv_tensors.Image``), ``label`` (int),
    and optionally ``mask``/``cue_mask`` (``tv_tensors.Mask``, so that geometric transforms move
    them with the image and resize them with nearest-neighbour) and ``cue_label``.
    """

    def __init__(self, source: Dataset, transform: v2.Transform):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        sample = self.transform(self.source[i])
        out = {"image": sample["image"].as_subclass(torch.Tensor), "label": int(sample["label"])}
        for key in MASK_KEYS:
            if sample.get(key) is not None:
                out[key] = sample[key].as_subclass(torch.Tensor).bool()
        if sample.get("cue_label") is not None:
            out["cue_label"] = int(sample["cue_label"])
        return out


class EpochShuffleSampler(Sampler[int]):
    """A shuffled order of ``range(length)`` that is a function of ``(seed, epoch)`` alone.

    Lightning calls :meth:`set_epoch` at the start of every epoch (as for a ``DistributedSampler``),
    so a run resumed from a checkpoint, or one that rebuilds its loaders every epoch, sees the
    order an uninterrupted run sees. Under DDP Lightning wraps it in its
    ``DistributedSamplerWrapper``, which shards the order and forwards ``set_epoch``.
    """

    def __init__(self, length: int, seed: int = 0):
        if length < 0 or seed < 0:
            raise ValueError(f"EpochShuffleSampler needs length >= 0 and seed >= 0, got length={length}, seed={seed}")
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.length).tolist())


class MaskedImageDataModule(L.LightningDataModule):
    """Train/val/test loaders of :class:`ProbeBatch` and a fixed, seeded ``probe_batch(n)``.

    Subclasses set ``num_classes`` and implement :meth:`build_sources`, returning the raw
    train/val/test sources (see :class:`TransformedDataset`); the base applies the transforms,
    the same geometric transform to the image and its masks. The probe set is a seeded sample
    of the validation set with the evaluation transform. The training order is reshuffled each
    epoch from ``(seed, epoch)`` (:class:`EpochShuffleSampler`), so a resumed run repeats nothing.
    """

    num_classes: int
    # setup decodes the first this-many probe samples (the CAAPCallback's default probe size), so a
    # broken file among them fails there; any smaller probe batch is a prefix of them.
    probe_check_size: int = 16

    def __init__(
        self,
        img_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        mean: Tuple[float, float, float] = IMAGENET_MEAN,
        std: Tuple[float, float, float] = IMAGENET_STD,
        seed: int = 0,
    ):
        super().__init__()
        if img_size < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"img_size and batch_size must be positive and num_workers >= 0, got "
                f"img_size={img_size}, batch_size={batch_size}, num_workers={num_workers}"
            )
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 channels, got mean={mean}, std={std}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy generators), got {seed}")
        self.img_size = int(img_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.seed = int(seed)
        self._sources: Optional[Tuple[Dataset, Dataset, Dataset]] = None

    @property
    def class_names(self) -> List[str]:
        raise NotImplementedError

    def build_sources(self) -> Tuple[Dataset, Dataset, Dataset]:
        """The raw (untransformed) train, validation and test sources."""
        raise NotImplementedError

    def sources(self) -> Tuple[Dataset, Dataset, Dataset]:
        if self._sources is None:
            self._sources = self.build_sources()
        return self._sources

    def setup(self, stage: Optional[str] = None) -> None:
        self.sources()
        self.check_probe_samples()

    def check_probe_samples(self) -> None:
        """Read the probe's first samples, so that a corrupt file among them fails now, not in a callback."""
        source = self.sources()[1]
        for i in self.probe_order(min(self.probe_check_size, len(source))):
            source[i]  # decodes (and checks) the sample's files; the sample itself is not kept

    # Transforms: subclasses may override; masks ride along as tv_tensors.Mask.
    def normalize_transform(self) -> List[v2.Transform]:
        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def train_transform(self) -> v2.Transform:
        return v2.Compose(
            [
                v2.ToImage(),
                v2.RandomResizedCrop(self.img_size, scale=(0.35, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                *self.normalize_transform(),
            ]
        )

    def eval_transform(self) -> v2.Transform:
        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(self.img_size, antialias=True),
                v2.CenterCrop(self.img_size),
                *self.normalize_transform(),
            ]
        )

    def _loader(self, source: Dataset, transform: v2.Transform, shuffle: bool) -> DataLoader:
        return DataLoader(
            TransformedDataset(source, transform),
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(source), self.seed) if shuffle else None,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.sources()[0], self.train_transform(), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.sources()[1], self.eval_transform(), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.sources()[2], self.eval_transform(), shuffle=False)

    def probe_order(self, n: int) -> List[int]:
        """Indices of the first ``n`` probe samples in the validation set (a seeded order)."""
        order = torch.randperm(len(self.sources()[1]), generator=torch.Generator().manual_seed(self.seed))
        return order[:n].tolist()

    def probe_batch(self, n: int) -> ProbeBatch:
        """The first ``n`` validation images of a fixed seeded order (all of them where the set has fewer): the
        same ``n`` gives the same batch, and a smaller ``n`` its first images, as a dataloader's first batch would."""
        source = self.sources()[1]
        if n < 1:
            raise ValueError(f"probe_batch needs n >= 1, got n={n}")
        n = min(n, len(source))
        dataset = TransformedDataset(Subset(source, self.probe_order(n)), self.eval_transform())
        return collate_samples([dataset[i] for i in range(n)])


def check_layout(
    dataset: str,
    root: str,
    listings: Sequence[Path],
    files_of: Callable[[Path], Iterable[Path]],
    layout: str,
    download_size: str,
) -> None:
    """Fail if a split listing or a file it lists is missing, naming them, the layout and ``download=True``."""
    missing: List[Path] = []
    for listing in listings:
        if listing.is_file():
            missing.extend(path for path in files_of(listing) if not path.is_file())
        else:
            missing.append(listing)
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"{dataset} is missing or incomplete under {str(root)!r}: no {shown}. Expected layout:\n"
            f"{layout}\nPass download=True to fetch it ({download_size})."
        )


def as_mask(array: Any) -> tv_tensors.Mask:
    """A ``(H, W)`` boolean-like array as a uint8 ``tv_tensors.Mask`` (resizable by v2 transforms)."""
    return tv_tensors.Mask(torch.as_tensor(array).to(torch.uint8))


def read_image(path: Path, mode: Optional[str] = "RGB") -> Image.Image:
    """Decode the image at ``path`` now, converted to ``mode`` (``None``: as stored).

    PIL decodes lazily, so a corrupt or truncated file would otherwise fail deep in a transform,
    mid-epoch, without its name; here it fails with a ``ValueError`` that names it.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode) if mode is not None else image.copy()
    except FileNotFoundError:
        raise
    except Exception as error:  # PIL reports a broken file as OSError, SyntaxError, ValueError, zlib.error...
        raise ValueError(f"cannot decode image {str(path)!r}, it may be corrupt or truncated: {error}") from error


def image_size(path: Path) -> Tuple[int, int]:
    """``(width, height)`` of the image at ``path`` from its header only (no pixel decoding)."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(f"cannot read the header of image {str(path)!r}, it may be corrupt: {error}") from error


def read_json(path: Path) -> Any:
    """Parse the JSON file at ``path``; a truncated or broken one fails naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{str(path)!r} is not valid JSON, it may be truncated (re-download or re-export it): {error}"
        ) from error
