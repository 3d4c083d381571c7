"""CAAPCallback: CAAP maps (and other methods' maps) of a fixed probe batch and their metrics, logged as the model trains."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from caap_lightning.attribution import registry
from caap_lightning.attribution.blanks import BLANK_KINDS
from caap_lightning.attribution.caap import CAAP, CONSTRUCTIONS
from caap_lightning.attribution.selection import SELECTIONS
from caap_lightning.attribution.vit import check_images
from caap_lightning.callbacks import figures
from caap_lightning.metrics import AUPR, AttributionMass, InsertionDeletion, PointingGame
from caap_lightning.utils import eval_mode, model_normalization, unnormalize, upsample_maps

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
PRECISIONS = ("trainer", "32")
PREFIX = "caap/"
# Heatmap-grid column titles of the attribution methods (others: the method's name).
COLUMN_TITLES = {"caap": "CAAP (A - A_blank)"}


class CheckFailed(Exception):
    """A step of a check failed and was reported (``on_error="warn"``); the step is skipped."""


@dataclass
class ProbeResult:
    """One check on the whole probe batch (gathered across ranks, identical on every rank)."""

    epoch: int
    step: int
    metrics: Dict[str, float]
    targets: torch.Tensor  # the class each map explains, (n,)
    scores: torch.Tensor  # the model's probability of the target, (n,)
    method_maps: Dict[str, torch.Tensor]  # the patch maps of every method that succeeded, primary first
    method_curves: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)  # their mean ins/del curves

    @property
    def maps(self) -> torch.Tensor:
        """The primary method's patch maps (CAAP's: relative, ``A - A_blank``), ``(n, gh, gw)``."""
        return next(iter(self.method_maps.values()))

    @property
    def curves(self) -> Dict[str, torch.Tensor]:
        """The primary method's mean insertion/deletion curves (empty without that metric)."""
        return next(iter(self.method_curves.values()), {})


@dataclass
class _ProbeShard:
    """This rank's share of the probe batch on the device, with the classes its maps explain."""

    images: torch.Tensor
    masks: Dict[str, torch.Tensor]  # "masks" and "cue_masks", where the probe has them
    targets: torch.Tensor
    scores: torch.Tensor


