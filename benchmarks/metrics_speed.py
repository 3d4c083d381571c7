"""Insertion + deletion cost per image: the batched metric against the naive RISE loop.

timm ViT-B/16 at 224 px (``--model``) with random weights, one-patch steps (256 pixels, 196 steps),
two threads. The naive loop (RISE's ``single_run``: one image, one step, one forward at
a time) runs only ``--naive-steps`` steps of each game, timed before and after the
batched run, and is extrapolated to the full ``2 (n + 1) + 1`` forwards (clean image
for the target, then ``n + 1`` scores per game). Both run in fp32 on the same device,
with TF32 off unless ``--tf32``. Prints one JSON line.

The line also bounds what any implementation could reach: the metric's numbers match the
naive loop's, so it must score the same ``2 n + 1`` distinct images (the clean one serves the
target, deletion's first step and insertion's last), and no forward runs faster than its
FLOPs at the device's measured matrix-product peak. ``speedup_bound`` is the naive loop's
time over ``2 n + 1`` forwards at that peak.

    python benchmarks/metrics_speed.py
    python benchmarks/metrics_speed.py --images 2 --batch-size 32
    python benchmarks/metrics_speed.py --device cuda --images 8 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from typing import Tuple

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from caap_lightning.metrics import insertion_deletion
from caap_lightning.metrics.functional import default_step
from caap_lightning.utils import gaussian_blur, upsample_maps

from harness import synchronize


def forward_flops(model, image) -> int:
    """Floating-point operations of one forward of ``image``, attention's products included."""
    attentions = [m for m in model.modules() if hasattr(m, "fused_attn")]
    fused = [m.fused_attn for m in attentions]
    for m in attentions:  # FlopCounterMode does not count the CPU's fused attention kernel
        m.fused_attn = False
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(image[None])
    finally:
        for m, flag in zip(attentions, fused):
            m.fused_attn = flag
    return counter.get_total_flops()


def matmul_peak_flops(device: torch.device, repeats: int = 5) -> float:
    """The best FLOP rate of large square matrix products, the device's practical peak."""
    sizes = (4096, 8192) if device.type == "cuda" else (2048, 4096)
    best = 0.0
    for size in sizes:
        a, b = torch.randn(2, size, size, device=device)
        a @ b  # warm-up
        for _ in range(repeats):
            synchronize(device)
            start_time = time.perf_counter()
            a @ b
            synchronize(device)
            best = max(best, 2 * size**3 / (time.perf_counter() - start_time))
    return best


def naive_seconds_per_forward(model, image, pixel_map, step: int, steps: int) -> float:
    """Seconds per forward of RISE's loop, over its first ``steps`` steps of each game."""
    c = image.shape[0]
    synchronize(image.device)
    order = torch.argsort(pixel_map.flatten(), descending=True, stable=True)
    blurred = gaussian_blur(image[None])[0]
    start_time = time.perf_counter()
    with torch.no_grad():
        target = int(model(image[None]).argmax(1))
        for start, finish in ((image.clone(), torch.zeros_like(image)), (blurred, image)):
            for i in range(steps):
                float(model(start[None]).softmax(1)[0, target])
                coords = order[step * i : step * (i + 1)]
                start.view(c, -1)[:, coords] = finish.reshape(c, -1)[:, coords]
    return (time.perf_counter() - start_time) / (1 + 2 * steps)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--naive-steps", type=int, default=6, help="steps per game the naive loop runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default="vit_base_patch16_224", help="a timm ViT (random weights)")
    parser.add_argument("--tf32", action="store_true", help="let CUDA matrix products use TF32 (both runs)")
    return parser.parse_args()


def timed_runs(model, images, maps, pixel_map, step: int, args: argparse.Namespace) -> Tuple[float, float, float]:
    """Seconds per forward of the naive loop before and after the batched run, and the batched seconds per image."""
    device = images.device
    # Warm-up: CUDA context, kernels, thread pools and allocator stay out of the timings.
    with torch.no_grad():
        model(images[:1].expand(args.batch_size, -1, -1, -1))
    naive_seconds_per_forward(model, images[0], pixel_map, step, 1)
    naive_before = naive_seconds_per_forward(model, images[0], pixel_map, step, args.naive_steps)
    synchronize(device)
    start_time = time.perf_counter()
    insertion_deletion(model, images, maps, step=step, batch_size=args.batch_size)
    synchronize(device)
    batched = (time.perf_counter() - start_time) / args.images
    naive_after = naive_seconds_per_forward(model, images[0], pixel_map, step, args.naive_steps)
    return naive_before, batched, naive_after


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(device)
    size = model.patch_embed.img_size
    grid = model.patch_embed.grid_size
    images = torch.randn(args.images, 3, *size).to(device)
    maps = torch.rand(args.images, *grid).to(device)
    step = default_step(model)  # one patch per step, the metric's default
    n = math.ceil(math.prod(size) / step)
    pixel_map = upsample_maps(maps[:1], tuple(size))[0]  # as the metric ranks the pixels
    naive_before, batched, naive_after = timed_runs(model, images, maps, pixel_map, step, args)
    forwards = 2 * (n + 1) + 1  # the naive loop's: the clean image's target, then n + 1 per game
    naive_per_forward = (naive_before + naive_after) / 2
    naive = naive_per_forward * forwards
    distinct = 2 * n + 1  # images any implementation must score
    flops = forward_flops(model, images[0])
    peak = matmul_peak_flops(device)
    floor = flops / peak  # seconds per forward at the peak: no implementation goes below it

    print(
        json.dumps(
            {
                "benchmark": "insertion+deletion seconds per image",
                "model": f"{args.model}, random weights",
                "image_size": size[0],
                "step_pixels": step,
                "steps": n,
                "threads": args.threads,
                "tf32": args.tf32,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "batched_images": args.images,
                "batch_size": args.batch_size,
                "batched_s_per_image": round(batched, 2),
                "naive_s_per_image": round(naive, 2),
                "naive_extrapolated": (
                    f"{args.naive_steps} of {n + 1} steps per game, timed before and after the "
                    f"batched run, scaled to {forwards} forwards"
                ),
                "naive_s_per_forward": [round(naive_before, 4), round(naive_after, 4)],
                "speedup": round(naive / batched, 2),
                "target_speedup": 10,
                "forward_gflop": round(flops / 1e9, 2),
                "matmul_peak_gflops": round(peak / 1e9, 1),
                "naive_share_of_peak": round(floor / naive_per_forward, 3),
                "batched_share_of_peak": round(floor * distinct / batched, 3),
                "speedup_bound": round(naive / (floor * distinct), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
