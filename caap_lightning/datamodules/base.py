"""The shared base of every datamodule: joint image/mask transforms, loaders and the probe batch."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import lightning as L
import torch
import torchvision.transforms.v2 as v2
from torch.utils.data import DataLoader, Dataset, Subset
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


class MaskedImageDataModule(L.LightningDataModule):
    """Train/val/test loaders of :class:`ProbeBatch` and a fixed, seeded ``probe_batch(n)``.

    Subclasses set ``num_classes`` and implement :meth:`build_sources`, returning the raw
    train/val/test sources (see :class:`TransformedDataset`); the base applies the transforms,
    the same geometric transform to the image and its masks. The probe set is a seeded sample
    of the validation set with the evaluation transform.
    """

    num_classes: int

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
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.sources()[0], self.train_transform(), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.sources()[1], self.eval_transform(), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.sources()[2], self.eval_transform(), shuffle=False)

    def probe_batch(self, n: int) -> ProbeBatch:
        """``n`` validation images in a fixed seeded order: the same ``n`` gives the same batch."""
        source = self.sources()[1]
        if not 1 <= n <= len(source):
            raise ValueError(f"probe_batch needs 1 <= n <= {len(source)} (the validation set), got n={n}")
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(self.seed))[:n]
        dataset = TransformedDataset(Subset(source, order.tolist()), self.eval_transform())
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
