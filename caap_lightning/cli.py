"""The ``caap-lightning`` command: a LightningCLI over :class:`ViTClassifier` and any datamodule.

    caap-lightning fit --config configs/demo.yaml
    caap-lightning validate --config configs/eval_pets.yaml --ckpt_path path/to/last.ckpt
    caap-lightning fit --config configs/pets_vitb16.yaml --print_config

The datamodule is chosen by ``class_path`` (``data: class_path: ...``); its ``num_classes`` and
``img_size`` are passed on to the model. The callbacks go in ``trainer.callbacks``.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import caap_lightning.callbacks  # noqa: F401  (imported so that short class names resolve in YAML)
import caap_lightning.datamodules  # noqa: F401
from caap_lightning.models import ViTClassifier


class CAAPLightningCLI(LightningCLI):
    """LightningCLI whose model takes the number of classes and image size from the datamodule."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.img_size", "model.img_size", apply_on="instantiate")


def cli(args: Optional[List[str]] = None, run: bool = True) -> CAAPLightningCLI:
    """Build (and with ``run``, run) the CLI; the object holds ``trainer``, ``model`` and ``datamodule``."""
    return CAAPLightningCLI(
        ViTClassifier,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: Optional[List[str]] = None) -> int:
    cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
