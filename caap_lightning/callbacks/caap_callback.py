"""CAAPCallback: CAAP maps (and other methods' maps) of a fixed probe batch and their metrics, logged as the model trains."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Any, Dict, List, Optional, Tuple, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from caap_lightning._lightning import is_overridden
from caap_lightning.attribution import cnn, registry, vit
from caap_lightning.callbacks import calibration, figures
from caap_lightning.callbacks.arguments import (
    DEFAULT_CONSTRUCTION,
    DEFAULT_PROBE_IMAGES,
    DEFAULT_SWAP_IMAGES,
    DEFAULT_WINDOW,
    check_caap_settings,
    check_family_settings,
    check_methods,
    check_metrics,
    check_prefix,
    check_run_settings,
    check_sizes,
    check_unique_prefix,
    warn_if_never_run,
)
from caap_lightning.callbacks.building import build_methods, cannot_attribute, find_model, verify_classifier
from caap_lightning.callbacks.distributed import ProbeShard, classify_shard, gather_shards
from caap_lightning.callbacks.drawing import announce_if_slow, display_name, log_check_images
from caap_lightning.callbacks.errors import SKIPPED, CheckSteps, attempt
from caap_lightning.callbacks.meters import SKILL, CheckMeters
from caap_lightning.callbacks.metric_table import LoggedScalar, check_scorable_table, logged_table, map_image_values
from caap_lightning.callbacks.metric_table import resolve_metrics
from caap_lightning.callbacks.metric_table import unscored_reasons
from caap_lightning.callbacks.normalization import check_pixel_range, resolve_normalization
from caap_lightning.callbacks.probe import ProbeKeys, first_samples
from caap_lightning.callbacks.probe_source import eval_source, probe_source, probe_source_key, take_probe, warn_if_short
from caap_lightning.callbacks.probe_source import check_labels_for, class_names_of, own_probe, probe_size, runs_swaps
from caap_lightning.callbacks.probe_source import swap_views
from caap_lightning.callbacks.probe_source import warn_if_few_swap_images
from caap_lightning.callbacks.result import ProbeResult
from caap_lightning.callbacks.strategies import evidence_floor
from caap_lightning.datamodules.base import ProbeBatch

CLASSIFYING = "classifying"  # the check's steps, as the ranks agree on their failures
TESTING = "model tests"


class CAAPCallback(Callback):
    """Attribution maps of a fixed probe batch, their metrics and the model tests, at the end of validation.

    At the end of every ``every_n_epochs``-th validation of a fit, and of every ``validate``/``test`` run, it
    attributes a probe batch (taken in ``setup``) with each of ``methods``, logs their metrics, runs the model
    tests once (the swap ratios :class:`SpuriousCueMonitor` watches), draws a heatmap grid and publishes the
    check as :attr:`last`, a :class:`ProbeResult`; :attr:`logged` lists every scalar it logs, from ``setup``
    on. The probe, the model, every argument and logged name: ``docs/callbacks.md`` and ``docs/metrics.md``.

    Args:
        every_n_epochs: check after the validation of every n-th epoch of a fit.
        num_images: the probe batch the maps explain (each rank attributes a share under DDP).
        swap_images: the least size of the swap ratios' probe, whose first ``num_images`` the maps explain (warned
            where the source has fewer); ``None``: up to ``DEFAULT_SWAP_IMAGES``, as many as the source has.
        probe: the probe itself (images, a tuple, a dict, a ``ProbeBatch`` or a ``Dataset``); else the
            datamodule's ``probe_batch(n)``, else a seeded draw across the validation (or test) dataloader's data.
        probe_keys: the key names of a dict batch's fields, where the defaults do not cover them.
        mean, std: the images' normalisation; else the datamodule's, else the model's ``pretrained_cfg``.
        head: attribute path of the head of a ViT built with ``num_classes=0``, where it is not found alone.
        methods: which attribution methods, by registry name; the first is the primary one (default ``["caap"]``).
        method_kwargs: constructor arguments per method other than ``caap``.
        layer_cutoff, selection, blank, construction, window, grid, score: CAAP's settings (``layer_cutoff="auto"``
            calibrates it at the first check; ``construction=None`` takes the model family's default).
        metrics: the map metrics and model tests to run; ``None`` takes every one the probe's masks allow but
            the insertion ratios.
        target: the class each map explains: ``"predicted"`` (the model's top-1) or ``"label"``.
        insertion_deletion_steps: steps of each Insertion/Deletion curve (``None``: one patch per step).
        log_images: log the heatmap grid and the curve figure.
        max_images_logged: rows of the heatmap grid.
        on_error: ``"warn"`` reports a failing step and lets training go on; ``"raise"`` stops.
        precision: ``"trainer"`` runs the check's forwards as the validation steps run, ``"32"`` without autocast.
        prefix: the first part of every logged name; give each instance of a Trainer its own.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = DEFAULT_PROBE_IMAGES,
        swap_images: Optional[int] = None,
        probe: Any = None,
        probe_keys: Optional[Dict[str, Union[str, List[str]]]] = None,
        mean: Optional[List[float]] = None,
        std: Optional[List[float]] = None,
        head: Optional[str] = None,
        methods: Optional[List[str]] = None,
        method_kwargs: Optional[Dict[str, Dict[str, Any]]] = None,
        layer_cutoff: Optional[Union[int, str]] = None,
        selection: str = "box1",
        blank: str = "white",
        construction: Optional[str] = None,
        window: Optional[int] = None,
        grid: Optional[Union[int, Tuple[int, int]]] = None,
        score: str = "probability",
        metrics: Optional[List[str]] = None,
        target: str = "predicted",
        insertion_deletion_steps: Optional[int] = 16,
        log_images: bool = True,
        max_images_logged: int = 8,
        on_error: str = "warn",
        precision: Union[str, int] = "trainer",
        prefix: str = "caap",
    ) -> None:
        super().__init__()
        precision = str(precision)  # 32, as Lightning's own precision flag accepts it
        check_sizes(every_n_epochs, num_images, swap_images, max_images_logged)
        check_caap_settings(layer_cutoff, construction, window, selection, blank, score)
        check_run_settings(insertion_deletion_steps, target, on_error, precision)
        check_prefix(prefix)
        check_metrics(metrics)
        methods = ["caap"] if methods is None else list(methods)
        method_kwargs = {name: dict(kwargs) for name, kwargs in (method_kwargs or {}).items()}
        check_methods(methods, method_kwargs, layer_cutoff)
        self.__init_methods(head, methods, method_kwargs, layer_cutoff, selection, blank, construction, window, grid,
                            score)
        self.__init_outputs(every_n_epochs, metrics, target, insertion_deletion_steps, log_images, max_images_logged,
                            on_error, precision, prefix)
        self.__init_probe(num_images, swap_images, probe, probe_keys, mean, std)
        self.__init_state()

    def __init_methods(self, head: Optional[str], methods: List[str], method_kwargs: Dict[str, Dict[str, Any]],
                       layer_cutoff: Any, selection: str, blank: str, construction: Optional[str],
                       window: Optional[int], grid: Any, score: str) -> None:
        self.head, self.methods, self.method_kwargs = head, methods, method_kwargs
        self.layer_cutoff, self.selection, self.blank, self.score = layer_cutoff, selection, blank, score
        self._construction, self._window = construction, window
        self.grid = None if grid is None else cnn.check_grid(grid)

    def __init_outputs(self, every_n_epochs: int, metrics: Optional[List[str]], target: str,
                       insertion_deletion_steps: Optional[int], log_images: bool, max_images_logged: int,
                       on_error: str, precision: str, prefix: str) -> None:
        self.every_n_epochs, self.metrics = every_n_epochs, None if metrics is None else list(metrics)
        self.target, self.insertion_deletion_steps = target, insertion_deletion_steps
        self.log_images, self.max_images_logged = log_images, max_images_logged
        self.on_error, self.precision, self.prefix = on_error, precision, prefix

    def __init_probe(self, num_images: int, swap_images: Optional[int], probe: Any, probe_keys: Any,
                     mean: Optional[List[float]], std: Optional[List[float]]) -> None:
        self.probe_keys = ProbeKeys.from_mapping(probe_keys)
        self.num_images, self.swap_images = num_images, DEFAULT_SWAP_IMAGES if swap_images is None else swap_images
        self._swap_images_given = swap_images is not None  # a size asked for, which the source should have
        self.user_mean = None if mean is None else tuple(float(m) for m in mean)
        self.user_std = None if std is None else tuple(float(s) for s in std)
        size = probe_size(self.metrics, num_images, self.swap_images)
        self.user_probe = None if probe is None else own_probe(probe, size, self.probe_keys)

    def __init_state(self) -> None:
        self.history: List[Dict[str, Any]] = []
        self.last: Optional[ProbeResult] = None
        self.probe: Optional[ProbeBatch] = None  # the probe batch the maps explain, on the CPU
        self.swap_probe: Optional[ProbeBatch] = None  # the swap ratios' probe (None where none runs), on the CPU
        self._swap_views: Dict[str, torch.Tensor] = {}  # each swap test's swapped images of it, made once
        self.class_names: List[str] = []
        self.mean: Optional[tuple] = None
        self.std: Optional[tuple] = None
        self.active_metrics: List[str] = []
        self.logged: Dict[str, LoggedScalar] = {}  # every scalar logged at a check, by tag (filled in setup)
        self._model: Optional[nn.Module] = None  # the ViT or CNN attributed
        self._family: Optional[str] = None  # its registry.family_of: "vit" or "cnn"
        self._classifier: Optional[nn.Module] = None  # the model (and that head): what the metrics' forwards run
        self._methods: Dict[str, Any] = {}  # name -> the attribution method, in `methods` order
        self._meters: Optional[CheckMeters] = None  # each method's map metrics and the model tests
        self._probe_for: Any = None  # probe_source_key of the probe's source (compared with `is`)
        self._built_for: Optional[tuple] = None  # the model, head and settings the methods were built for
        # layer_cutoff="auto": the sweep's rows and the cutoff it picked (kept in the checkpoint).
        self.calibration: Optional[List[Dict[str, float]]] = None
        self.calibrated_cutoff: Optional[int] = None

    @property
    def state_key(self) -> str:
        # Several instances in one Trainer each keep their own state, as EarlyStopping's do.
        return self._generate_state_key(prefix=self.prefix, methods=self.methods)

    @property
    def construction(self) -> Optional[str]:
        """The construction given, else the attributed model family's default (``None`` until setup finds the model)."""
        if self._construction is not None or self._family is None:
            return self._construction
        return DEFAULT_CONSTRUCTION[self._family]

    @construction.setter
    def construction(self, value: Optional[str]) -> None:
        self._construction = value

    @property
    def window(self) -> Optional[int]:
        """The window given, else ``DEFAULT_WINDOW`` on a ViT (``None`` on a CNN, which has none, and before setup)."""
        if self._window is not None or self._family != "vit":
            return self._window
        return DEFAULT_WINDOW

    @window.setter
    def window(self, value: Optional[int]) -> None:
        self._window = value

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and eval_source(trainer, pl_module, "fit") is None:
            # Nothing to check in this fit: say so instead of failing on a probe it would never use.
            warn_if_never_run(trainer, self.every_n_epochs, has_validation=False)
            return
        check_unique_prefix(trainer, CAAPCallback, self.prefix,
                            "(e.g. CAAPCallback(prefix='caap_gradcam', methods=['gradcam'])) so their scalars do not collide")
        self._take_probe(trainer, pl_module, stage)
        if not is_overridden("configure_model", pl_module):  # else the model exists from on_fit_start on
            self._build(trainer, pl_module)
        if stage == "fit":
            warn_if_never_run(trainer, self.every_n_epochs, has_validation=True)
        if self.log_images and not figures.image_capable(trainer):
            rank_zero_warn(
                "CAAPCallback: the Trainer's loggers cannot show images "
                f"({', '.join(type(lg).__name__ for lg in trainer.loggers) or 'no logger'}); the heatmap grids "
                f"and curves are saved as {figures.describe_destinations(trainer)}."
            )

    def _take_probe(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """The probe (and swap probe) from the first source there is, once per datamodule, and the metrics it allows."""
        if self.num_images < trainer.world_size:
            raise ValueError(f"num_images={self.num_images} is below the {trainer.world_size} processes; raise num_images")
        source = probe_source(trainer, pl_module, stage, self.user_probe)
        if self.probe is not None and probe_source_key(source) is self._probe_for:
            return  # the same source: validate/test with other loaders, or a new fit on other data, take theirs
        size = probe_size(self.metrics, self.num_images, self.swap_images)
        taken = take_probe(trainer, source, size, self.probe_keys)
        warn_if_short(taken, self.num_images)
        self.probe = check_labels_for(self.target, first_samples(taken, self.num_images))
        self.active_metrics = resolve_metrics(self.metrics, self.probe, len(taken))
        self.swap_probe = taken if runs_swaps(self.active_metrics) else None
        self._swap_views = swap_views(self.active_metrics, self.swap_probe)
        if self.swap_probe is not None and self._swap_images_given:
            warn_if_few_swap_images(len(taken), self.swap_images)
        self.class_names = class_names_of(trainer.datamodule)
        self.logged = logged_table(self.methods, self.active_metrics, self.tag, self.probe, self.swap_probe)
        check_scorable_table(self.logged)
        self._probe_for = probe_source_key(source)
        self._built_for = None

    def _build(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find the model and (re)build the methods and meters when it, or a build setting, changed."""
        model, head = find_model(pl_module, self.head)
        try:
            self._family = registry.family_of(model)
            check_family_settings(self._family, self._construction, self.grid, self._window, self.layer_cutoff)
        except ValueError as exc:
            raise cannot_attribute(pl_module, model, exc) from exc
        # What the built methods depend on: setting e.g. `callback.construction` between runs rebuilds them.
        key = (id(model), id(head), tuple(self.methods), self.layer_cutoff, self.selection, self.blank,
               self.construction, self.window, self.grid, self.score)
        if self._built_for == key:
            return
        try:
            self.mean, self.std, message = resolve_normalization(self.user_mean, self.user_std, trainer.datamodule,
                                                                 pl_module, model)
        except ValueError as exc:
            raise cannot_attribute(pl_module, model, exc) from exc
        if message and self._built_for is None:
            rank_zero_info(f"CAAPCallback: {message}")
        self._methods = build_methods(pl_module, self.methods, model, head, self._family, self._caap_settings,
                                      self.method_kwargs, self.probe.images)
        # A CNN is its own classifier; a ViT's needs the module's head where it is headless.
        classifier = vit.Classifier(model, head) if self._family == "vit" else model
        verify_classifier(pl_module, model, classifier, self.probe, self.mean, self.std, self.head,
                          warn=self._built_for is None)
        if self._built_for is None and (warning := check_pixel_range(self.probe.images, self.mean, self.std)):
            rank_zero_warn(f"CAAPCallback: {warning}")
        self._model, self._classifier = model, classifier
        self._meters = CheckMeters(self.methods, self.active_metrics, self._classifier,
                                   self._step_pixels(tuple(self.probe.images.shape[-2:])), self.log_images, self.probe)
        self._built_for = key

    @property
    def _caap_settings(self) -> Dict[str, Any]:
        # "auto" starts at the middle cutoff until calibrate_cutoff picks one (or a resume restores it).
        cutoff = self.calibrated_cutoff if self.layer_cutoff == "auto" else self.layer_cutoff
        # relative: the maps show the evidence against the blank's own score, what the mass metrics read.
        return dict(layer_cutoff=cutoff, selection=self.selection, blank=self.blank, construction=self.construction,
                    window=self.window, grid=self.grid, score=self.score, mean=self.mean, std=self.std, relative=True)

    def tag(self, method: str, scalar: str) -> str:
        """The logged name of ``method``'s ``scalar``: ``<prefix>/<scalar>`` for the first method, else
        ``<prefix>/<method>/<scalar>``."""
        return f"{self.prefix}/{scalar}" if method == self.methods[0] else f"{self.prefix}/{method}/{scalar}"

    @property
    def logged_metrics(self) -> List[str]:
        """The scalars this callback logs with the methods and metrics in use (known after ``setup``)."""
        skill = [self.tag(self.methods[0], SKILL)] if self.swap_probe is not None else []
        return [*self.logged, *skill, f"{self.prefix}/seconds"]

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A model that ``configure_model`` builds exists from here on: found and checked before the first check."""
        if self.probe is not None and self._built_for is None:
            self._build(trainer, pl_module)

    on_validation_start = on_test_start = on_fit_start  # the same for a validate or test run

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
        caap = self._methods["caap"]
        step = self._step_pixels(tuple(self.probe.images.shape[-2:]))
        with forward_context(trainer, self.precision):
            rows = attempt(trainer, self.on_error, "CAAPCallback: calibrating layer_cutoff", trainer.current_epoch,
                           calibration.sweep_cutoffs, trainer, caap, self._model, self.probe, self.target == "label",
                           step, pl_module.device, skipped=f"the cutoff stays at the middle one ({caap.layer_cutoff})")
        self.calibrated_cutoff = caap.layer_cutoff = calibration.pick_cutoff(trainer, rows, caap.layer_cutoff)
        self.calibration = rows
        if rows is not None:
            calibration.report_sweep(trainer, self.prefix, rows, self.calibrated_cutoff, caap.depth, len(self.probe),
                                     log_step(trainer))

    def _step_pixels(self, size: tuple) -> Optional[int]:
        """Pixels per Insertion/Deletion step: ``insertion_deletion_steps`` steps per curve.

        ``None``: one patch of a ViT (``None`` here: the metric reads it), one image row of a CNN (RISE's choice
        for CNNs, as ``ConvCAAP.calibrate``'s).
        """
        steps = self.insertion_deletion_steps
        if steps is None:
            return None if self._family == "vit" else size[1]
        return math.ceil(size[0] * size[1] / steps)

    # ------------------------------------------------------------------ the check
    def run_check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Optional[ProbeResult]:
        """Attribute the probe batch, run the model tests, compute and log the metrics; ``None`` if it failed
        (``on_error="warn"``)."""
        epoch, step, stage = trainer.current_epoch, log_step(trainer), trainer_stage(trainer)
        steps = self._check_steps(trainer, pl_module)
        # The model is looked up again: a module swapped during the fit (an averaged copy) is attributed fresh.
        if not steps.attempt("finding the model to attribute", self._model_found, trainer, pl_module):
            return None
        self.calibrate_cutoff(trainer, pl_module)  # layer_cutoff="auto": the first check picks it
        start = announce_if_slow(self)
        with forward_context(trainer, self.precision):
            shard = self._classify(steps, pl_module)
            if shard is None:
                return None
            done = steps.agree(self._attribute_and_test(steps, pl_module, shard),
                               [*self.methods, *([TESTING] if self._meters.model_tests else [])])
        try:
            if self.methods[0] not in done and TESTING not in done:
                return None
            result = steps.attempt("computing the metrics", self._gather_result, trainer, shard, done, epoch, step, stage)
        finally:
            self._meters.reset()
        if result is not None and self.log_images and trainer.is_global_zero:
            steps.attempt("logging the heatmaps", log_check_images, trainer, self.prefix, result, self.methods[0],
                          self.max_images_logged)
        if result is not None:
            self._log_result(pl_module, result, time.perf_counter() - start)
        return result

    def _check_steps(self, trainer: L.Trainer, pl_module: L.LightningModule) -> CheckSteps:
        titles = {name: display_name(name) for name in self.methods}
        titles.update({CLASSIFYING: "classifying the probe images", TESTING: "the model tests"})
        consequences = {name: _consequence(name, name == self.methods[0]) for name in titles}
        return CheckSteps(trainer, self.on_error, "CAAPCallback", titles, consequences, pl_module.device)

    def _model_found(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        self._build(trainer, pl_module)
        return True

    def _classify(self, steps: CheckSteps, pl_module: L.LightningModule) -> Optional[ProbeShard]:
        """This rank's share of the probe, classified; ``None`` on every rank where any rank failed."""
        shard = steps.attempt("classifying the probe images", classify_shard, pl_module.trainer, self._classifier,
                              self.probe, self.swap_probe, self.target == "label", pl_module.device,
                              self._swap_views)
        return steps.agree({} if shard is None else {CLASSIFYING: shard}, [CLASSIFYING]).get(CLASSIFYING)

    def _attribute_and_test(self, steps: CheckSteps, pl_module: L.LightningModule, shard: ProbeShard) -> Dict[str, Any]:
        """Each method's maps of this rank's share (its metric updates with them), then the model tests, on their own:
        a failing method leaves the model tests running, and the reverse."""
        done: Dict[str, Any] = {}
        for name in self.methods:
            maps = steps.attempt(f"computing the {display_name(name)} maps and metric updates", self._attribute_shard,
                                 name, shard, step=name)
            if maps is None and name == self.methods[0]:
                break
            if maps is not None:
                done[name] = maps
        if self._meters.model_tests and steps.attempt("running the model tests", self._meters.test_model, shard,
                                                      step=TESTING):
            done[TESTING] = True
        return done

    def _attribute_shard(self, name: str, shard: ProbeShard) -> torch.Tensor:
        """``name``'s maps of this rank's share of the probe; updates that method's metric states."""
        # Gradient methods turn autograd back on themselves, inside Lightning's inference mode too.
        maps = self._methods[name].attribute(shard.images, target=shard.targets).float()
        self._meters.update(name, maps, shard)
        return maps

    def _gather_result(self, trainer: L.Trainer, shard: ProbeShard, done: Dict[str, Any], epoch: int, step: int,
                       stage: str) -> ProbeResult:
        """The synced metric values and the shards gathered into one result for the whole probe."""
        maps, n = {name: done[name] for name in self.methods if name in done}, len(self.probe)
        sizes = {tag: len(entry.probe) for tag, entry in self.logged.items()}
        metrics, curves, tested = self._meters.compute(list(maps), TESTING in done, self.tag, self.methods[0], sizes,
                                                       trainer.world_size)
        method_maps = {name: gather_shards(trainer, m, n) for name, m in maps.items()}
        finite = trainer.strategy.reduce_boolean_decision(shard.finite, all=True)
        unscored = unscored_reasons(self.logged, metrics, list(maps), TESTING in done, finite)
        return ProbeResult(
            epoch=epoch, step=step, stage=stage, metrics=metrics,
            targets=gather_shards(trainer, shard.targets, n).long(), scores=gather_shards(trainer, shard.scores, n),
            method_maps=method_maps, probe=self.probe, swap_probe=self.swap_probe, mean=tuple(self.mean),
            std=tuple(self.std), class_names=list(self.class_names), method_curves=curves,
            map_image_values=functools.partial(map_image_values, method_maps, self.probe, list(self.active_metrics),
                                               self.tag),
            model_test_image_values=tested, unscored=unscored,
            map_evidence={name: evidence_floor(name, self.score) for name in method_maps},
        )

    def _log_result(self, pl_module: L.LightningModule, result: ProbeResult, seconds: float) -> None:
        result.metrics[f"{self.prefix}/seconds"] = seconds
        for name, value in result.metrics.items():
            # Values are synced already; "max" makes the seconds the longest rank's time.
            pl_module.log(name, value, sync_dist=True, reduce_fx="max")
        self.last = result
        self.history.append({"epoch": result.epoch, "step": result.step, "stage": result.stage, **result.metrics})


def forward_context(trainer: L.Trainer, precision: str) -> Any:
    """The autocast of the Trainer's validation steps (``precision="trainer"``), else none.

    Lightning enters it around each ``validation_step`` only, not around epoch-end hooks, so the check enters it.
    """
    return contextlib.nullcontext() if precision == "32" else trainer.precision_plugin.val_step_context()


def _consequence(step: str, primary: bool) -> str:
    """What a failing step of the check skips."""
    if step == TESTING:
        return "the model tests are left out of this check"
    if step == CLASSIFYING:
        return SKIPPED
    return "its maps and their metrics are skipped at this check" if primary else "its metrics are left out of this check"


def trainer_stage(trainer: L.Trainer) -> str:
    """``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``: the Trainer function running now."""
    return trainer.state.fn.value if trainer.state.fn is not None else "fit"


def log_step(trainer: L.Trainer) -> int:
    """The step Lightning gives the scalars logged now, so that images line up with them in TensorBoard."""
    # LearningRateMonitor reads the same counter.
    return trainer.fit_loop.epoch_loop._batches_that_stepped
