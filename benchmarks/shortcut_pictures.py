"""What the shortcut alarm shows on a real run where the probe has object masks only, or no masks.

Trains the ViT of ``spurious.py``'s recipe (``--data shapes`` or ``fashion``) on images whose cue
(``--cue``: by default a background colour) names the label in every training image, with three
``CAAPCallback``/``SpuriousCueMonitor`` pairs on one fit, each watching what the monitor's defaults watch for
its probe: one whose probe has the objects' masks but no cue masks (``background_swap_follow_share``), one whose
probe has the cue masks only (``cue_swap_follow_share``), and one whose probe has images and labels only
(``border_swap_follow_share``; it also discovers strategies). A ``CSVLogger`` makes the callbacks save their
figures as PNG files; the ones the docs show are copied to ``--out`` (named by ``--name``), and a JSON summary of
the scores and alarms is printed and saved.

    python benchmarks/shortcut_pictures.py --data fashion --cue background --name shortcut-background
    python benchmarks/shortcut_pictures.py --data fashion --cue border --name shortcut-border
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.models import ViTClassifier

from cue_runs import RECIPES, build_data
from harness import quiet_trainer

DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="shapes", choices=("shapes", "fashion"))
    parser.add_argument("--cue", default="background", choices=("marker", "watermark", "border", "background"))
    parser.add_argument("--cue-correlation", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--probe-images", type=int, default=64,
                        help="probe images of each pair: the swap ratios swap them all; the object-masks pair's maps explain "
                             "CAAPCallback's default 16 of them, the no-masks pair's all of them, for strategy discovery")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fashion-root", default=str(Path(tempfile.gettempdir()) / "caap-fashion"))
    parser.add_argument("--out", type=Path, default=DOCS_IMAGES)
    parser.add_argument("--name", default="shortcut", help="the stem of the pictures and the JSON")
    return parser.parse_args()


def main() -> Dict[str, Any]:
    args = parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    recipe = RECIPES[args.data]
    settings = {"recipes": RECIPES, "num_val": 512, "fashion_root": args.fashion_root}
    data = build_data(args.data, args.cue, args.cue_correlation, args.seed, settings)
    data.prepare_data()
    data.setup("fit")
    probe = data.probe_batch(args.probe_images)
    objects = ProbeBatch(images=probe.images, labels=probe.labels, masks=probe.masks)
    cues = ProbeBatch(images=probe.images, labels=probe.labels, cue_masks=probe.cue_masks)
    model = ViTClassifier(**recipe["model"], num_classes=data.num_classes, img_size=data.img_size,
                          mean=data.mean, std=data.std)
    # Each monitor named: with several CAAPCallbacks the default would take the first one's score.
    unmasked = SpuriousCueMonitor(monitor="caap_none/border_swap_follow_share", prefix="spurious_none")
    callbacks = [
        CAAPCallback(probe=objects, prefix="caap_object", max_images_logged=6),
        SpuriousCueMonitor(monitor="caap_object/background_swap_follow_share", prefix="spurious_object"),
        CAAPCallback(probe=cues, prefix="caap_cue", max_images_logged=6),
        SpuriousCueMonitor(monitor="caap_cue/cue_swap_follow_share", prefix="spurious_cue"),
        CAAPCallback(probe=(probe.images, probe.labels), num_images=len(probe), prefix="caap_none", max_images_logged=6),
        unmasked,  # it also discovers the strategies, among the maps of all the probe's images
    ]
    with tempfile.TemporaryDirectory() as tmp:
        logger = CSVLogger(tmp, name="shortcut")
        trainer = quiet_trainer(max_epochs=args.epochs, limit_train_batches=recipe["batches_per_epoch"],
                                callbacks=callbacks, logger=logger)
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        wall = time.perf_counter() - start
        images = Path(logger.log_dir) / "caap_images"
        args.out.mkdir(parents=True, exist_ok=True)
        copied = []
        for pattern in ("spurious_object_alarm_images_step*.png", "spurious_cue_alarm_images_step*.png",
                        "spurious_none_alarm_images_step*.png", "spurious_none_strategies_all_step*.png"):
            found = sorted(images.glob(pattern), key=lambda p: int(p.stem.rsplit("step", 1)[1]))
            if found:  # the first alarm's figure, and the last check's strategies
                chosen = found[0] if "alarm" in pattern else found[-1]
                target = args.out / f"{args.name}-{pattern.split('_step')[0].replace('_', '-')}.png"
                shutil.copy(chosen, target)
                copied.append(str(target.relative_to(args.out.parents[1])))
    summary = {
        "command": f"python benchmarks/shortcut_pictures.py --data {args.data} --cue {args.cue} --name {args.name}",
        "setup": f"spurious.py's {args.data} recipe at {data.img_size} px, cue {args.cue!r} at "
                 f"correlation {args.cue_correlation}, {args.epochs} epochs of {recipe['batches_per_epoch']} batches",
        "wall_s": round(wall, 1),
        "scores": {cb.prefix: [row["score"] for row in cb.history] for cb in callbacks if isinstance(cb, SpuriousCueMonitor)},
        "watched": {cb.prefix: cb.monitor_key for cb in callbacks if isinstance(cb, SpuriousCueMonitor)},
        "alarm_epochs": {cb.prefix: [row["epoch"] for row in cb.alarms] for cb in callbacks
                         if isinstance(cb, SpuriousCueMonitor)},
        "strategies": {group: len(found.strategies) for group, found in unmasked.last_strategies.items()},
        "pictures": copied,
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
