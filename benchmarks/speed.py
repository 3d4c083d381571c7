"""CAAP's cost against a plain forward, on timm ViT-B/16 (or, with ``--cnn``, ResNet-50) with random weights.

Prints a table and one JSON line (``--json PATH`` also writes it). Measures median
seconds of: a plain forward, CAAP ``parallel``, ``efficient``, ``windowed`` and ``standard``, the
package's ``gradcam`` and, when captum is installed, its ``occlusion`` (one patch per window); each as a
ratio to the plain forward, with the analytic FLOP ratio of ``parallel`` beside its measured ratio, and
the peak resident memory.

``--cnn`` instead times ConvCAAP on torchvision's ``resnet50()`` at each cut of ``--cnn-cuts``
(default: ConvCAAP's default cut and ``layer3``): seconds per image, the ratio to a plain forward
and the analytic ratio of ``ConvCAAP.cost()``.

    python benchmarks/speed.py                 # 224 px, batch 8
    python benchmarks/speed.py --img-size 448 --batch 2
    python benchmarks/speed.py --device cuda --batch 32 --precision bf16   # on a GPU, under bf16 autocast
    python benchmarks/speed.py --cnn --batch 1 --threads 1 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import timm
import torch

from caap_lightning import CAAP
from caap_lightning.attribution.cnn import ConvCAAP
from caap_lightning.attribution.registry import get_method
from caap_lightning.attribution.selection import selection_members

from harness import synchronize


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_macs(model, n_tokens: int) -> float:
    """Multiply-adds of a plain forward per image (linear layers + attention products)."""
    d = model.embed_dim
    hidden = model.blocks[0].mlp.fc1.out_features
    per_block = n_tokens * (4 * d * d + 2 * d * hidden) + 2 * n_tokens * n_tokens * d
    patches = n_tokens - model.num_prefix_tokens
    embed = patches * d * model.patch_embed.proj.in_channels * model.patch_embed.patch_size[0] ** 2
    return len(model.blocks) * per_block + embed


def parallel_macs(model, grid, k: int, selection: str) -> float:
    """Multiply-adds of CAAP ``parallel`` per image, counted the way it computes.

    One source forward; per patch, blocks 1..k compute the prefix rows only, blocks k+1..L
    the whole group (P + |S| rows, padded to the largest selection), the last block only
    the class token's query (token pooling); every query row scores all N blank keys.
    """
    d = model.embed_dim
    hidden = model.blocks[0].mlp.fc1.out_features
    n = grid[0] * grid[1]
    p = model.num_prefix_tokens
    m = selection_members(selection, grid)[0].shape[1]
    L = len(model.blocks)
    linear = 4 * d * d + 2 * d * hidden  # per computed row
    qkv = 3 * d * d

    def attention(rows, keys):
        return 2 * rows * keys * d

    total = 0.0
    for layer in range(L):
        if layer < k:
            total += p * linear + attention(p, p + m + n)
        elif layer == L - 1 and model.global_pool == "token":
            total += (p + m) * qkv + (linear - qkv) + attention(1, p + m + n)
        else:
            total += (p + m) * linear + attention(p + m, p + m + n)
    return forward_macs(model, p + n) + n * total


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layer-cutoff", type=int, default=6)
    parser.add_argument("--selection", default="box1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--standard-images", type=int, default=1,
                        help="images for 'standard' (N forwards each); its time is scaled to --batch")
    parser.add_argument("--window", type=int, default=2, help="radius of CAAP's windowed construction")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: every method under torch.autocast(bfloat16); fp32 keeps TF32 off")
    parser.add_argument("--skip", nargs="*", default=[], choices=["standard", "occlusion", "windowed"],
                        help="leave out the slow N-forward methods (e.g. at 448 px)")
    parser.add_argument("--cnn", action="store_true",
                        help="time ConvCAAP on torchvision resnet50() instead of the ViT's methods")
    parser.add_argument("--cnn-cuts", nargs="+", default=["default", "layer3"],
                        help="ConvCAAP cuts for --cnn: stage names, or 'default' for ConvCAAP's own")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--note", default=None, help="added to the JSON's notes (e.g. that the machine was shared)")
    parser.add_argument("--json", default=None, help="also write the JSON line to this path")
    return parser.parse_args()


def make_timer(args: argparse.Namespace, device: torch.device) -> Callable[..., float]:
    """``timed(name, fn, repeats, warmup)``: median seconds of ``fn`` under the run's precision."""
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if args.precision == "bf16" else contextlib.nullcontext
    )

    def timed(name: str, fn: Callable[[], object], repeats: int = args.repeats, warmup: bool = True) -> float:
        def run():
            with autocast():
                fn()
            synchronize(device)
        if warmup:
            run()
        seconds = median_seconds(run, repeats)
        print(f"  timed {name}: {seconds:.3f} s", file=sys.stderr, flush=True)
        return seconds

    return timed


