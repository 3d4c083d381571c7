"""Installed as a user installs it: a wheel in a fresh venv, run from outside the clone.

The venv reuses the running environment's packages through a ``.pth`` file (no download, and the
versions are those of the environment the wheel lands in), installs the wheel with ``--no-deps``
and runs the README's quick start, the demo and the CLI from a temporary directory. The declared
ranges are read from the wheel's own metadata.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from _readme import readme_block
from _tiny_demo import TINY_DEMO_ARGS

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
# Versions next to the ones CI pins, that a user's environment may hold: the ranges must take them.
NEIGHBOURS = {
    "lightning": ["2.5.5", "2.6.0", "2.7.0"],
    "pytorch-lightning": ["2.6.0", "2.7.0"],
    "timm": ["1.0.20", "1.0.25", "1.1.0"],
    "torch": ["2.5.1", "2.9.0"],
    "torchvision": ["0.20.1", "0.24.0"],
    "transformers": ["4.57.1", "5.0.0"],
}


def run(args: List[str], cwd: Path, timeout: int = 300) -> str:
    """``args`` run in ``cwd`` without the clone on the path; its output, or a failure that shows it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: more threads only wait on each other
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the sources so that the clone gets no build files."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "caap_lightning", source / "caap_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(work / "dist"), str(source)], cwd=work)
    (built,) = (work / "dist").glob("caap_lightning-*.whl")
    return built


def fresh_venv(root: Path) -> Path:
    """A venv at ``root`` that sees this environment's packages (and its pip) through a ``.pth`` file; its python."""
    run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent)
    python = root / "bin" / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip()
    ours = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    Path(site, "dev-environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv outside the clone that holds the wheel."""
    root = tmp_path_factory.mktemp("venv")
    python = fresh_venv(root)
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=root)
    return root


def heatmap_steps(log_dir: Path) -> List[int]:
    """The steps of the ``caap/heatmaps`` images in the TensorBoard event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"images": 0})
        events.Reload()
        if "caap/heatmaps" in events.Tags()["images"]:
            steps += [image.step for image in events.Images("caap/heatmaps")]
    return steps


def wheel_requirements(wheel: Path) -> List[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(name))
    return [Requirement(line) for line in metadata.get_all("Requires-Dist")]


def by_extra(requirements: List[Requirement]) -> Dict[str, Dict[str, Requirement]]:
    """``{extra or "": {name: requirement}}``."""
    grouped: Dict[str, Dict[str, Requirement]] = {}
    for requirement in requirements:
        marker = str(requirement.marker or "")
        extra = marker.split("==")[1].strip(" '\"") if "extra ==" in marker else ""
        grouped.setdefault(extra, {})[canonicalize_name(requirement.name)] = requirement
    return grouped


def test_the_wheel_imports_its_own_copy_and_ships_the_configs(venv, tmp_path):
    out = run([str(venv / "bin" / "python"), "-c",
               "import caap_lightning.configs as c; print(c.__file__); print(*c.packaged_configs())"], cwd=tmp_path)
    where, names = out.splitlines()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT)
    assert names.split() == ["demo.yaml", "eval_pets.yaml", "food101_vitb16.yaml", "pets_vitb16.yaml"]


def test_the_readme_quick_start_runs_from_the_wheel(venv, tmp_path):
    (tmp_path / "quick_start.py").write_text(readme_block("own-module"))
    out = run([str(venv / "bin" / "python"), "quick_start.py"], cwd=tmp_path)
    assert "caap/insdel" in out
    assert len(heatmap_steps(tmp_path / "lightning_logs")) == 2


def test_the_demo_runs_from_the_wheel(venv, tmp_path):
    out = run([str(venv / "bin" / "python"), "-m", "caap_lightning.demo", "--threads=1", "--trainer.max_epochs=1",
               *TINY_DEMO_ARGS], cwd=tmp_path)
    assert "caap-lightning demo: 1 epochs" in out and "SpuriousCueMonitor:" in out
    assert len(heatmap_steps(tmp_path / "runs" / "demo")) == 1


def test_the_command_finds_a_packaged_config_by_name(venv, tmp_path):
    out = run([str(venv / "bin" / "caap-lightning"), "fit", "--config", "pets_vitb16.yaml", "--print_config"],
              cwd=tmp_path)
    assert "OxfordPetDataModule" in out and "caap_lightning.callbacks.CAAPCallback" in out


def test_pip_keeps_the_installed_versions(wheel, tmp_path):
    """pip, resolving the wheel's dependencies offline against what is installed, would install the wheel alone."""
    python = fresh_venv(tmp_path / "venv")
    out = run([str(python), "-m", "pip", "install", "--dry-run", "--no-index", str(wheel)], cwd=tmp_path)
    assert out.splitlines()[-1] == "Would install caap-lightning-0.1.0"


def test_declared_ranges_take_neighbouring_versions_and_pin_nothing(wheel):
    extras = by_extra(wheel_requirements(wheel))
    everything = {name: r for group in extras.values() for name, r in group.items()}
    for name, versions in NEIGHBOURS.items():
        for version in versions:
            specifier = everything[name].specifier
            assert specifier.contains(version), f"{name}{specifier} refuses {version}"
    for name, requirement in everything.items():
        operators = {spec.operator for spec in requirement.specifier}
        assert operators <= {">="}, f"{name}{requirement.specifier}: a range has a lower bound only"
    assert set(extras) == {"", "hf", "baselines", "loggers", "dev"}
    assert extras["dev"]["caap-lightning"].extras == {"hf", "baselines", "loggers"}  # `make test` needs them all


def test_the_pinned_versions_lie_in_the_declared_ranges(wheel):
    everything = {name: r for group in by_extra(wheel_requirements(wheel)).values() for name, r in group.items()}
    pins = dict(line.split("==") for line in CONSTRAINTS.read_text().splitlines() if "==" in line and line[0] != "#")
    pins = {canonicalize_name(name): Version(version) for name, version in pins.items()}
    for name, requirement in everything.items():
        if name != "caap-lightning":
            assert name in pins, f"{name} is declared but not pinned in {CONSTRAINTS.name}"
            assert requirement.specifier.contains(pins[name]), (
                f"{name}=={pins[name]} is outside {requirement.specifier}"
            )