class CAAPCallback(Callback):
    """Attribution maps of a fixed probe batch and their metrics, at the end of validation.

    The probe batch (``datamodule.probe_batch(num_images)``) is taken once, in ``setup``. At the
    end of every ``every_n_epochs``-th validation of a fit, and of every ``validate``/``test``
    run, the callback attributes the probe images with each of ``methods`` (CAAP alone by
    default) and logs, per method, each metric as a scalar. The first method is the primary
    one: its scalars are ``caap/<scalar>`` (e.g. ``caap/insdel``, ``caap/cue_mass_ratio``, what
    :class:`SpuriousCueMonitor` watches); every further method's are
    ``caap/<method>/<scalar>`` (e.g. ``caap/gradcam/insdel``). It also logs ``caap/seconds``
    (the whole check's wall time), a heatmap grid with one overlay column per method
    (``caap/heatmaps``) and the mean Insertion/Deletion curves of every method
    (``caap/insertion_deletion``). Under DDP each rank attributes its share of the probe batch,
    the metrics sync, and rank zero draws the images. The history of metric values survives a
    resume from checkpoint.

    The model attributed is ``pl_module.get_attribution_model()`` if it exists, else
    ``pl_module.model``, else ``pl_module`` itself: a timm ``VisionTransformer`` CAAP supports.

    Args:
        every_n_epochs: run after the validation of every n-th epoch of a fit.
        num_images: size of the probe batch (each rank attributes a share under DDP).
        methods: *which* attribution methods, by registry name (see
            :func:`~caap_lightning.attribution.registry.available_methods`: ``caap``, ``gradcam``,
            ``rollout``, ``tattr``, ``input_x_gradient``, ``simple_insertion``,
            ``simple_deletion``, ``occlusion``, ``random``); the first is the primary one.
            Default ``["caap"]``. CAAP's maps are relative (``A - A_blank``), the others' as the
            method returns them.
        method_kwargs: constructor arguments per method other than ``caap``, e.g.
            ``{"simple_insertion": {"batch_size": 32}}``. Methods that take ``mean``/``std``
            get the data's normalisation unless given here.
        layer_cutoff, selection, blank: CAAP's settings (see :class:`~caap_lightning.CAAP`).
            ``layer_cutoff="auto"`` picks it once, at the first check, with :meth:`CAAP.calibrate`
            on the probe batch: the cutoff sweep ``k = 0..L`` by InsDel, with the check's
            Insertion/Deletion steps. The first check rather than the fit's start, because a
            fine-tune's new head is untrained at the start and the sweep would rank noise. The
            sweep costs about ``L + 1`` checks, once; its table is logged as
            ``caap/layer_cutoff_sweep`` (text) and the pick survives a resume.
        construction: *how* CAAP computes its maps, not which methods run: ``"windowed"`` (the
            default here: also recomputes the blank tokens within ``window`` patches of each
            patch), ``"parallel"`` (exact, batched, CAAP's own default), ``"efficient"``
            (E-CAAP, approximate) or ``"standard"`` (textbook activation patching, one forward
            per patch). ``windowed`` with ``window=2`` closes most of the gap to ``standard`` at
            about 5x ``parallel``'s time per map (``benchmarks/results/quality.md``); on the demo
            the whole check then costs about 14% of an epoch, against 10% with ``parallel``
            (``benchmarks/results/callback-overhead.md``).
        window: radius, in patches, of the recomputed window of ``construction="windowed"``.
        metrics: any of ``aupr_fg``, ``aupr_bg``, ``pointing_game``, ``insertion_deletion``,
            ``background_mass``, ``background_mass_ratio``, ``cue_mass``, ``cue_mass_ratio``;
            ``None`` takes every metric the probe batch's masks allow. Mass metrics read the
            map's positive part; ``*_ratio`` divides by the region's share of the image.
        target: the class each map explains: ``"predicted"`` (the model's top-1) or ``"label"``.
        insertion_deletion_steps: steps of each Insertion/Deletion curve (``ceil(H * W / steps)``
            pixels each); the default 16 keeps the check cheap. ``None`` takes one patch per step,
            the benchmark protocol, at about ``num_patches / 16`` times the cost.
        log_images: log the heatmap grid and the curve figure (TensorBoard loggers).
        max_images_logged: rows of the heatmap grid.
        precision: ``"trainer"`` runs the check's forwards as the Trainer runs its validation
            steps (under ``precision="bf16-mixed"``, in bf16 autocast: on a GPU the check then
            keeps its small share of a bf16 epoch, and its maps rank the patches as fp32's do,
            Spearman above 0.9 in ``tests/gpu``); ``"32"`` runs them without autocast, so that a
            mixed-precision fit gets the float32 maps and metrics of a float32 evaluation.
        on_error: ``"warn"`` reports a failure and lets training go on: a failing primary
            method skips the check, a failing further method is left out of it (the others
            are logged). ``"raise"`` stops.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 16,
        methods: Optional[List[str]] = None,
        method_kwargs: Optional[Dict[str, Dict[str, Any]]] = None,
        layer_cutoff: Optional[Union[int, str]] = None,
        selection: str = "box1",
        blank: str = "white",
        construction: str = "windowed",
        window: int = 2,
        metrics: Optional[List[str]] = None,
        target: str = "predicted",
        insertion_deletion_steps: Optional[int] = 16,
        log_images: bool = True,
        max_images_logged: int = 8,
        on_error: str = "warn",
        precision: Union[str, int] = "trainer",
    ) -> None:
        super().__init__()
        precision = str(precision)  # 32, as Lightning's own precision flag accepts it
        if every_n_epochs < 1 or num_images < 1 or max_images_logged < 0:
            raise ValueError(
                f"need every_n_epochs >= 1, num_images >= 1 and max_images_logged >= 0; got every_n_epochs="
                f"{every_n_epochs}, num_images={num_images}, max_images_logged={max_images_logged}"
            )
        if isinstance(layer_cutoff, str) and layer_cutoff != "auto" or isinstance(layer_cutoff, int) and layer_cutoff < 0:
            raise ValueError(
                f"layer_cutoff must be an int >= 0, None (half the blocks) or 'auto' (calibrated), got {layer_cutoff!r}"
            )
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be an int >= 0 (patches around each patch), got {window!r}")
        if insertion_deletion_steps is not None and insertion_deletion_steps < 1:
            raise ValueError(f"insertion_deletion_steps must be >= 1 or None (one patch per step), got {insertion_deletion_steps}")
        for name, value, choices in (
            ("selection", selection, tuple(SELECTIONS)),
            ("blank", blank, BLANK_KINDS),
            ("construction", construction, CONSTRUCTIONS),
            ("target", target, TARGETS),
            ("on_error", on_error, ON_ERROR),
            ("precision", precision, PRECISIONS),
        ):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not one of {choices}")
        if metrics is not None:
            unknown = [m for m in metrics if m not in METRIC_MASKS]
            if unknown or len(set(metrics)) != len(metrics):
                raise ValueError(f"metrics {list(metrics)} must be distinct names from {list(METRIC_MASKS)}; unknown: {unknown}")
        methods = ["caap"] if methods is None else list(methods)
        method_kwargs = {name: dict(kwargs) for name, kwargs in (method_kwargs or {}).items()}
        check_methods(methods, method_kwargs)
        if layer_cutoff == "auto" and "caap" not in methods:
            raise ValueError(f"layer_cutoff='auto' calibrates CAAP, which is not in methods={methods}; add 'caap' or drop it")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.methods = methods
        self.method_kwargs = method_kwargs
        self.layer_cutoff = layer_cutoff
        self.selection = selection
        self.blank = blank
        self.construction = construction
        self.window = window
        self.metrics = None if metrics is None else list(metrics)
        self.target = target
        self.insertion_deletion_steps = insertion_deletion_steps
        self.log_images = log_images
        self.max_images_logged = max_images_logged
        self.on_error = on_error
        self.precision = precision

        self.history: List[Dict[str, float]] = []
        self.last: Optional[ProbeResult] = None
        self.probe: Any = None  # the full probe batch (a ProbeBatch), on the CPU
        self.class_names: List[str] = []
        self.mean: Optional[tuple] = None
        self.std: Optional[tuple] = None
        self.active_metrics: List[str] = []
        self._model: Optional[nn.Module] = None
        self._methods: Dict[str, Any] = {}  # name -> the attribution method, in `methods` order
        self._meters: Dict[str, Dict[str, Any]] = {}  # method -> metric -> meter
        self._prepared_for: Optional[tuple] = None
        # layer_cutoff="auto": the sweep's rows and the cutoff it picked (kept in the checkpoint).
        self.calibration: Optional[List[Dict[str, float]]] = None
        self.calibrated_cutoff: Optional[int] = None

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
        """Take the probe batch, resolve the metrics and build the methods; fail here on a wrong configuration."""
        datamodule = trainer.datamodule
        # What the built methods depend on: setting e.g. `callback.construction` between runs rebuilds them.
        settings = (tuple(self.methods), self.layer_cutoff, self.selection, self.blank, self.construction, self.window)
        key = (id(datamodule), id(pl_module), settings)
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
        methods: Dict[str, Any] = {}
        building: Optional[str] = None  # the method being built, named in the error
        try:
            self.mean, self.std = model_normalization(model, mean, std)
            for building in self.methods:
                methods[building] = self._build_method(building, model)
            building = None
            check_images(model, probe.images[:1])
        except ValueError as exc:
            which = "" if building is None else f" with {display_name(building)}"
            raise ValueError(
                f"CAAPCallback cannot attribute {type(pl_module).__name__} (attribution model: "
                f"{type(model).__name__}){which}: {exc} Return a supported timm VisionTransformer from "
                "get_attribution_model(), change the method's settings, or remove the callback."
            ) from exc
        self._model = model
        self._methods = methods
        self._meters = self._build_meters(model, tuple(probe.images.shape[-2:]))
        try:
            self.class_names = [str(name) for name in datamodule.class_names]
        except (AttributeError, NotImplementedError):
            self.class_names = []
        self.probe = probe
        self._prepared_for = key

    def _build_method(self, name: str, model: nn.Module) -> Any:
        """CAAP with the callback's settings, or a baseline with its ``method_kwargs`` (and the data's mean/std)."""
        if name == "caap":
            # "auto" starts at half the blocks until calibrate_cutoff picks one (or a resume restores it).
            cutoff = self.calibrated_cutoff if self.layer_cutoff == "auto" else self.layer_cutoff
            return CAAP(
                model, layer_cutoff=cutoff, selection=self.selection, blank=self.blank,
                construction=self.construction, window=self.window, mean=self.mean, std=self.std,
            )
        kwargs = dict(self.method_kwargs.get(name, {}))
        takes = inspect.signature(registry.METHODS[name]).parameters
        for arg, value in (("mean", self.mean), ("std", self.std)):
            if arg in takes:
                kwargs.setdefault(arg, value)
        return registry.get_method(name, model, **kwargs)

    def tag(self, method: str, scalar: str) -> str:
        """The logged name of ``method``'s ``scalar``: ``caap/<scalar>`` for the first method, else ``caap/<method>/<scalar>``."""
        return PREFIX + scalar if method == self.methods[0] else f"{PREFIX}{method}/{scalar}"

    def split_tag(self, tag: str) -> tuple:
        """``(method, scalar)`` of a name :meth:`tag` gives: ``caap/gradcam/insdel`` -> ``("gradcam", "insdel")``."""
        rest = tag[len(PREFIX):] if tag.startswith(PREFIX) else tag
        method, slash, scalar = rest.partition("/")
        return (method, scalar) if slash else (self.methods[0], rest)

    @property
    def logged_metrics(self) -> List[str]:
        """The scalars this callback logs with the methods and metrics in use (known after ``setup``)."""
        scalars = [s for m in self.active_metrics for s in METRIC_SCALARS[m]]
        return [self.tag(name, s) for name in self.methods for s in scalars] + [PREFIX + "seconds"]

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

    def _build_meters(self, model: nn.Module, size: tuple) -> Dict[str, Dict[str, Any]]:
        """One set of metric meters per method: the meters accumulate state between update and compute."""
        step = self._step_pixels(size)
        meters: Dict[str, Dict[str, Any]] = {}
        for method in self.methods:
            meters[method] = {}
            for name in self.active_metrics:
                if name in ("aupr_fg", "aupr_bg"):
                    meter = AUPR(region="foreground" if name == "aupr_fg" else "background")
                elif name == "pointing_game":
                    meter = PointingGame()
                elif name == "insertion_deletion":
                    # Its forwards dominate the check; on a CPU, batches of 256 run them about 1.5x faster than 64.
                    meter = InsertionDeletion(model, step=step, batch_size=256, curves=self.log_images)
                else:
                    region, _, by_area = MASS_METRICS[name]
                    meter = AttributionMass(region=region, normalize_by_area=by_area)
                meters[method][name] = meter
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
        return {"history": [dict(row) for row in self.history], "calibrated_cutoff": self.calibrated_cutoff,
                "calibration": self.calibration}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]
        if self.layer_cutoff == "auto" and state_dict.get("calibrated_cutoff") is not None:
            self.calibration = state_dict.get("calibration")
            self.calibrated_cutoff = int(state_dict["calibrated_cutoff"])
            if "caap" in self._methods:  # restored after setup built CAAP
                self._methods["caap"].layer_cutoff = self.calibrated_cutoff

    # ------------------------------------------------------------------ layer_cutoff="auto"
    def calibrate_cutoff(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """With ``layer_cutoff="auto"``, once: sweep the cutoffs on the probe batch and keep the best InsDel."""
        if self.layer_cutoff != "auto" or self.calibrated_cutoff is not None:
            return
        self.prepare(trainer, pl_module)
        caap = self._methods["caap"]
        try:
            with self._forward_context(trainer):
                rows = self.guard(
                    "CAAPCallback: calibrating layer_cutoff", trainer.current_epoch, self._sweep_cutoffs, trainer, pl_module,
                    skipped=f"the cutoff stays at half the blocks ({caap.layer_cutoff})",
                )
        except CheckFailed:
            rows = None
        # Every rank takes rank zero's pick, so that all of them attribute with the same cutoff.
        picked = caap.layer_cutoff if rows is None else max(rows, key=lambda r: r["insdel"])["layer_cutoff"]
        self.calibrated_cutoff = int(trainer.strategy.broadcast(picked, src=0))
        caap.layer_cutoff = self.calibrated_cutoff
        self.calibration = rows
        if rows is None:
            return
        lines = [f"k={r['layer_cutoff']}: InsDel {r['insdel']:.3f}" + (f", AUPR1 {r['aupr_fg']:.3f}" if "aupr_fg" in r else "")
                 for r in rows]
        rank_zero_info(
            f"CAAPCallback: layer_cutoff='auto' picked k={self.calibrated_cutoff} of 0..{caap.depth} on the "
            f"{len(self.probe)} probe images ({'; '.join(lines)})."
        )
        if trainer.is_global_zero:
            text = "\n".join(["| k | InsDel | AUPR1 |", "|---|---|---|"] + [
                f"| {r['layer_cutoff']}{' (picked)' if r['layer_cutoff'] == self.calibrated_cutoff else ''} | "
                f"{r['insdel']:.4f} | {r.get('aupr_fg', math.nan):.4f} |" for r in rows
            ])
            figures.log_text(trainer, PREFIX + "layer_cutoff_sweep", text, log_step(trainer))

    def _sweep_cutoffs(self, trainer: L.Trainer, pl_module: L.LightningModule) -> List[Dict[str, float]]:
        probe, device = self.probe, pl_module.device
        images = trainer.precision_plugin.convert_input(probe.images.to(device))
        target = probe.labels.to(device) if self.target == "label" else None
        masks = None if probe.masks is None else probe.masks.to(device)
        with eval_mode(self._model):
            return self._methods["caap"].calibrate(
                images, target=target, masks=masks, step=self._step_pixels(tuple(images.shape[-2:]))
            )

    def _step_pixels(self, size: tuple) -> Optional[int]:
        """Pixels per Insertion/Deletion step: ``insertion_deletion_steps`` steps per curve (None: one patch)."""
        steps = self.insertion_deletion_steps
        return None if steps is None else math.ceil(size[0] * size[1] / steps)

    # ------------------------------------------------------------------ the check
    def run_check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Optional[ProbeResult]:
        """Attribute the probe batch, compute and log the metrics; ``None`` if it failed (``on_error="warn"``)."""
        self.prepare(trainer, pl_module)
        self.calibrate_cutoff(trainer, pl_module)  # layer_cutoff="auto": the first check picks it
        start = time.perf_counter()
        epoch, step = trainer.current_epoch, log_step(trainer)
        primary = self.methods[0]
        shard: Optional[_ProbeShard] = None
        maps: Dict[str, torch.Tensor] = {}
        with self._forward_context(trainer):
            try:
                shard = self.guard("CAAPCallback: classifying the probe images", epoch, self._classify_shard, pl_module)
            except CheckFailed:
                pass
            for name in self.methods if shard is not None else []:
                try:
                    maps[name] = self.guard(
                        f"CAAPCallback: computing the {display_name(name)} maps and metric updates", epoch,
                        self._attribute_shard, pl_module, name, shard,
                        skipped="this check is skipped" if name == primary else "its metrics are left out of this check",
                    )
                except CheckFailed:
                    if name == primary:
                        break
        # Every rank learns which methods failed on any rank, so none waits in a collective the others skip.
        failed = torch.tensor([float(name not in maps) for name in self.methods], device=pl_module.device)
        if trainer.world_size > 1:
            failed = trainer.strategy.reduce(failed, reduce_op="sum")
        done = {name: maps[name] for name, count in zip(self.methods, failed.tolist()) if count == 0}
        if primary not in done:
            self._reset_meters()
            return None
        try:
            result = self.guard("CAAPCallback: computing the metrics", epoch, self._finish, trainer, shard, done, epoch, step)
        except CheckFailed:
            return None
        finally:
            self._reset_meters()
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

    def guard(self, what: str, epoch: int, fn: Callable, *args: Any, skipped: str = "this check is skipped") -> Any:
        """``fn(*args)``; with ``on_error="warn"`` a failure is reported and raised as :class:`CheckFailed`."""
        if self.on_error == "raise":
            return fn(*args)
        try:
            return fn(*args)
        except Exception as exc:  # a monitor must not end the training it watches
            rank_zero_warn(
                f"{what} failed at epoch {epoch} ({type(exc).__name__}: {exc}); {skipped} and training "
                "continues. Set on_error='raise' to stop on it instead."
            )
            raise CheckFailed from exc

    def _forward_context(self, trainer: L.Trainer):
        """The autocast of the Trainer's validation steps (``precision="trainer"``), else none.

        Lightning enters it around each ``validation_step`` only, not around epoch-end hooks,
        so the check enters it itself.
        """
        if self.precision == "32":
            return contextlib.nullcontext()
        return trainer.precision_plugin.val_step_context()

    def _reset_meters(self) -> None:
        for meters in self._meters.values():
            for meter in meters.values():
                meter.reset()

    def _classify_shard(self, pl_module: L.LightningModule) -> _ProbeShard:
        """This rank's share of the probe on the device, the classes its maps explain and their probabilities."""
        trainer = pl_module.trainer
        device = pl_module.device
        probe = self.probe
        index = torch.arange(len(probe))[trainer.global_rank :: trainer.world_size]
        # As Lightning does to batches: e.g. bf16 under "bf16-true", whose weights are bf16.
        images = trainer.precision_plugin.convert_input(probe.images[index].to(device))
        masks = {k: getattr(probe, k)[index].to(device) for k in ("masks", "cue_masks") if getattr(probe, k) is not None}
        with torch.no_grad(), eval_mode(self._model):
            probs = self._model(images).float().softmax(-1)
        targets = probs.argmax(-1) if self.target == "predicted" else probe.labels[index].to(device)
        return _ProbeShard(images, masks, targets, probs.gather(1, targets[:, None])[:, 0])

    def _attribute_shard(self, pl_module: L.LightningModule, name: str, shard: _ProbeShard) -> torch.Tensor:
        """``name``'s maps of this rank's share of the probe; updates that method's metric states."""
        method = self._methods[name]
        # Gradient methods turn autograd back on themselves, inside Lightning's inference mode too.
        extra = {"relative": True} if name == "caap" else {}
        maps = method.attribute(shard.images, target=shard.targets, **extra).float()
        with torch.no_grad():
            pixel_maps = upsample_maps(maps, tuple(shard.images.shape[-2:]))
            for metric, meter in self._meters[name].items():
                meter.to(pl_module.device)
                if metric == "insertion_deletion":
                    meter.update(shard.images, pixel_maps, target=shard.targets)
                else:
                    meter.update(pixel_maps, shard.masks[METRIC_MASKS[metric]])
        return maps

    def _finish(
        self, trainer: L.Trainer, shard: _ProbeShard, maps: Dict[str, torch.Tensor], epoch: int, step: int
    ) -> ProbeResult:
        """Synced metric values of each method in ``maps`` and the shards gathered into one result for the whole probe."""
        metrics: Dict[str, float] = {}
        curves: Dict[str, Dict[str, torch.Tensor]] = {}
        for name in maps:
            for metric, meter in self._meters[name].items():
                out = meter.compute()
                for scalar, key in METRIC_SCALARS[metric].items():
                    value = float(out[key])
                    # A metric with no scorable image (e.g. every mask empty) gives NaN: nothing to log.
                    if math.isfinite(value):
                        metrics[self.tag(name, scalar)] = value
                if metric == "insertion_deletion":
                    curves[name] = {k: out[f"{k}_curve"].cpu() for k in ("insertion", "deletion") if f"{k}_curve" in out}
        n = len(self.probe)
        return ProbeResult(
            epoch=epoch, step=step, metrics=metrics,
            targets=_gather_shards(trainer, shard.targets, n).long(), scores=_gather_shards(trainer, shard.scores, n),
            method_maps={name: _gather_shards(trainer, m, n) for name, m in maps.items()}, method_curves=curves,
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
        overlays = {
            COLUMN_TITLES.get(name, name): upsample_maps(maps[index].cpu(), size) for name, maps in result.method_maps.items()
        }
        return figures.heatmap_grid(
            unnormalize(probe.images[index], self.mean, self.std),
            overlays,
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
            if len(result.method_curves) > 1:
                title = f"{display_name(self.methods[0])} {title}"
            curves = {
                label if name == self.methods[0] else f"{name} {label}": curve
                for name, pair in result.method_curves.items()
                for label, curve in pair.items()
            }
            figure = figures.curves_figure(curves, title)
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


def check_methods(methods: List[str], method_kwargs: Dict[str, Dict[str, Any]]) -> None:
    """``ValueError`` for method names the registry lacks or repeats, misplaced or unknown ``method_kwargs``,
    and ``occlusion`` without captum: at construction, not mid-training."""
    available = registry.available_methods()
    unknown = [m for m in methods if m not in available]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ValueError(f"methods {methods} must be one or more distinct names from {available}; unknown: {unknown}")
    misplaced = [name for name in method_kwargs if name not in methods or name == "caap"]
    if misplaced:
        raise ValueError(
            f"method_kwargs has {misplaced}, but its keys must be methods in `methods` ({methods}) other than 'caap': "
            "CAAP takes the callback's own layer_cutoff, selection, blank, construction and window"
        )
    for name, kwargs in method_kwargs.items():
        takes = [p for p in inspect.signature(registry.METHODS[name]).parameters if p != "model"]
        wrong = [k for k in kwargs if k not in takes]
        if wrong:
            raise ValueError(
                f"method_kwargs[{name!r}] has {wrong}, which {registry.METHODS[name].__name__} does not take; it takes {takes}"
            )
    if "occlusion" in methods and importlib.util.find_spec("captum") is None:
        raise ValueError("the occlusion method needs captum, which is not installed: pip install 'caap-lightning[baselines]'")


def display_name(method: str) -> str:
    """How messages name a method: ``CAAP``, else its registry name."""
    return "CAAP" if method == "caap" else method


def log_step(trainer: L.Trainer) -> int:
    """The step Lightning gives the scalars logged now, so that images line up with them in TensorBoard."""
    # LearningRateMonitor reads the same counter.
    return trainer.fit_loop.epoch_loop._batches_that_stepped