def device_name(args: argparse.Namespace, device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({args.threads} threads, {platform.processor() or platform.machine()})"


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def vit_speed(args: argparse.Namespace, device: torch.device, timed: Callable[..., float]) -> dict:
    """The ViT's methods against its plain forward; prints the table and returns the JSON object."""
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval().to(device)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    target = torch.arange(args.batch, device=device) % model.num_classes
    grid = model.patch_embed.grid_size
    n_tokens = model.num_prefix_tokens + grid[0] * grid[1]

    results: Dict[str, float] = {}
    notes = []
    with torch.no_grad():
        results["forward_s"] = timed("forward", lambda: model(images))
    for construction in ("parallel", "efficient", "windowed"):
        if construction in args.skip:
            continue
        caap = CAAP(model, layer_cutoff=args.layer_cutoff, selection=args.selection, construction=construction,
                    window=args.window)
        results[f"{construction}_s"] = timed(construction, functools.partial(caap.attribute, images, target=target))

    # Textbook patching and occlusion are N full forwards per image: time a few images, scale to the batch.
    few = images[: args.standard_images]
    if "standard" not in args.skip:
        standard = CAAP(model, layer_cutoff=args.layer_cutoff, selection=args.selection, construction="standard")
        results["standard_s"] = timed("standard", lambda: standard.attribute(few, target=target[: len(few)]), repeats=1) * (
            args.batch / len(few)
        )
        notes.append(f"standard timed on {len(few)} image(s) and scaled to the batch")
    else:
        notes.append("standard skipped")

    gradcam = get_method("gradcam", model)
    results["gradcam_s"] = timed("gradcam", lambda: gradcam.attribute(images, target=target))

    if "occlusion" in args.skip:
        notes.append("occlusion skipped")
    elif importlib.util.find_spec("captum") is None:
        notes.append("captum not installed (pip install 'caap-lightning[baselines]')")
    else:
        occlusion = get_method("occlusion", model)
        results["occlusion_s"] = timed(
            "occlusion", lambda: occlusion.attribute(few, target=target[: len(few)]), repeats=1
        ) * (args.batch / len(few))
        notes.append(f"occlusion (captum, one patch per window) timed on {len(few)} image(s) and scaled to the batch")

    fwd = results["forward_s"]
    out = {
        "model": args.model,
        "img_size": args.img_size,
        "batch": args.batch,
        "patches": grid[0] * grid[1],
        "layer_cutoff": args.layer_cutoff,
        "selection": args.selection,
        "window": args.window,
        "precision": args.precision,
        "torch": torch.__version__,
        "device": device_name(args, device),
        **{k: round(v, 4) for k, v in results.items()},
        **{f"{k[:-2]}_ratio": round(v / fwd, 2) for k, v in results.items() if k != "forward_s"},
        "parallel_flop_ratio": round(parallel_macs(model, grid, args.layer_cutoff, args.selection) / forward_macs(model, n_tokens), 2),
        "peak_rss_mb": peak_rss_mb(),
        "notes": "; ".join(notes + ([args.note] if args.note else [])),
    }
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if "standard_ratio" in out:
        out["standard_over_parallel"] = round(out["standard_ratio"] / out["parallel_ratio"], 1)
    out["parallel_over_flop_ratio"] = round(out["parallel_ratio"] / out["parallel_flop_ratio"], 2)

    print(f"{'what':<12}{'seconds':>10}{'x forward':>11}")
    for key in results:
        name = key[:-2]
        ratio = 1.0 if key == "forward_s" else out[f"{name}_ratio"]
        print(f"{name:<12}{results[key]:>10.3f}{ratio:>11.2f}")
    print(f"parallel analytic FLOP ratio {out['parallel_flop_ratio']}, peak RSS {out['peak_rss_mb']} MB")
    return out


def cnn_speed(args: argparse.Namespace, device: torch.device, timed: Callable[..., float]) -> dict:
    """ConvCAAP on torchvision ResNet-50 at each cut of ``--cnn-cuts``; prints the table, returns the JSON object."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(device)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    target = torch.arange(args.batch, device=device) % 1000
    with torch.no_grad():
        forward = timed("forward", lambda: model(images)) / args.batch
    cuts: List[dict] = []
    for cut in args.cnn_cuts:
        caap = ConvCAAP(model, layer_cutoff=None if cut == "default" else cut)
        cost = caap.cost((args.img_size, args.img_size))
        # Hundreds of forwards per call: the forward above has warmed the kernels up.
        seconds = timed(f"ConvCAAP {caap.cut_name}", functools.partial(caap.attribute, images, target=target),
                        repeats=args.repeats, warmup=False) / args.batch
        cuts.append({
            "cut": caap.cut_name,
            "default_cut": cut == "default",
            "patches": cost["patches"],
            "s_per_image": round(seconds, 4),
            "ratio": round(seconds / forward, 2),
            "cost_ratio": round(cost["ratio"], 2),
            "measured_over_cost": round(seconds / forward / cost["ratio"], 2),
        })
    notes = [
        "seconds per image; ConvCAAP standard construction, box1, white blank; a call also runs the blank's "
        "forward once (cost() leaves it out: +1/batch forwards per image)",
        "ConvCAAP timed without a warm-up run of its own",
    ]
    out = {
        "model": "torchvision resnet50 (random weights)",
        "img_size": args.img_size,
        "batch": args.batch,
        "repeats": args.repeats,
        "precision": args.precision,
        "torch": torch.__version__,
        "device": device_name(args, device),
        "forward_s_per_image": round(forward, 4),
        "convcaap": cuts,
        "peak_rss_mb": peak_rss_mb(),
        "notes": "; ".join(notes + ([args.note] if args.note else [])),
    }
    print(f"{'what':<20}{'patches':>8}{'s/image':>10}{'x forward':>11}{'cost()':>9}")
    print(f"{'forward':<20}{'':>8}{forward:>10.3f}{1.0:>11.2f}{1.0:>9.2f}")
    for row in cuts:
        print(f"{'ConvCAAP ' + row['cut']:<20}{row['patches']:>8}{row['s_per_image']:>10.3f}{row['ratio']:>11.2f}"
              f"{row['cost_ratio']:>9.2f}")
    return out


def write(out: dict, path: Optional[str]) -> None:
    line = json.dumps(out)
    print(line)
    if path:
        with open(path, "w") as f:
            f.write(line + "\n")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    # fp32 means fp32: TF32 matrix units would change both the numbers and the timings.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    timed = make_timer(args, device)
    write((cnn_speed if args.cnn else vit_speed)(args, device, timed), args.json)


if __name__ == "__main__":
    main()
