"""figures.log_image / log_text reach every logger that shows images, else PNG files."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from PIL import Image

from caap_lightning.callbacks import figures

TAG = "caap/heatmaps"


def image(h: int = 20, w: int = 30) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def curves() -> np.ndarray:
    return figures.curves_image({"caap": torch.linspace(1, 0, 5)}, "test")


def trainer_with(tmp_path, logger) -> L.Trainer:
    return L.Trainer(logger=logger, default_root_dir=str(tmp_path), accelerator="cpu", devices=1,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


def log_all(trainer) -> None:
    figures.log_image(trainer, TAG, image(), step=3)
    figures.log_image(trainer, "caap/insertion_deletion", curves(), step=3)
    figures.log_text(trainer, "spurious/alarm", "**alarm** at epoch 1", step=3)


def tensorboard_loggers():
    yield pytest.param(TensorBoardLogger, id="lightning")
    try:
        from pytorch_lightning.loggers import TensorBoardLogger as Classic
    except ImportError:
        yield pytest.param(None, id="pytorch_lightning", marks=pytest.mark.skip("pytorch_lightning is not installed"))
    else:
        yield pytest.param(Classic, id="pytorch_lightning")


@pytest.mark.parametrize("logger_class", list(tensorboard_loggers()))
def test_tensorboard_gets_images_figures_and_texts(tmp_path, events_reader, logger_class):
    logger = logger_class(str(tmp_path), name="tb", version=0)
    trainer = trainer_with(tmp_path, logger)
    log_all(trainer)
    logger.experiment.flush()
    events = events_reader(tmp_path / "tb")
    assert events["images"] == {TAG: [3], "caap/insertion_deletion": [3]}
    assert events["texts"]["spurious/alarm/text_summary"] == {3: "**alarm** at epoch 1"}
    assert figures.image_capable(trainer) and figures.describe_destinations(trainer) == "TensorBoard"
    assert not list(tmp_path.rglob("*.png"))


def test_csv_logger_gets_png_and_markdown_files(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = trainer_with(tmp_path, logger)
    log_all(trainer)
    folder = tmp_path / "csv" / "version_0" / "caap_images"
    assert figures.image_dir(trainer) == folder
    with Image.open(folder / "caap_heatmaps_step3.png") as png:
        assert png.size == (30, 20) and png.mode == "RGB"
        assert np.array_equal(np.asarray(png), image())
    with Image.open(folder / "caap_insertion_deletion_step3.png") as png:
        assert np.array_equal(np.asarray(png), curves())
    assert (folder / "spurious_alarm_step3.md").read_text() == "**alarm** at epoch 1"
    assert not figures.image_capable(trainer)
    assert figures.describe_destinations(trainer) == f"PNG files under {folder}"


def test_no_logger_saves_under_the_default_root_dir_in_a_folder_per_run(tmp_path):
    trainer = trainer_with(tmp_path, False)
    figures.log_image(trainer, TAG, image(), step=0)
    folder = tmp_path / "caap_images" / "version_0"
    assert (folder / "caap_heatmaps_step0.png").is_file()
    assert figures.describe_destinations(trainer) == f"PNG files under {folder}"
    # A later run in the same directory writes beside the first run's files, not over them.
    later = trainer_with(tmp_path, False)
    figures.log_image(later, TAG, image(), step=0)
    assert (tmp_path / "caap_images" / "version_1" / "caap_heatmaps_step0.png").is_file()
    assert figures.image_dir(trainer) == folder and figures.image_dir(later) == tmp_path / "caap_images" / "version_1"


def test_only_rank_zero_writes(tmp_path):
    trainer = SimpleNamespace(loggers=[], is_global_zero=False, default_root_dir=str(tmp_path))
    log_all(trainer)
    assert not list(tmp_path.iterdir())


def test_an_image_logger_beside_a_csv_logger_takes_everything(tmp_path):
    loggers = [CSVLogger(str(tmp_path), name="csv"), TensorBoardLogger(str(tmp_path), name="tb", version=0)]
    trainer = trainer_with(tmp_path, loggers)
    log_all(trainer)
    assert figures.describe_destinations(trainer) == "TensorBoard"
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.md"))


class Recorder:
    """Stands for a logger's experiment object: records every call."""

    def __init__(self) -> None:
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


