"""What CAAPCallback adds to a ViT-B/16 training epoch on a GPU, at Oxford-IIIT Pet's scale; one JSON line.

A timm ViT-B/16 (random weights, 224 px, 4 classes, AdamW) trains ``--epochs`` epochs of 3,680
images (Pet's training split) at batch 32 and validates on ``--num-val`` images, with
``CAAPCallback``'s defaults on 16 probe images: once per CAAP construction and Trainer precision.
The training and validation images are random tensors (drawing 3,680 shapes at 224 px takes
minutes of CPU, which would time the loader rather than the model); the probe batch is real
shapes with masks, so every metric the callback logs by default runs. The overhead is the last
epoch's check / (epoch - check), with the clock of ``callback_overhead.py`` (the CPU demo's
measurement) and the GPU synchronised at each reading, the check's start and end included.

    python benchmarks/callback_overhead_gpu.py
    python benchmarks/callback_overhead_gpu.py --constructions parallel --precisions bf16-mixed
    python benchmarks/callback_overhead_gpu.py --accelerator cpu --model vit_tiny_patch16_224 \
        --num-train 64 --num-val 32 --precisions 32-true     # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from caap_lightning.callbacks import CAAPCallback
from caap_lightning.datamodules import SyntheticSpuriousDataModule
from caap_lightning.models import ViTClassifier

from harness import EpochClock, quiet_trainer


class RandomImages(Dataset):
    """``length`` samples cycling through 256 fixed random images and labels."""

    def __init__(self, length: int, img_size: int, num_classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.length = length
        self.images = torch.randn(256, 3, img_size, img_size, generator=g)
        self.labels = torch.randint(0, num_classes, (256,), generator=g)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.images[index % 256], self.labels[index % 256]


class PetScaleData(L.LightningDataModule):
    """Random training/validation tensors of Pet's size; the probe batch from the synthetic shapes."""

    def __init__(self, num_train: int, num_val: int, batch_size: int, img_size: int = 224, num_classes: int = 4) -> None:
        super().__init__()
        self.shapes = SyntheticSpuriousDataModule(num_classes=num_classes, img_size=img_size, cue_size=16,
                                                  num_train=16, num_val=64, num_test=16)
        self.mean, self.std, self.class_names = self.shapes.mean, self.shapes.std, self.shapes.class_names
        self.loaders = {split: DataLoader(RandomImages(n, img_size, num_classes), batch_size=batch_size,
                                          shuffle=split == "train", pin_memory=True)
                        for split, n in (("train", num_train), ("val", num_val))}

    def probe_batch(self, n: int):
        return self.shapes.probe_batch(n)

    def train_dataloader(self) -> DataLoader:
        return self.loaders["train"]

    def val_dataloader(self) -> DataLoader:
        return self.loaders["val"]


def measure(construction: str, precision: str, args: argparse.Namespace) -> Dict[str, Any]:
    L.seed_everything(0, verbose=False)
    data = PetScaleData(args.num_train, args.num_val, args.batch_size)
    model = ViTClassifier(args.model, num_classes=4, img_size=224, lr=1e-5, warmup_epochs=0,
                          mean=data.mean, std=data.std)
    clock = EpochClock()
    callback = CAAPCallback(construction=construction, on_error="raise")
    trainer = quiet_trainer(max_epochs=args.epochs, accelerator=args.accelerator, precision=precision,
                            callbacks=[clock, callback])
    trainer.fit(model, datamodule=data)
    last = clock.rows[-1]
    return {"construction": construction, "precision": precision, **last,
            "epochs": [{k: r[k] for k in ("epoch_wall_s", "check_wall_s", "overhead_wall")} for r in clock.rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--constructions", nargs="+", default=["parallel", "windowed"])
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--epochs", type=int, default=2, help="the last one is reported (the first pays warm-ups)")
    parser.add_argument("--num-train", type=int, default=3680)
    parser.add_argument("--num-val", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--accelerator", default="gpu")
    args = parser.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("callback_overhead_gpu.py needs a CUDA device; on a CPU, callback_overhead.py measures the demo")
    runs = [measure(m, p, args) for p in args.precisions for m in args.constructions]
    for run in runs:
        print(f"{run['construction']:<10}{run['precision']:<12}epoch {run['epoch_wall_s']:7.2f} s  "
              f"check {run['check_wall_s']:6.2f} s  overhead {100 * run['overhead_wall']:5.1f}%", file=sys.stderr)
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else "cpu"
    print(json.dumps({"benchmark": "callback_overhead_gpu", "model": args.model, "device": device,
                      "torch": torch.__version__, "num_train": args.num_train, "num_val": args.num_val,
                      "batch_size": args.batch_size, "runs": runs}))


if __name__ == "__main__":
    main()
