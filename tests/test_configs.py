"""The packaged LightningCLI configs: found by file name, listed with their paths, and a wrong name says what exists."""

from __future__ import annotations

import pytest

from caap_lightning.cli import main
from caap_lightning.configs import CONFIG_DIR, config_path, packaged_configs, resolve_config_args
from caap_lightning.configs.__main__ import main as configs_main

SHIPPED = ["demo.yaml", "eval_pets.yaml", "food101_vitb16.yaml", "pets_vitb16.yaml"]


def test_the_configs_ship_inside_the_package():
    assert CONFIG_DIR.parent.name == "caap_lightning"
    assert packaged_configs() == SHIPPED
    assert config_path("demo.yaml") == CONFIG_DIR / "demo.yaml"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["fit", "--config", "demo.yaml"], ["fit", "--config", str(CONFIG_DIR / "demo.yaml")]),
        (["fit", "-c", "demo.yaml"], ["fit", "-c", str(CONFIG_DIR / "demo.yaml")]),
        (["fit", "--config=demo.yaml"], ["fit", f"--config={CONFIG_DIR / 'demo.yaml'}"]),
        (["fit", "--config", "{trainer: {max_epochs: 1}}"], ["fit", "--config", "{trainer: {max_epochs: 1}}"]),
        (["fit", "--model.model_name", "demo.yaml"], ["fit", "--model.model_name", "demo.yaml"]),
    ],
)
def test_a_packaged_name_resolves_to_its_path(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_args(args) == expected


def test_a_file_of_that_name_where_the_command_runs_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.yaml").write_text("trainer: {max_epochs: 1}\n")
    assert resolve_config_args(["fit", "--config", "demo.yaml"]) == ["fit", "--config", "demo.yaml"]


def test_wrong_names_say_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no packaged config 'dmeo.yaml'; the packaged configs are demo.yaml, eval"):
        resolve_config_args(["fit", "--config", "dmeo.yaml"])
    # The path the configs had in a clone before they moved into the package.
    with pytest.raises(ValueError, match="no such file; the packaged config of that name is --config demo.yaml"):
        resolve_config_args(["fit", "--config", "configs/demo.yaml"])
    with pytest.raises(SystemExit, match="caap-lightning: error: no packaged config 'dmeo.yaml'"):
        main(["fit", "--config", "dmeo.yaml"])


def test_the_cli_runs_a_packaged_config_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "demo.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "SyntheticSpuriousDataModule" in capsys.readouterr().out


def test_python_m_configs_lists_them_and_prints_one_path(capsys):
    assert configs_main([]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert listed == [[name, str(CONFIG_DIR / name)] for name in SHIPPED]
    assert configs_main(["pets_vitb16.yaml"]) == 0
    assert capsys.readouterr().out == f"{CONFIG_DIR / 'pets_vitb16.yaml'}\n"
    with pytest.raises(SystemExit):
        configs_main(["nope.yaml"])
    assert "no packaged config 'nope.yaml'" in capsys.readouterr().err
