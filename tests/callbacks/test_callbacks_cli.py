"""The ``caap-lightning`` CLI: every config parses, and the demo runs end to end at a tiny size."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from caap_lightning import demo
from caap_lightning.callbacks import CAAPCallback
from caap_lightning.cli import cli, main
from caap_lightning.configs import CONFIG_DIR as CONFIGS
from _tiny_demo import TINY_DEMO_ARGS

BENCHMARK_CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"


@pytest.mark.parametrize(
    "subcommand, config, expected",
    [
        ("fit", "demo.yaml", "SyntheticSpuriousDataModule"),
        ("fit", "pets_vitb16.yaml", "OxfordPetDataModule"),
        ("fit", "food101_vitb16.yaml", "Food101DataModule"),
        ("validate", "eval_pets.yaml", "OxfordPetDataModule"),
        ("fit", BENCHMARK_CONFIGS / "learnable_shapes.yaml", "SyntheticSpuriousDataModule"),
    ],
)
def test_configs_parse(subcommand, config, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert expected in printed and "caap_lightning.callbacks.CAAPCallback" in printed
    assert "insertion_deletion_steps" in printed  # every callback argument is exposed


def test_methods_parse_from_yaml(tmp_path, capsys):
    config = tmp_path / "methods.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: caap_lightning.callbacks.CAAPCallback\n"
        "      init_args:\n"
        "        methods: [caap, gradcam, simple_insertion]\n"
        "        method_kwargs: {simple_insertion: {batch_size: 32}}\n"
        "        window: 3\n"
        "        layer_cutoff: auto\n"
        "        precision: '32'\n"
    )
    args = ["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(config)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "- caap\n" in printed and "- gradcam\n" in printed and "batch_size: 32" in printed
    run = cli(args[1:], run=False)
    (callback,) = [cb for cb in run.trainer.callbacks if isinstance(cb, CAAPCallback)]
    assert callback.methods == ["caap", "gradcam", "simple_insertion"]
    assert callback.method_kwargs == {"simple_insertion": {"batch_size": 32}} and callback.window == 3
    assert callback.layer_cutoff == "auto" and callback.precision == "32"


def test_demo_runs_through_the_cli_and_prints_the_summary(tmp_path, monkeypatch, capsys, events_reader):
    monkeypatch.chdir(tmp_path)
    demo.main(["--trainer.max_epochs=2", *TINY_DEMO_ARGS])
    out = capsys.readouterr().out
    assert "caap-lightning demo: 2 epochs" in out
    assert "probe images (16): cue-consistent" in out and "all validation images (32)" in out
    assert "predicted as the cue's class" in out
    assert "caap/cue_swap_follow_share" in out and "caap/cue_density_ratio" in out and "SpuriousCueMonitor:" in out
    assert "insertion_ratio" not in out  # computed where named only
    assert "tensorboard --logdir runs" in out
    events = events_reader(tmp_path / "runs" / "demo")
    assert len(events["images"]["caap/heatmaps"]) == 2


class ReadsPixel(torch.nn.Module):
    """Predicts the class written in each image's first pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # cue_accuracy reads the device from a parameter

    def forward(self, images):
        return torch.nn.functional.one_hot(images[:, 0, 0, 0].long(), 3).float()


def test_cue_accuracy_counts_consistent_conflicting_and_cue_following_predictions():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    cues = torch.tensor([0, 1, 0, 1, 2, 2])  # images 2, 3, 4 conflict
    predicted = torch.tensor([0, 2, 0, 1, 1, 2])  # follows the cue on 2 and 3, the label on 4
    images = torch.zeros(6, 3, 4, 4)
    images[:, 0, 0, 0] = predicted.float()
    batch = SimpleNamespace(images=images, labels=labels, cue_labels=cues)
    counts = demo.cue_accuracy(ReadsPixel(), batch, chunk=4)
    assert counts == {"cue-consistent": (2, 3), "cue-conflicting": (1, 3), "follows-cue": (2, 3)}
