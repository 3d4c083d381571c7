from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py``, a script and not part of the package."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))  # as running the script does: it imports its neighbours
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def load_library(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py``, a module the scripts share, as they import it (the same module object)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="session")
def cue_runs() -> ModuleType:
    return load_library("cue_runs")


@pytest.fixture(scope="session")
def spurious() -> ModuleType:
    return load_script("spurious")


@pytest.fixture(scope="session")
def metrics_speed() -> ModuleType:
    return load_script("metrics_speed")


@pytest.fixture(scope="session")
def diagnose() -> ModuleType:
    return load_library("_diagnose")


@pytest.fixture(scope="session")
def quality() -> ModuleType:
    return load_script("quality")


@pytest.fixture(scope="session")
def swap_probe_size() -> ModuleType:
    return load_script("swap_probe_size")


@pytest.fixture(scope="session")
def spurious_compare() -> ModuleType:
    return load_script("spurious_compare")
