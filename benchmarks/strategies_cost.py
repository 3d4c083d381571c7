"""What strategy discovery costs per check, beside the CAAP maps it clusters; one JSON object.

For probes of 64 and 256 images of the demo's size (64 px, a 4-class tiny ViT with 8 px patches and
random weights: the cost does not depend on what the weights learnt), it times, as medians over
``--repeats`` runs:

- ``strategies_s``: the monitor's strategy step, split into ``cluster_s`` (spectral clustering of
  all images and of each class, :func:`discover_strategies`) and ``figures_s`` (drawing and writing
  the strategy grids and text to a TensorBoard logger, :func:`log_strategies`);
- ``fixed_position_ratio_s``: the fixed-position score of those maps (at the image size);
- ``caap_maps_s``: the CAAP maps themselves (the callback's default construction, ``windowed``),
  for comparison: what a check pays anyway.

    python benchmarks/strategies_cost.py
    python benchmarks/strategies_cost.py --sizes 64 256 --repeats 3 --out benchmarks/results/strategies-cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import timm
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from caap_lightning import CAAP
from caap_lightning.callbacks import ProbeResult
from caap_lightning.callbacks.strategies import discover_strategies, log_strategies
from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.metrics import fixed_position_ratio
from caap_lightning.utils import upsample_maps

from harness import TINY_VIT, quiet_trainer, synchronize

HALF = (0.5, 0.5, 0.5)
IMAGE_SIZE = 64  # caap_lightning/configs/demo.yaml
NUM_CLASSES = 4
EXAMPLES = 3  # SpuriousCueMonitor's strategy_examples default
MAX_CLUSTERS = 6  # its strategy_max_clusters default


def demo_vit(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMAGE_SIZE, num_classes=NUM_CLASSES,
                              **TINY_VIT)
    return model.eval().to(device)


def seconds(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs, after one untimed warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe_result(images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor) -> ProbeResult:
    """A check's result as the monitor reads it: the maps, the probe and the explained classes."""
    n = len(images)
    return ProbeResult(
        epoch=0, step=0, stage="fit", metrics={}, targets=targets, scores=torch.full((n,), 0.5),
        method_maps={"caap": maps}, probe=ProbeBatch(images=images, labels=targets), mean=HALF, std=HALF,
        class_names=[f"class{c}" for c in range(NUM_CLASSES)],
    )


def measure(n: int, model: torch.nn.Module, device: str, repeats: int, log_dir: str) -> Dict[str, float]:
    generator = torch.Generator().manual_seed(n)
    images = torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1
    targets = torch.randint(NUM_CLASSES, (n,), generator=generator)
    caap = CAAP(model, construction="windowed", window=2, mean=HALF, std=HALF)
    on_device = images.to(device)
    caap_s = seconds(lambda: caap.attribute(on_device, target=targets.to(device), relative=True), repeats, device)
    maps = caap.attribute(on_device, target=targets.to(device), relative=True).float().cpu()
    result = probe_result(images, maps, targets)
    trainer = quiet_trainer(logger=TensorBoardLogger(log_dir, name=f"n{n}"))
    groups = discover_strategies(maps, targets, result.class_name, max_clusters=MAX_CLUSTERS)
    cluster_s = seconds(lambda: discover_strategies(maps, targets, result.class_name, max_clusters=MAX_CLUSTERS),
                        repeats, "cpu")
    figures_s = seconds(lambda: log_strategies(trainer, "spurious", result, groups, "caap", "CAAP", EXAMPLES),
                        repeats, "cpu")
    pixel_maps = upsample_maps(maps, (IMAGE_SIZE, IMAGE_SIZE))
    fixed_s = seconds(lambda: fixed_position_ratio(pixel_maps), repeats, "cpu")
    return {
        "probe_images": n,
        "groups_clustered": len(groups),
        "strategies_found": {name: len(g.strategies) for name, g in groups.items()},
        "strategies_s": cluster_s + figures_s,
        "cluster_s": cluster_s,
        "figures_s": figures_s,
        "fixed_position_ratio_s": fixed_s,
        "caap_maps_s": caap_s,
        "strategies_over_caap_maps": (cluster_s + figures_s) / caap_s,
    }


def environment(device: str) -> Dict[str, object]:
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "model": {"img_size": IMAGE_SIZE, "num_classes": NUM_CLASSES, **TINY_VIT},
        "caap": {"construction": "windowed", "window": 2},
    }


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where the CAAP maps run (the strategy step runs on the CPU)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = demo_vit(args.device)
    with tempfile.TemporaryDirectory() as log_dir:
        rows = [measure(n, model, args.device, args.repeats, log_dir) for n in args.sizes]
    report = {"benchmark": "strategies_cost", "repeats": args.repeats, "environment": environment(args.device),
              "results": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
