"""CAAPCallback: CAAP maps and attribution metrics of a fixed probe batch, logged as the model trains."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from caap_lightning.attribution.blanks import BLANK_KINDS
from caap_lightning.attribution.caap import CAAP, METHODS
from caap_lightning.attribution.selection import SELECTIONS
from caap_lightning.attribution.vit import check_images, eval_mode
from caap_lightning.callbacks import figures
from caap_lightning.metrics import AUPR, AttributionMass, InsertionDeletion, PointingGame
from caap_lightning.utils import unnormalize, upsample_maps

# Each metric and the probe field it needs (None: no mask).
METRIC_MASKS: Dict[str, Optional[str]] = {
    "aupr_fg": "masks",
    "aupr_bg": "masks",
    "pointing_game": "masks",
    "insertion_deletion": None,
    "background_mass": "masks",
    "background_mass_ratio": "masks",
    "cue_mass": "cue_masks",
    "cue_mass_ratio": "cue_masks",
}
# Mass metrics: (region of AttributionMass, mask field, normalize_by_area).
MASS_METRICS = {
    "background_mass": ("outside", "masks", False),
    "background_mass_ratio": ("outside", "masks", True),
    "cue_mass": ("mask", "cue_masks", False),
    "cue_mass_ratio": ("mask", "cue_masks", True),
}
# The scalars each metric logs (under caap/), each read from a key of the metric's compute().
METRIC_SCALARS: Dict[str, Dict[str, str]] = {
    "aupr_fg": {"aupr_fg": "aupr", "aupr_fg_lift": "lift"},
    "aupr_bg": {"aupr_bg": "aupr", "aupr_bg_lift": "lift"},
    "pointing_game": {"pointing_game": "pointing_game"},
    "insertion_deletion": {k: k for k in ("insertion", "deletion", "insdel", "insdel_informative")},
    **{name: {name: "attribution_mass"} for name in MASS_METRICS},
}
TARGETS = ("predicted", "label")
ON_ERROR = ("warn", "raise")
PREFIX = "caap/"


class CheckFailed(Exception):
    """A step of a check failed and was reported (``on_error="warn"``); the step is skipped."""


@dataclass
class ProbeResult:
    """One check on the whole probe batch (gathered across ranks, identical on every rank)."""

    epoch: int
    step: int
    metrics: Dict[str, float]
    maps: torch.Tensor  # relative patch maps A - A_blank, (n, gh, gw)
    targets: torch.Tensor  # the class each map explains, (n,)
    scores: torch.Tensor  # the model's probability of the target, (n,)
    curves: Dict[str, torch.Tensor] = field(default_factory=dict)  # mean insertion/deletion curves


class CAAPCallback(Callback):
    """CAAP maps of a fixed probe batch and their attribution metrics, at the end of validation.

    The probe batch (``datamodule.probe_batch(num_images)``) is taken once, in ``setup``. At the
    end of every ``every_n_epochs``-th validation of a fit, and of every ``validate``/``test``
    run, the callback attributes the probe images with CAAP and logs under ``caap/``: each
    metric as a scalar, ``caap/seconds`` (the check's wall time), a heatmap grid
    (``caap/heatmaps``) and the mean Insertion/Deletion curves (``caap/insertion_deletion``).
    Under DDP each rank attributes its share of the probe batch, the metrics sync, and rank zero
    draws the images. The history of metric values survives a resume from checkpoint.

    The model attributed is ``pl_module.get_attribution_model()`` if it exists, else
    ``pl_module.model``, else ``pl_module`` itself: a timm ``VisionTransformer`` CAAP supports.

    Args:
        every_n_epochs: run after the validation of every n-th epoch of a fit.
        num_images: size of the probe batch (each rank attributes a share under DDP).
        layer_cutoff, selection, blank, method: CAAP's settings (see :class:`~caap_lightning.CAAP`).
        metrics: any of ``aupr_fg``, ``aupr_bg``, ``pointing_game``, ``insertion_deletion``,
            ``background_mass``, ``background_mass_ratio``, ``cue_mass``, ``cue_mass_ratio``;
            ``None`` takes every metric the probe batch's masks allow. Mass metrics read the
            relative map's positive part; ``*_ratio`` divides by the region's share of the image.
        target: the class each map explains: ``"predicted"`` (the model's top-1) or ``"label"``.
        insertion_deletion_steps: steps of each Insertion/Deletion curve (``ceil(H * W / steps)``
            pixels each); the default 16 keeps the check cheap. ``None`` takes one patch per step,
            the benchmark protocol, at about ``num_patches / 16`` times the cost.
        log_images: log the heatmap grid and the curve figure (TensorBoard loggers).
        max_images_logged: rows of the heatmap grid.
        on_error: ``"warn"`` reports a failing check and lets training go on; ``"raise"`` stops.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 16,
        layer_cutoff: Optional[int] = None,
        selection: str = "box1",
        blank: str = "white",
        method: str = "parallel",
        metrics: Optional[List[str]] = None,
        target: str = "predicted",
        insertion_deletion_steps: Optional[int] = 16,
        log_images: bool = True,
        max_images_logged: int = 8,
        on_error: str = "warn",
    ) -> None:
        super().__init__()
        if every_n_epochs < 1 or num_images < 1 or max_images_logged < 0:
            raise ValueError(
                f"need every_n_epochs >= 1, num_images >= 1 and max_images_logged >= 0; got every_n_epochs="
                f"{every_n_epochs}, num_images={num_images}, max_images_logged={max_images_logged}"
            )
        if layer_cutoff is not None and layer_cutoff < 0:
            raise ValueError(f"layer_cutoff must be >= 0 or None (half the blocks), got {layer_cutoff}")
        if insertion_deletion_steps is not None and insertion_deletion_steps < 1:
            raise ValueError(f"insertion_deletion_steps must be >= 1 or None (one patch per step), got {insertion_deletion_steps}")
        for name, value, choices in (
            ("selection", selection, tuple(SELECTIONS)),
            ("blank", blank, BLANK_KINDS),
            ("method", method, METHODS),
            ("target", target, TARGETS),
            ("on_error", on_error, ON_ERROR),
        ):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not one of {choices}")
        if metrics is not None:
            unknown = [m for m in metrics if m not in METRIC_MASKS]
            if unknown or len(set(metrics)) != len(metrics):
                raise ValueError(f"metrics {list(metrics)} must be distinct names from {list(METRIC_MASKS)}; unknown: {unknown}")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.layer_cutoff = layer_cutoff
        self.selection = selection
        self.blank = blank
        self.method = method
        self.metrics = None if metrics is None else list(metrics)
        self.target = target
        self.insertion_deletion_steps = insertion_deletion_steps
        self.log_images = log_images
        self.max_images_logged = max_images_logged
        self.on_error = on_error

        self.history: List[Dict[str, float]] = []
        self.last: Optional[ProbeResult] = None
        self.probe: Any = None  # the full probe batch (a ProbeBatch), on the CPU
        self.class_names: List[str] = []
        self.mean: Optional[tuple] = None
        self.std: Optional[tuple] = None
        self.active_metrics: List[str] = []
        self._caap: Optional[CAAP] = None
        self._meters: Dict[str, Any] = {}
        self._prepared_for: Optional[tuple] = None

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def attribution_model(pl_module: L.LightningModule) -> nn.Module:
        """The module CAAP explains: ``get_attribution_model()``, ``.model``, or the module itself."""
        hook = getattr(pl_module, "get_attribution_model", None)
        if callable(hook):
            return hook()
        inner = getattr(pl_module, "model", None)
        return inner if isinstance(inner, nn.Module) else pl_module

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.prepare(trainer, pl_module)

    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take the probe batch, resolve the metrics and build CAAP; fail here on a wrong configuration."""
        datamodule = trainer.datamodule
        key = (id(datamodule), id(pl_module))
        if self._prepared_for == key:
            return
        if datamodule is None or not callable(getattr(datamodule, "probe_batch", None)):
            raise ValueError(
                "CAAPCallback needs a datamodule with probe_batch(n) (every caap_lightning datamodule has one); "
                f"got {type(datamodule).__name__ if datamodule is not None else 'no datamodule'}. "
                "Pass datamodule=... to the Trainer's fit/validate/test."
            )
        if self.num_images < trainer.world_size:
            raise ValueError(f"num_images={self.num_images} is below the {trainer.world_size} processes; raise num_images")
        probe = datamodule.probe_batch(self.num_images).to("cpu")
        self.active_metrics = self._resolve_metrics(probe, type(datamodule).__name__)

        model = self.attribution_model(pl_module)
        # The blank is normalised as the probe images are: with the data's mean/std first.
        mean = getattr(datamodule, "mean", None) or getattr(pl_module, "mean", None)
        std = getattr(datamodule, "std", None) or getattr(pl_module, "std", None)
        try:
            self._caap = CAAP(
                model, layer_cutoff=self.layer_cutoff, selection=self.selection, blank=self.blank,
                method=self.method, mean=mean, std=std,
            )
            check_images(model, probe.images[:1])
        except ValueError as exc:
            raise ValueError(
                f"CAAPCallback cannot attribute {type(pl_module).__name__} (attribution model: "
                f"{type(model).__name__}): {exc} Return a supported timm VisionTransformer from "
                "get_attribution_model() or remove the callback."
            ) from exc
        self.mean, self.std = self._caap.mean, self._caap.std
        self._meters = self._build_meters(model, tuple(probe.images.shape[-2:]))
        try:
            self.class_names = [str(name) for name in datamodule.class_names]
        except (AttributeError, NotImplementedError):
            self.class_names = []
        self.probe = probe
        self._prepared_for = key

    @property
    def logged_metrics(self) -> List[str]:
        """The scalars this callback logs with the metrics in use (known after ``setup``)."""
        return [PREFIX + s for m in self.active_metrics for s in METRIC_SCALARS[m]] + [PREFIX + "seconds"]

    def _resolve_metrics(self, probe: Any, datamodule_name: str) -> List[str]:
        available = [m for m, needs in METRIC_MASKS.items() if needs is None or getattr(probe, needs) is not None]
        if self.metrics is None:
            return available
        missing = [m for m in self.metrics if m not in available]
        if missing:
            needs = sorted({METRIC_MASKS[m] for m in missing})
            raise ValueError(
                f"CAAPCallback metrics {missing} need {' and '.join(needs)}, but {datamodule_name}'s probe batch has "
                f"none; remove them from `metrics` (this data allows {available}), or leave `metrics` unset."
            )
        return list(self.metrics)

    def _build_meters(self, model: nn.Module, size: tuple) -> Dict[str, Any]:
        meters: Dict[str, Any] = {}
        steps = self.insertion_deletion_steps
        step = None if steps is None else math.ceil(size[0] * size[1] / steps)
        for name in self.active_metrics:
            if name in ("aupr_fg", "aupr_bg"):
                meters[name] = AUPR(region="foreground" if name == "aupr_fg" else "background")
            elif name == "pointing_game":
                meters[name] = PointingGame()
            elif name == "insertion_deletion":
                # Its forwards dominate the check; on a CPU, batches of 256 run them about 1.5x faster than 64.
                meters[name] = InsertionDeletion(model, step=step, batch_size=256, curves=self.log_images)
            else:
                region, _, by_area = MASS_METRICS[name]
                meters[name] = AttributionMass(region=region, normalize_by_area=by_area)
        return meters

    # ------------------------------------------------------------------ hooks
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.run_check(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_check(trainer, pl_module)

    def state_dict(self) -> Dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]

    # ------------------------------------------------------------------ the check
    def run_check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Optional[ProbeResult]:
        """Attribute the probe batch, compute and log the metrics; ``None`` if it failed (``on_error="warn"``)."""
        self.prepare(trainer, pl_module)
        start = time.perf_counter()
        epoch, step = trainer.current_epoch, log_step(trainer)
        failed = False
        try:
            shard = self.guard("CAAPCallback: computing the CAAP maps and metric updates", epoch, self._attribute_shard, pl_module)
        except CheckFailed:
            failed = True
        # Every rank learns whether any failed, so none waits in a collective the others skip.
        if trainer.world_size > 1:
            flag = torch.tensor(float(failed), device=pl_module.device)
            failed = bool(trainer.strategy.reduce(flag, reduce_op="sum") > 0)
        if failed:
            for meter in self._meters.values():
                meter.reset()
            return None
        try:
            result = self.guard("CAAPCallback: computing the metrics", epoch, self._finish, trainer, shard, epoch, step)
        except CheckFailed:
            return None
        finally:
            for meter in self._meters.values():
                meter.reset()
        if self.log_images and trainer.is_global_zero:
            try:
                self.guard("CAAPCallback: logging the heatmaps", epoch, self._log_images, trainer, result)
            except CheckFailed:
                pass
        result.metrics[PREFIX + "seconds"] = time.perf_counter() - start
        for name, value in result.metrics.items():
            # Values are synced already; "max" makes caap/seconds the longest rank's time.
            pl_module.log(name, value, sync_dist=True, reduce_fx="max")
        self.last = result
        self.history.append({"epoch": epoch, "step": step, **result.metrics})
        return result

    def guard(self, what: str, epoch: int, fn: Callable, *args: Any) -> Any:
        """``fn(*args)``; with ``on_error="warn"`` a failure is reported and raised as :class:`CheckFailed`."""
        if self.on_error == "raise":
            return fn(*args)
        try:
            return fn(*args)
        except Exception as exc:  # a monitor must not end the training it watches
            rank_zero_warn(
                f"{what} failed at epoch {epoch} ({type(exc).__name__}: {exc}); this check is "
                "skipped and training continues. Set on_error='raise' to stop on it instead."
            )
            raise CheckFailed from exc

    def _attribute_shard(self, pl_module: L.LightningModule) -> Dict[str, torch.Tensor]:
        """This rank's share of the probe: maps, targets, scores; updates the metric states."""
        trainer = pl_module.trainer
        device = pl_module.device
        rank, world = trainer.global_rank, trainer.world_size
        probe = self.probe
        index = torch.arange(len(probe))[rank::world]
        images = probe.images[index].to(device)
        masks = {k: getattr(probe, k)[index].to(device) for k in ("masks", "cue_masks") if getattr(probe, k) is not None}
        model = self._caap.model
        with torch.no_grad():
            with eval_mode(model):
                probs = model(images).float().softmax(-1)
            targets = probs.argmax(-1) if self.target == "predicted" else probe.labels[index].to(device)
            maps = self._caap.attribute(images, target=targets, relative=True)
            pixel_maps = upsample_maps(maps, tuple(images.shape[-2:]))
            for name, meter in self._meters.items():
                meter.to(device)
                if name == "insertion_deletion":
                    meter.update(images, pixel_maps, target=targets)
                else:
                    meter.update(pixel_maps, masks[METRIC_MASKS[name]])
        return {"maps": maps, "targets": targets, "scores": probs.gather(1, targets[:, None])[:, 0]}

    def _finish(self, trainer: L.Trainer, shard: Dict[str, torch.Tensor], epoch: int, step: int) -> ProbeResult:
        """Synced metric values and the shards gathered into one result for the whole probe."""
        values: Dict[str, float] = {}
        curves: Dict[str, torch.Tensor] = {}
        for name, meter in self._meters.items():
            out = meter.compute()
            values.update({scalar: float(out[key]) for scalar, key in METRIC_SCALARS[name].items()})
            if name == "insertion_deletion":
                curves = {k: out[f"{k}_curve"].cpu() for k in ("insertion", "deletion") if f"{k}_curve" in out}
        # A metric with no scorable image (e.g. every mask empty) gives NaN: nothing to log.
        metrics = {PREFIX + k: v for k, v in values.items() if math.isfinite(v)}
        full = {k: _gather_shards(trainer, v, len(self.probe)) for k, v in shard.items()}
        return ProbeResult(
            epoch=epoch, step=step, metrics=metrics, maps=full["maps"], targets=full["targets"].long(),
            scores=full["scores"], curves=curves,
        )

    # ------------------------------------------------------------------ images
    def row_title(self, i: int, result: ProbeResult) -> str:
        """``#index label -> explained class p=score`` (and the cue's class where known)."""
        probe = self.probe
        label, target = self.class_name(int(probe.labels[i])), self.class_name(int(result.targets[i]))
        title = f"#{i} {label} -> {target} p={float(result.scores[i]):.2f}"
        if probe.cue_labels is not None:
            title += f", cue: {self.class_name(int(probe.cue_labels[i]))}"
        return title

    def class_name(self, index: int) -> str:
        return self.class_names[index] if 0 <= index < len(self.class_names) else str(index)

    def draw_rows(self, rows: List[int], result: ProbeResult):
        """The heatmap grid of the given probe rows, as ``(H, W, 3)`` uint8."""
        probe = self.probe
        index = torch.as_tensor(rows, dtype=torch.long)
        size = tuple(probe.images.shape[-2:])
        return figures.heatmap_grid(
            unnormalize(probe.images[index], self.mean, self.std),
            upsample_maps(result.maps[index].cpu(), size),
            [self.row_title(i, result) for i in rows],
            masks=None if probe.masks is None else probe.masks[index],
            cue_masks=None if probe.cue_masks is None else probe.cue_masks[index],
        )

    def _log_images(self, trainer: L.Trainer, result: ProbeResult) -> None:
        rows = list(range(min(self.max_images_logged, len(self.probe))))
        if rows:
            figures.log_image(trainer, PREFIX + "heatmaps", self.draw_rows(rows, result), result.step)
        if result.curves:
            auc = {k: result.metrics.get(PREFIX + k, math.nan) for k in ("insertion", "deletion")}
            title = f"epoch {result.epoch}: insertion {auc['insertion']:.3f}, deletion {auc['deletion']:.3f}"
            figure = figures.curves_figure(result.curves, title)
            figures.log_figure(trainer, PREFIX + "insertion_deletion", figure, result.step)


def _gather_shards(trainer: L.Trainer, shard: torch.Tensor, n: int) -> torch.Tensor:
    """Reassemble per-rank shards ``probe[rank::world]`` into the whole probe's order, on the CPU."""
    world = trainer.world_size
    if world == 1:
        return shard.detach().cpu()
    size = math.ceil(n / world)
    padded = shard.new_zeros((size, *shard.shape[1:]))
    padded[: len(shard)] = shard
    gathered = trainer.strategy.all_gather(padded).cpu()  # (world, size, ...)
    out = shard.new_zeros((n, *shard.shape[1:]), device="cpu")
    for rank in range(world):
        count = len(range(rank, n, world))
        out[rank::world] = gathered[rank, :count]
    return out


def log_step(trainer: L.Trainer) -> int:
    """The step Lightning gives the scalars logged now, so that images line up with them in TensorBoard."""
    # LearningRateMonitor reads the same counter.
    return trainer.fit_loop.epoch_loop._batches_that_stepped
