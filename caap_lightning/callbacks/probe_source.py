"""Where CAAPCallback's probe comes from (the user's, a datamodule's ``probe_batch``, the evaluation loader), how many
images it takes, and the checks of what it took. How a source is read: ``probe.py``."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import lightning as L
import torch

from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from caap_lightning._lightning import is_overridden
from caap_lightning.callbacks.probe import (
    UNKNOWN_LABEL,
    KeysLike,
    ProbeKeys,
    check_probe,
    first_samples,
    preserved_rng,
    probe_from_dataset,
    read_probe,
    to_probe_batch,
)
from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.model_tests import MODEL_TESTS


def runs_swaps(metrics: Optional[Sequence[str]]) -> bool:
    """Whether ``metrics`` (``None``: the defaults) hold a swap ratio."""
    return metrics is None or any(m in MODEL_TESTS and MODEL_TESTS[m].kind == "swap" for m in metrics)


def swap_views(metrics: Sequence[str], swap_probe: Optional[ProbeBatch]) -> Dict[str, torch.Tensor]:
    """Each swap test of ``metrics``: its swapped images of the whole swap probe, by name (none without one)."""
    if swap_probe is None:
        return {}
    swaps = [m for m in metrics if m in MODEL_TESTS and MODEL_TESTS[m].kind == "swap"]
    return {m: MODEL_TESTS[m].swapped(swap_probe) for m in swaps}


def probe_size(metrics: Optional[Sequence[str]], num_images: int, swap_images: int) -> int:
    """Images to take from the probe's source: the maps' and, where more, the swap ratios'."""
    return max(num_images, swap_images) if runs_swaps(metrics) else num_images


def check_labels_for(target: str, probe: ProbeBatch) -> ProbeBatch:
    """``probe``, or a ``ValueError`` where ``target="label"`` meets images without labels."""
    if target == "label" and bool((probe.labels < 0).any()):
        raise ValueError(
            "CAAPCallback(target='label') explains each image's label, but the probe has images without "
            "labels; give the probe labels, or use target='predicted'"
        )
    return probe


def warn_if_short(probe: ProbeBatch, num_images: int) -> None:
    """Say once, in setup, where the probe taken is less than asked (:func:`probe_shortfall`)."""
    shortfall = probe_shortfall(probe, num_images)
    if shortfall:
        rank_zero_warn(f"CAAPCallback: {shortfall}.")


def warn_if_few_swap_images(images: int, swap_images: int) -> None:
    """The swap probe asked for is larger than the source: on few images the swap ratios are noisy."""
    if images < swap_images:
        rank_zero_warn(
            f"CAAPCallback: the swap ratios run on the {images} probe images there are, fewer than "
            f"swap_images={swap_images}; on few images they are noisy, and SpuriousCueMonitor's default "
            "threshold was chosen on larger swap probes (docs/callbacks.md). Give a larger probe where you can."
        )


def class_names_of(datamodule: Any) -> List[str]:
    """The datamodule's ``class_names``, where it has them (the heatmaps' titles), else none."""
    try:
        return [str(name) for name in datamodule.class_names]
    except (AttributeError, NotImplementedError, TypeError):
        return []


def own_probe(probe: Any, n: int, keys: ProbeKeys) -> ProbeBatch:
    """The user's ``probe`` argument as a checked ProbeBatch of at most ``n`` images, at construction."""
    batch = probe_from_dataset(probe, n, keys) if isinstance(probe, Dataset) else to_probe_batch(probe, keys)
    return check_probe(first_samples(batch, n))


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
