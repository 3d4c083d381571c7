"""The spurious-cue runs that ``spurious.py`` and ``swap_probe_size.py`` train and score.

A run is a tiny ViT fitted on the shapes or on Fashion-MNIST canvases with one cue kind at one
cue strength and seed (``RECIPES``), with ``CAAPCallback`` recording each mask regime's score
after every epoch (``EpochRecorder``). A run starts from scratch (``init="scratch"``) or, as a
user's fine-tune does, from a model first trained on clean data of the same domain
(``init="pretrained"``: ``PRETRAIN``), given a fresh head. What a run's history says is read here
too: its ground truth (``run_kind``, ``gap_epoch``, ``onset_epoch``), the monitor replayed on its
recorded scores (``replay_alarm_epoch``) and the detection counts over many runs (``detection``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning as L
import torch

from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.callbacks.meters import SKILL
from caap_lightning.callbacks.spurious_cue_monitor import DEFAULT_SCORES
from caap_lightning.model_tests import MODEL_TESTS, is_judged
from caap_lightning.datamodules import FashionCanvasDataModule, SyntheticSpuriousDataModule
from caap_lightning.datamodules.base import MaskedImageDataModule
from caap_lightning.demo import cue_accuracy
from caap_lightning.models import ViTClassifier

from harness import TINY_VIT, TINY_VIT_RECIPE, fmt, init_worker, median, percent, quiet_trainer, rounded

DATASETS = ("shapes", "fashion")
# Mask regime -> the callback metric its monitor watches by default (SpuriousCueMonitor's DEFAULT_SCORES): with
# object masks the background test, with or without cue masks; with cue masks only the cue test. These test the
# model (the same for every method); the map-based scores read a method's maps.
REGIMES = {
    "cue+object masks": "background_swap_ratio",
    "object masks only": "background_swap_ratio",
    "cue masks only": "cue_swap_ratio",
    "no masks: border ring": "border_swap_ratio",
    "no masks: surround": "surround_swap_ratio",
}
MAP_REGIMES = {
    "cue+object masks": "cue_density_ratio",
    "object masks only": "background_density_ratio",
    "no masks": "fixed_position_ratio",
}
# The same regimes watched through the swap tests' follow shares (the share of swap pairs that follow the region).
FOLLOW_REGIMES = {regime: key.replace("_ratio", "_follow_share") for regime, key in REGIMES.items()}
# What each fit's CAAPCallback runs: every model test and the map-based scores.
RUN_METRICS = (*MODEL_TESTS, *MAP_REGIMES.values())
# The swap tests' scalars ("<part>_swap_<statistic>", any statistic a results file recorded): the monitor judges
# their checks by the swap probe's skill (SKILL, its min_skill).
SWAP_PREFIXES = tuple(f"{test.part}_swap_" for test in MODEL_TESTS.values() if test.kind == "swap")
# Every score each fit records: the model tests' scalars (ratios and follow shares), the map-based scores, the skill.
RECORDED = (*(scalar for test in MODEL_TESTS.values() for scalar in test.scalars), *MAP_REGIMES.values(), SKILL)
# What the live monitor of each fit watches: the monitor's own default score with object masks.
LIVE_SCORE = DEFAULT_SCORES[0]

# Ground truth: the accuracy gap that the lead is counted against, and what makes a shortcut run and a clean control.
GAP_POINTS = 10.0
# A run follows the cue from the first epoch at which it predicts the cue's class on this share of cue-conflicting
# images (its onset); a shortcut run is one that reaches it.
SHORTCUT_RELIANCE = 40.0
CONTROL_RELIANCE = 25.0
CONTROL_ACCURACY = 85.0
# Lead target: median lead >= 0 epochs, and no alarm later than this many epochs after the onset (the due epoch).
LATEST_LEAD = -1

# ---------------------------------------------------------------------- recipes
HALF = (0.5, 0.5, 0.5)
# The demo's ViT at 32 px (16 patches), so that a CPU step is cheap; twice the demo's lr, as the runs are
# short (the shapes take the demo's own, below); warm-up over the first 2 epochs.
MODEL = dict(model_name="vit_tiny_patch16_224", **{**TINY_VIT, **TINY_VIT_RECIPE, "lr": 2e-3, "warmup_epochs": 2.0})
# Per dataset: the data and schedule with which a control learns the object (>= 85% validation
# accuracy) on one CPU thread; the report records what each run reached and how long it took. An
# "epoch" is a fixed number of batches (a fresh draw from the training set each time), and one check:
# 1024 images on Fashion, 2048 on the shapes, which a control needs twice as many of.
RECIPES: Dict[str, Dict[str, Any]] = {
    "shapes": {
        # A large, clearly visible shape (the demo's faint one is for a cue that must win), so that controls learn it.
        "data": dict(num_classes=4, img_size=32, cue_size=6, shape_contrast=0.6, object_size=(0.55, 0.9), num_train=4000,
                     batch_size=64, mean=HALF, std=HALF),
        # The demo's lr (TINY_VIT_RECIPE's) and 32 batches an epoch: with twice the lr, or with 16 batches,
        # some controls never learnt the shape (the control target above).
        "model": {**MODEL, "lr": TINY_VIT_RECIPE["lr"]},
        "epochs": 32,
        "batches_per_epoch": 32,
    },
    "fashion": {
        # Four garments of clearly different outline (trouser, bag, sneaker, shirt), drawn large: at 32 px
        # a small garment loses the detail that tells them apart. Cached: drawing costs as much as training.
        "data": dict(classes=[1, 8, 7, 6], img_size=32, object_size=(0.6, 0.95), cue_size=6, num_train=4000, batch_size=64,
                     mean=HALF, std=HALF, cache=True),
        "model": MODEL,
        "epochs": 32,
        "batches_per_epoch": 16,
    },
}
INITS = ("scratch", "pretrained")
# init="pretrained": the model is first trained on clean data of the same domain with no cue (other Fashion-MNIST
# garments; all six shapes), then fine-tuned with a fresh head on the cue set, as a user fine-tunes a pretrained
# ViT. Per dataset: the pretraining data (overriding the recipe's), its epochs, and the fine-tune's schedule.
PRETRAIN: Dict[str, Dict[str, Any]] = {
    "shapes": {"data": dict(num_classes=6, cue="marker", cue_correlation=None), "epochs": 32},
    "fashion": {"data": dict(classes=[0, 2, 3, 4, 5, 9], cue="none", cue_correlation=0.0), "epochs": 32},
}
# The fine-tune: fewer epochs (the object features exist), half the lr, a short warm-up.
FINE_TUNE = dict(epochs=10, lr_scale=0.5, warmup_epochs=0.5)
# Where the pretrained weights are kept between runs (one file per dataset and seed, made once).
PRETRAINED_DIR = Path(tempfile.gettempdir()) / "caap-spurious-pretrained"
# --quick: tiny data and two epochs, enough to run every step once.
QUICK = dict(num_train=256, num_val=128, epochs=2, cues=("marker", "watermark"))
# Where FashionCanvasDataModule unpacks Debian's Fashion-MNIST (never downloaded).
FASHION_ROOT = str(Path(tempfile.gettempdir()) / "caap-fashion-mnist")


# A run: dataset, cue kind, cue strength, seed, init.
Job = Tuple[str, str, float, int, str]


# ---------------------------------------------------------------------- training
class ReplayedClassifier(ViTClassifier):
    """Loads, at the start of each epoch, the weights an earlier fit had at its end, instead of training.

    A baseline's callbacks then watch exactly the model trajectory CAAP's watched. Set
    ``snapshots`` (one ``model`` state dict per epoch) before fitting with ``limit_train_batches=1``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.snapshots: List[Dict[str, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.model.load_state_dict(self.snapshots[self.current_epoch])


class EpochRecorder(L.Callback):
    """After each validation (and the callbacks' check): accuracies, reliance, the regimes' scores, live alarm, weights."""

    def __init__(self, accuracy_batch: Any, caap: CAAPCallback, monitor: SpuriousCueMonitor) -> None:
        self.accuracy_batch = accuracy_batch
        self.caap = caap
        self.monitor = monitor
        self.history: List[Dict[str, Any]] = []
        self.snapshots: List[Dict[str, torch.Tensor]] = []
        self.start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        counts = cue_accuracy(pl_module, self.accuracy_batch)
        # A failed check leaves the previous check in place: then this epoch has no scores.
        last = self.caap.last
        metrics = last.metrics if last is not None and last.epoch == trainer.current_epoch else {}
        latest = self.monitor.history[-1] if self.monitor.history else {}
        check = latest if latest.get("epoch") == trainer.current_epoch else {}
        (consistent, n_consistent), (conflicting, n_conflicting) = counts["cue-consistent"], counts["cue-conflicting"]
        row: Dict[str, Any] = {
            "epoch": trainer.current_epoch + 1,
            "accuracy": percent(consistent + conflicting, n_consistent + n_conflicting),
            "acc_consistent": percent(consistent, n_consistent),
            "acc_conflicting": percent(conflicting, n_conflicting),
            "reliance": percent(*counts["follows-cue"]),
        }
        row.update({score: rounded(metrics.get("caap/" + score)) for score in RECORDED})
        row["judged"] = is_judged(row[SKILL], self.monitor.min_skill)
        row["live_alarm"] = bool(check.get("alarm", 0.0))
        row["attribution_s"] = rounded(metrics.get("caap/seconds"), 2)
        row["wall_s"] = round(time.perf_counter() - self.start, 1)
        self.history.append(row)
        self.snapshots.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def recipe(dataset: str, quick: bool, init: str = "scratch") -> Dict[str, Any]:
    """The dataset's recipe for ``init`` (a fine-tune: ``FINE_TUNE``'s schedule), shrunk for ``--quick``."""
    chosen = {**RECIPES[dataset], "data": dict(RECIPES[dataset]["data"]), "model": dict(RECIPES[dataset]["model"])}
    if init == "pretrained":
        chosen["epochs"] = FINE_TUNE["epochs"]
        chosen["model"].update(lr=chosen["model"]["lr"] * FINE_TUNE["lr_scale"], warmup_epochs=FINE_TUNE["warmup_epochs"])
        chosen["pretrain"] = {**PRETRAIN[dataset], "data": {**chosen["data"], **PRETRAIN[dataset]["data"]}}
    if quick:
        chosen["data"]["num_train"] = QUICK["num_train"]
        chosen["epochs"] = QUICK["epochs"]
        if "pretrain" in chosen:
            chosen["pretrain"].update(epochs=QUICK["epochs"], data={**chosen["pretrain"]["data"], "num_train": QUICK["num_train"]})
    return chosen


def build_data(dataset: str, cue: str, cue_correlation: float, seed: int, settings: Dict[str, Any],
               data: Optional[Dict[str, Any]] = None) -> MaskedImageDataModule:
    """The cue set of a run (``data``: other data settings, e.g. the pretraining's, overriding the recipe's)."""
    data = {**dataset_recipe(dataset, settings)["data"], "cue": cue, "cue_correlation": cue_correlation, "seed": seed,
            "num_val": settings["num_val"], **(data or {})}
    if dataset == "shapes":
        return SyntheticSpuriousDataModule(**data)
    return FashionCanvasDataModule(root=settings["fashion_root"], **data)


def control_of(dataset: str, settings: Dict[str, Any]) -> float:
    """The control's cue strength: the cue names the label as often as chance does."""
    data = dataset_recipe(dataset, settings)["data"]
    classes = data["num_classes"] if dataset == "shapes" else len(data["classes"])
    return round(1.0 / classes, 4)


def dataset_recipe(dataset: str, settings: Dict[str, Any]) -> Dict[str, Any]:
    """A recipe of ``dataset`` (any init: they share the cue set's data)."""
    return next(r for key, r in settings["recipes"].items() if key.split("/")[0] == dataset)


def recipe_of(dataset: str, init: str, settings: Dict[str, Any]) -> Dict[str, Any]:
    return settings["recipes"][dataset if init == "scratch" else f"{dataset}/{init}"]


def pretrained_weights(dataset: str, seed: int, settings: Dict[str, Any]) -> Path:
    """The file of the model pretrained on ``dataset``'s clean pretraining data with ``seed``, trained on first use.

    The same file serves every cue set of that dataset and seed; ``run_jobs`` makes each once before the runs."""
    pretrain = recipe_of(dataset, "pretrained", settings)["pretrain"]
    schedule = f"{pretrain['epochs']}x{RECIPES[dataset]['batches_per_epoch']}-n{pretrain['data']['num_train']}"
    path = PRETRAINED_DIR / f"{dataset}-seed{seed}-{schedule}.pt"
    if path.exists():
        return path
    L.seed_everything(seed, verbose=False)
    data = build_data(dataset, "none", None, seed, settings, pretrain["data"])
    model = ViTClassifier(**RECIPES[dataset]["model"], num_classes=data.num_classes, img_size=data.img_size,
                          mean=data.mean, std=data.std)
    trainer = quiet_trainer(max_epochs=pretrain["epochs"], limit_val_batches=0,
                            limit_train_batches=RECIPES[dataset]["batches_per_epoch"])
    trainer.fit(model, datamodule=data)
    PRETRAINED_DIR.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(model.model.state_dict(), partial)
    partial.replace(path)
    return path


def fit_run(
    job: Job,
    method: str,
    settings: Dict[str, Any],
    snapshots: Optional[List[Dict[str, torch.Tensor]]] = None,
) -> Tuple[Dict[str, Any], List[Dict[str, torch.Tensor]]]:
    """One fit, its callbacks driven by ``method``'s maps: the run's record and its weights per epoch.

    With ``snapshots`` (the weights of a fit of the same job) the fit replays them instead of
    training, so every method watches the same models.
    """
    dataset, cue, cue_correlation, seed, init = job
    run_recipe = recipe_of(dataset, init, settings)
    checkpoint = str(pretrained_weights(dataset, seed, settings)) if init == "pretrained" else None
    L.seed_everything(seed, verbose=False)
    data = build_data(dataset, cue, cue_correlation, seed, settings)
    model_class = ViTClassifier if snapshots is None else ReplayedClassifier
    model = model_class(**run_recipe["model"], num_classes=data.num_classes, img_size=data.img_size,
                        mean=data.mean, std=data.std, checkpoint_path=checkpoint)
    if snapshots is not None:
        model.snapshots = snapshots
    caap = CAAPCallback(methods=[method], num_images=settings["num_images"], swap_images=settings["swap_images"],
                        construction=settings["construction"], metrics=list(RUN_METRICS), log_images=False)
    monitor = SpuriousCueMonitor(monitor="caap/" + LIVE_SCORE, **settings["monitor"], num_images=0)
    data.setup("fit")
    recorder = EpochRecorder(data.probe_batch(data.num_val), caap, monitor)
    start, cpu = time.perf_counter(), time.process_time()
    # Without a logger the monitor writes its notes (a check not judged) under default_root_dir: the recorder holds
    # all the benchmark reads, so they go to a folder removed after the fit, not into the working directory.
    with tempfile.TemporaryDirectory(prefix="caap-cue-run-") as root:
        trainer = quiet_trainer(
            max_epochs=run_recipe["epochs"],
            # The accuracies are the recorder's, on every validation image; the loop only triggers the check.
            limit_val_batches=1,
            limit_train_batches=run_recipe["batches_per_epoch"] if snapshots is None else 1,
            callbacks=[caap, monitor, recorder],
            default_root_dir=root,
        )
        trainer.fit(model, datamodule=data)
    record = {
        "dataset": dataset,
        "cue": cue,
        "cue_correlation": cue_correlation,
        "seed": seed,
        "init": init,
        "method": method,
        "control": cue_correlation == control_of(dataset, settings),
        "model": "trained" if snapshots is None else "replayed from the CAAP run's weights",
        "live_alarm_epoch": next((row["epoch"] for row in recorder.history if row["live_alarm"]), None),
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
        "history": recorder.history,
    }
    return record, recorder.snapshots


def run_job(job: Job, settings: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The CAAP fit of one (dataset, cue kind, cue strength, seed) and each baseline's replay of its weights."""
    trained, snapshots = fit_run(job, "caap", settings)
    return [trained, *(fit_run(job, name, settings, snapshots)[0] for name in settings["baselines"])]


def run_jobs(jobs: Sequence[Job], settings: Dict[str, Any], workers: int) -> List[Dict[str, Any]]:
    """Every job's runs, in the order of ``jobs``, on ``workers`` processes (1: in this process)."""
    done: Dict[Job, List[Dict[str, Any]]] = {}
    pretrained = sorted({(job[0], job[3]) for job in jobs if job[4] == "pretrained"})
    if workers == 1:
        init_worker()
        for dataset, seed in pretrained:
            pretrained_weights(dataset, seed, settings)
        for job in jobs:
            done[job] = run_job(job, settings)
            report_progress(done[job])
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker) as pool:
            for path in pool.map(pretrained_weights, *zip(*pretrained), [settings] * len(pretrained)) if pretrained else ():
                print(json.dumps({"pretrained": str(path)}), flush=True)
            futures = {pool.submit(run_job, job, settings): job for job in jobs}
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                report_progress(done[futures[future]])
    return [run for job in jobs for run in done[job]]


def report_progress(runs: Sequence[Dict[str, Any]]) -> None:
    for run in runs:
        last = run["history"][-1]
        progress = {k: run[k] for k in ("dataset", "cue", "cue_correlation", "seed", "init", "method", "live_alarm_epoch",
                                        "wall_s", "cpu_s")}
        progress["final"] = {k: last[k] for k in ("accuracy", "reliance", *RECORDED)}
        print(json.dumps(progress), flush=True)


# ---------------------------------------------------------------------- what a run's history says
def gap_epoch(history: Sequence[Dict[str, Any]], points: float = GAP_POINTS) -> Optional[int]:
    """The first epoch at which cue-conflicting accuracy is ``points`` below cue-consistent accuracy."""
    for row in history:
        if row["acc_consistent"] is not None and row["acc_conflicting"] is not None:
            if row["acc_consistent"] - row["acc_conflicting"] >= points:
                return row["epoch"]
    return None


def counted(row: Dict[str, Any], key: str, min_skill: Optional[float]) -> bool:
    """Whether a monitor with ``min_skill`` watching ``key`` counts this epoch's check: a score was logged, and for
    a swap test the swap probe's skill reached ``min_skill`` (``SpuriousCueMonitor``'s rule)."""
    if row.get(key) is None:  # an epoch without a score (a failed check) is no check at all
        return False
    return not key.startswith(SWAP_PREFIXES) or is_judged(row.get(SKILL), min_skill)


def replay_alarms(
    history: Sequence[Dict[str, Any]], key: str, threshold: Optional[float], patience: int, min_delta: float,
    min_skill: Optional[float] = None,
) -> List[bool]:
    """Whether a ``SpuriousCueMonitor`` with these settings, fed ``key``, has its alarm on after each recorded epoch."""
    monitor = SpuriousCueMonitor(threshold=threshold, patience=patience, min_delta=min_delta, min_skill=min_skill)
    alarms = []
    for row in history:
        if counted(row, key, min_skill):
            monitor.update(row[key])
        alarms.append(monitor.alarmed)
    return alarms


def replay_alarm_epoch(
    history: Sequence[Dict[str, Any]], key: str, threshold: Optional[float], patience: int, min_delta: float,
    min_skill: Optional[float] = None,
) -> Optional[int]:
    """The first epoch at which that monitor's alarm is on."""
    alarms = replay_alarms(history, key, threshold, patience, min_delta, min_skill)
    return next((row["epoch"] for row, alarm in zip(history, alarms) if alarm), None)


def onset_epoch(history: Sequence[Dict[str, Any]], reliance: float = SHORTCUT_RELIANCE) -> Optional[int]:
    """The first epoch at which the run predicts the cue's class on ``reliance`` % or more of cue-conflicting images."""
    return next((row["epoch"] for row in history if row["reliance"] is not None and row["reliance"] >= reliance), None)


def due_epoch(history: Sequence[Dict[str, Any]]) -> Optional[int]:
    """The epoch an alarm is measured against: the run's onset, the first epoch at which it follows the cue on
    ``SHORTCUT_RELIANCE`` % of cue-conflicting images. (The accuracy gap can open earlier, while a fine-tune
    still follows the cue on few images: ``gap_epoch`` is reported beside it.)"""
    return onset_epoch(history)


def lead_time(alarm: Optional[int], due: Optional[int]) -> Optional[int]:
    """Epochs by which the alarm preceded the due epoch (negative: it came later)."""
    return None if alarm is None or due is None else due - alarm


def is_late(lead: Optional[int]) -> bool:
    """Whether an alarm with this lead (``None``: no alarm or no gap) came later than the lead target allows."""
    return lead is not None and lead < LATEST_LEAD


def run_kind(run: Dict[str, Any]) -> str:
    """``"control"``, ``"shortcut"`` (reliance reached ``SHORTCUT_RELIANCE`` at some epoch) or ``"other"`` (a cue the
    model did not come to rely on)."""
    if run["control"]:
        return "control"
    return "shortcut" if onset_epoch(run["history"]) is not None else "other"


def control_problems(run: Dict[str, Any]) -> List[str]:
    """Why a control is not the clean control it should be: it did not learn the object, or it leant on the cue."""
    accuracy = run["history"][-1]["accuracy"]
    rows = [row for row in run["history"] if row["reliance"] is not None]
    peak = max(rows, key=lambda row: row["reliance"], default=None)
    problems = []
    if accuracy is None or accuracy < CONTROL_ACCURACY:
        problems.append(f"accuracy {fmt(accuracy, 1)}% < {CONTROL_ACCURACY:g}%")
    if peak is not None and peak["reliance"] >= CONTROL_RELIANCE:
        # Where: a model still at chance (accuracy 1 / classes) predicts the cue's class on 1 / classes of the images.
        problems.append(f"reliance reached {fmt(peak['reliance'], 1)}% >= {CONTROL_RELIANCE:g}% "
                        f"(epoch {peak['epoch']}, accuracy {fmt(peak['accuracy'], 1)}%)")
    return problems


def label(run: Dict[str, Any]) -> str:
    return f"{run.get('init', 'scratch')}/{run['dataset']}/{run['cue']}/{run['cue_correlation']}/seed {run['seed']}"


def detection(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Shortcut runs alarmed, controls alarmed and lead times of runs that carry ``alarm_epoch`` and ``due_epoch``."""
    shortcut = [r for r in runs if run_kind(r) == "shortcut"]
    controls = [r for r in runs if r["control"]]
    leads = [lead_time(r["alarm_epoch"], r["due_epoch"]) for r in shortcut]
    alarmed = [r for r in shortcut if r["alarm_epoch"] is not None]
    return {
        "shortcut_runs": len(shortcut),
        "alarmed": len(alarmed),
        "detection_rate": len(alarmed) / len(shortcut) if shortcut else None,
        "controls": len(controls),
        "false_alarms": sum(r["alarm_epoch"] is not None for r in controls),
        "alarm_epochs": [r["alarm_epoch"] for r in shortcut],
        "due_epochs": [r["due_epoch"] for r in shortcut],
        "lead_epochs": leads,
        "median_lead_epochs": median(leads),
        "missed": [label(r) for r in shortcut if r["alarm_epoch"] is None],
        "false_alarm_runs": [f"{label(r)} (epoch {r['alarm_epoch']})" for r in controls if r["alarm_epoch"] is not None],
        "late_runs": [label(r) for r, lead in zip(shortcut, leads) if is_late(lead)],
    }


def settings_of(monitor: SpuriousCueMonitor) -> Dict[str, Any]:
    return {"threshold": monitor.threshold, "patience": monitor.patience, "min_delta": monitor.min_delta,
            "min_skill": monitor.min_skill}
