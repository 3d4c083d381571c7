"""The ``caap-lightning`` command: a LightningCLI over :class:`ViTClassifier` and any datamodule.

    caap-lightning fit --config demo.yaml
    caap-lightning validate --config eval_pets.yaml --ckpt_path path/to/last.ckpt
    caap-lightning fit --config pets_vitb16.yaml --print_config

A ``--config`` file name that is no file where the command runs names a config that ships with the
package (``python -m caap_lightning.configs`` lists them); a path, as in any LightningCLI, names a file.

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
from caap_lightning.configs import resolve_config_args
from caap_lightning.models import ViTClassifier


class CAAPLightningCLI(LightningCLI):
    """LightningCLI whose model takes the number of classes and image size from the datamodule."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.img_size", "model.img_size", apply_on="instantiate")


def cli(args: Optional[List[str]] = None, run: bool = True) -> CAAPLightningCLI:
    """Build (and with ``run``, run) the CLI; the object holds ``trainer``, ``model`` and ``datamodule``."""
    args = resolve_config_args(sys.argv[1:] if args is None else args)
    return CAAPLightningCLI(
        ViTClassifier,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = resolve_config_args(sys.argv[1:] if argv is None else argv)
    except ValueError as error:  # a config that names nothing: say so as the CLI's own parser would
        sys.exit(f"caap-lightning: error: {error}")
    cli(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
