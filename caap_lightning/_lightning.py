"""Questions about Lightning objects that have one answer in both of Lightning's namespaces.

Lightning ships its classes twice: ``lightning.pytorch`` (the ``lightning`` package) and
``pytorch_lightning`` (the classic package). A user's Trainer, LightningModule,
LightningDataModule and loggers may come from either, while Lightning's own helpers
(``is_overridden``) only know the namespace they live in.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Tuple

from lightning_utilities.core.overrides import is_overridden as _is_overridden

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")
_BASE_CLASSES = ("LightningModule", "LightningDataModule", "Callback")


def loaded_namespaces() -> Tuple[ModuleType, ...]:
    """The namespaces imported so far: an object of a namespace exists only once it is imported,
    so the classic package is never imported just to ask."""
    return tuple(sys.modules[name] for name in NAMESPACES if name in sys.modules)


def lightning_base(instance: object) -> type:
    """The ``LightningModule``, ``LightningDataModule`` or ``Callback`` class, of either namespace,
    that ``instance`` derives from."""
    for namespace in loaded_namespaces():
        for name in _BASE_CLASSES:
            base = getattr(namespace, name)
            if isinstance(instance, base):
                return base
    raise TypeError(
        f"{type(instance).__qualname__} is not a LightningModule, LightningDataModule or Callback of "
        f"{' or '.join(NAMESPACES)}; derive it from one of them."
    )


def is_overridden(method_name: str, instance: object) -> bool:
    """Whether ``instance``'s class overrides its Lightning base class's ``method_name``, in either namespace."""
    if instance is None:  # `trainer.lightning_module` before a model is attached
        return False
    return _is_overridden(method_name, instance, lightning_base(instance))
