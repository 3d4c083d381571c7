"""The LightningCLI configs that ship with the package (``demo.yaml``, ``pets_vitb16.yaml``, ...).

``caap-lightning fit --config demo.yaml`` finds a packaged config by its file name when no file of
that name exists where the command runs; ``python -m caap_lightning.configs`` lists them with their
paths, to copy one and edit it.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

CONFIG_DIR = Path(__file__).resolve().parent
_CONFIG_FLAGS = ("--config", "-c")


def packaged_configs() -> List[str]:
    """The file names of the packaged configs."""
    return sorted(path.name for path in CONFIG_DIR.glob("*.yaml"))


def config_path(name: str) -> Path:
    """The path of the packaged config ``name`` (a file name such as ``"demo.yaml"``)."""
    path = CONFIG_DIR / name
    if Path(name).name != name or not path.is_file():
        raise ValueError(f"no packaged config {name!r}; the packaged configs are {', '.join(packaged_configs())}")
    return path


def resolve_config_args(args: Sequence[str]) -> List[str]:
    """``args`` with each ``--config NAME`` (``-c NAME``, ``--config=NAME``) that names no existing file but a
    packaged config replaced by that config's path. A file of that name where the command runs wins."""
    resolved = list(args)
    for i, arg in enumerate(resolved):
        flag, equals, value = arg.partition("=")
        if equals and flag in _CONFIG_FLAGS:
            resolved[i] = f"{flag}={_resolve(value)}"
        elif arg in _CONFIG_FLAGS and i + 1 < len(resolved):
            resolved[i + 1] = _resolve(resolved[i + 1])
    return resolved


def _resolve(value: str) -> str:
    path = Path(value)
    if path.exists() or path.suffix not in (".yaml", ".yml"):
        return value  # a file, or a config given inline as a YAML string
    if path.name == value:
        return str(config_path(value))
    packaged = f"; the packaged config of that name is --config {path.name}" if path.name in packaged_configs() else ""
    raise ValueError(f"--config {value}: no such file{packaged}")
