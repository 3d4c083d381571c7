"""The ``caap-lightning`` CLI: every config parses, and the demo runs end to end at a tiny size."""

from __future__ import annotations

from pathlib import Path

import pytest

from caap_lightning import demo
from caap_lightning.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    "subcommand, config, expected",
    [
        ("fit", "demo.yaml", "SyntheticSpuriousDataModule"),
        ("fit", "pets_vitb16.yaml", "OxfordPetDataModule"),
        ("fit", "food101_vitb16.yaml", "Food101DataModule"),
        ("validate", "eval_pets.yaml", "OxfordPetDataModule"),
    ],
)
def test_configs_parse(subcommand, config, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert expected in printed and "caap_lightning.callbacks.CAAPCallback" in printed
    assert "insertion_deletion_steps" in printed  # every callback argument is exposed


def test_demo_runs_through_the_cli_and_prints_the_summary(tmp_path, monkeypatch, capsys, events_reader):
    monkeypatch.chdir(tmp_path)
    demo.main(
        [
            "--trainer.max_epochs=2",
            "--trainer.enable_checkpointing=false",
            "--data.init_args.img_size=32",
            "--data.init_args.cue_size=6",
            "--data.init_args.num_train=64",
            "--data.init_args.num_val=32",
            "--data.init_args.batch_size=32",
            "--model.embed_dim=32",
            "--model.depth=2",
            "--model.num_heads=2",
        ]
    )
    out = capsys.readouterr().out
    assert "caap-lightning demo: 2 epochs" in out
    assert "probe images (16): cue-consistent" in out and "all validation images (32)" in out
    assert "caap/cue_mass_ratio" in out and "SpuriousCueMonitor:" in out
    assert "tensorboard --logdir runs" in out
    events = events_reader(tmp_path / "runs" / "demo")
    assert len(events["images"]["caap/heatmaps"]) == 2