class WandbLogger(Logger):
    """Named as Lightning's, so it is dispatched as W&B: records the logger calls."""

    name = version = None

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def log_image(self, **kwargs):
        self.calls.append(("log_image", kwargs))

    def log_text(self, **kwargs):
        self.calls.append(("log_text", kwargs))

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class CometLogger(WandbLogger):
    """Named as Lightning's Comet logger, with a recording experiment."""

    def __init__(self) -> None:
        super().__init__()
        self.experiment = Recorder()


def test_dispatch_by_class_name_to_wandb_and_comet(tmp_path):
    wandb_logger, comet_logger = WandbLogger(), CometLogger()
    trainer = SimpleNamespace(loggers=[wandb_logger, comet_logger], is_global_zero=True, default_root_dir=str(tmp_path))
    log_all(trainer)
    (name, kwargs), (_, figure), (_, text) = wandb_logger.calls
    assert name == "log_image" and kwargs["key"] == TAG and kwargs["step"] == 3
    assert np.array_equal(kwargs["images"][0], image()) and np.array_equal(figure["images"][0], curves())
    assert text == {"key": "spurious/alarm", "columns": ["text"], "data": [["**alarm** at epoch 1"]], "step": 3}
    assert [(c[0], c[2]) for c in comet_logger.experiment.calls] == [
        ("log_image", {"name": TAG, "step": 3}),
        ("log_image", {"name": "caap/insertion_deletion", "step": 3}),
        ("log_text", {"step": 3, "metadata": {"tag": "spurious/alarm"}}),
    ]
    assert figures.describe_destinations(trainer) == "W&B and Comet"
    assert not list(tmp_path.iterdir())


def test_any_logger_whose_experiment_is_a_summary_writer(tmp_path, events_reader):
    from torch.utils.tensorboard import SummaryWriter

    class OwnLogger(Logger):
        name = version = None

        def __init__(self) -> None:
            super().__init__()
            self.experiment = SummaryWriter(str(tmp_path / "own"))

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    logger = OwnLogger()
    trainer = SimpleNamespace(loggers=[logger], is_global_zero=True, default_root_dir=str(tmp_path))
    figures.log_image(trainer, TAG, image(), step=5)
    logger.experiment.flush()
    assert events_reader(tmp_path / "own")["images"] == {TAG: [5]}


def test_file_stem():
    assert figures.file_stem("caap/gradcam/heatmaps", 12) == "caap_gradcam_heatmaps_step12"


def test_wandb_offline_run_gets_the_media(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger as Wandb

    for var in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        monkeypatch.setenv(f"WANDB_{var}", str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = Wandb(save_dir=str(tmp_path), offline=True, project="caap-test")
    trainer = trainer_with(tmp_path, logger)
    try:
        log_all(trainer)
        files = tmp_path.joinpath(logger.experiment.dir)
    finally:
        logger.experiment.finish()
    with Image.open(next(files.glob("media/images/caap/heatmaps_*.png"))) as png:
        assert png.size == (30, 20)
    assert list(files.glob("media/images/caap/insertion_deletion_*.png"))
    assert "**alarm** at epoch 1" in next(files.glob("media/table/spurious/alarm_*.table.json")).read_text()
    assert figures.describe_destinations(trainer) == "W&B"


def test_mlflow_run_gets_the_artifacts(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store in tmp_path, no database
    logger = MLFlowLogger(experiment_name="caap-test", tracking_uri=(tmp_path / "mlruns").as_uri())
    trainer = trainer_with(tmp_path, logger)
    log_all(trainer)
    client, run = logger.experiment, logger.run_id
    assert sorted(a.path for a in client.list_artifacts(run, "caap_images")) == [
        "caap_images/caap_heatmaps_step3.png",
        "caap_images/caap_insertion_deletion_step3.png",
        "caap_images/spurious_alarm_step3.md",
    ]
    with Image.open(client.download_artifacts(run, "caap_images/caap_heatmaps_step3.png", str(tmp_path))) as png:
        assert png.size == (30, 20)
    assert figures.describe_destinations(trainer) == "MLflow"
    logger.finalize("success")
