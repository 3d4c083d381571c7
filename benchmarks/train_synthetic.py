"""Train a tiny ViT from scratch on the synthetic shapes and print what it reached as JSON.

The defaults are the recipe (``SyntheticSpuriousDataModule``'s defaults, ``harness.TINY_VIT`` and
``TINY_VIT_RECIPE``): without a cue the shapes must reach >= 90% validation accuracy within 5
minutes on 2 CPU cores. What it reached: ``benchmarks/results/README.md``.

    python benchmarks/train_synthetic.py                                  # no cue: learns the shapes
    python benchmarks/train_synthetic.py --cue-correlation 1 --epochs 1   # learns the cue

On a machine shared with other jobs, set ``OMP_WAIT_POLICY=PASSIVE``: spinning OpenMP threads
that lose their core make small-model steps many times slower.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, List

import lightning as L
import torch

from caap_lightning.datamodules import SyntheticSpuriousDataModule
from caap_lightning.demo import cue_accuracy
from caap_lightning.models import ViTClassifier

from harness import TINY_VIT, TINY_VIT_RECIPE, quiet_trainer


class EpochHistory(L.Callback):
    """Validation accuracy and the wall and CPU time spent, after every epoch."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.rows: List[Dict[str, float]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        acc = trainer.callback_metrics.get("val/acc")
        row = {
            "epoch": trainer.current_epoch + 1,
            "val_acc": round(float(acc), 4),
            "wall_s": round(time.perf_counter() - self.start, 1),
            "cpu_s": round(time.process_time() - self.cpu_start, 1),
        }
        self.rows.append(row)
        print(json.dumps(row), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--cue-correlation", type=float, default=None, help="omit for no cue")
    parser.add_argument("--shape-contrast", type=float, default=0.4)
    parser.add_argument("--num-train", type=int, default=8000)
    parser.add_argument("--num-val", type=int, default=1000)
    for name, value in {**TINY_VIT, **TINY_VIT_RECIPE}.items():  # the recipe quality.py attributes
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> Dict[str, Any]:
    args = parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    # The datamodule's own normalisation, which the model takes: as quality.py builds this ViT.
    data = SyntheticSpuriousDataModule(
        num_classes=args.num_classes,
        img_size=args.img_size,
        cue_correlation=args.cue_correlation,
        shape_contrast=args.shape_contrast,
        num_train=args.num_train,
        num_val=args.num_val,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    recipe = {name: getattr(args, name) for name in {**TINY_VIT, **TINY_VIT_RECIPE}}
    model = ViTClassifier(
        num_classes=args.num_classes, img_size=args.img_size, mean=data.mean, std=data.std, **recipe
    )
    history = EpochHistory()
    trainer = quiet_trainer(max_epochs=args.epochs, callbacks=[history])
    trainer.fit(model, datamodule=data)
    result = {
        "settings": vars(args),
        "val_acc": history.rows[-1]["val_acc"],
        "wall_s": history.rows[-1]["wall_s"],
        "cpu_s": history.rows[-1]["cpu_s"],
        "target_met": history.rows[-1]["val_acc"] >= 0.9 and history.rows[-1]["wall_s"] <= 300,
        "history": history.rows,
    }
    if args.cue_correlation is not None:
        # Validation cues are independent of the label, so the cue-conflicting images tell a model
        # that reads the cue (it predicts the cue's class) from one that reads the shape.
        probe = data.probe_batch(min(512, args.num_val))
        # probe_cue_consistent, probe_cue_conflicting (accuracies) and probe_follows_cue (cue_accuracy's).
        for group, (count, total) in cue_accuracy(model, probe).items():
            result[f"probe_{group.replace('-', '_')}"] = round(count / max(total, 1), 4)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
