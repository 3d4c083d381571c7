"""Attribution quality of ConvCAAP and the CNN baselines, in the paper's format (its Tables 14-15).

Trains a small timm ResNet from scratch (seeded, CPU) on the synthetic shapes or on
Fashion-MNIST garments on a canvas (``--data``), neither with a spurious cue, through the
project's own ``ViTClassifier`` (which takes any timm model); then, on held-out images
(``probe_batch``: seeded validation images never used for training), scores each method's
maps for the true class with the project's metrics, as ``quality.py`` does for the ViT:
Deletion, Insertion, InsDel (RISE protocol), AUPR1, AUPR0 and the pointing game, mean ±
standard error over images, plus seconds per map.

Methods: ConvCAAP ``standard`` and ``frozen`` at the default cut (the middle stage boundary)
and at every cut (the cumulative sweep, as a plot), Grad-CAM (the last stage, as
pytorch-grad-cam does for ResNets), Input×Gradient, occlusion (captum), Simple Insertion and
Simple Deletion and Random. The pixel methods use ConvCAAP's patch grid at the default cut
so that every map but Grad-CAM's has the same resolution.

Writes ``quality-cnn-<data>.json``, ``quality-cnn-<data>.md`` and
``quality-cnn-<data>_cut_sweep.png`` to ``--out``.

    python benchmarks/quality_cnn.py --data shapes
    python benchmarks/quality_cnn.py --data fashion     # needs Fashion-MNIST (see FashionCanvasDataModule)
    python benchmarks/quality_cnn.py --quick            # smoke run: tiny training, 8 images
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import lightning as L
import torch

from caap_lightning.attribution import get_method
from caap_lightning.models import ViTClassifier

from harness import FASHION_CLASSES, METHOD_NAMES, RESULTS, accuracy, fit_timed
from map_quality import METRICS, fmt_diff, fmt_stat, paired, score_method, score_table, seconds_per_image, testbed_data

LABELS = {
    **METHOD_NAMES,
    "caap_standard": "ConvCAAP standard", "caap_frozen": "ConvCAAP frozen",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("shapes", "fashion"), default="shapes")
    parser.add_argument("--model", default="resnet10t", help="a timm CNN that ConvCAAP supports")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 short epoch, 8 images")
    parser.add_argument("--num-images", type=int, default=200, help="held-out images for the main table")
    parser.add_argument("--sweep-images", type=int, default=100, help="the first images of those, for the cut sweep")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--num-train", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=25, help="images per attribute() call")
    parser.add_argument("--metric-batch", type=int, default=256, help="perturbed images per metric forward")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fashion-root", default=str(Path(tempfile.gettempdir()) / "caap-fashion"))
    parser.add_argument("--out", help=f"output folder (default {RESULTS}; a temporary one with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.num_train, args.num_images, args.sweep_images = 1, 512, 8, 8
    args.sweep_images = min(args.sweep_images, args.num_images)
    args.out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "caap-quality-cnn-quick" if args.quick else RESULTS)
    return args


def build(args: argparse.Namespace) -> Tuple[ViTClassifier, L.LightningDataModule]:
    data = testbed_data(args)
    module = ViTClassifier(model_name=args.model, pretrained=False, num_classes=data.num_classes, img_size=data.img_size,
                           lr=2e-3, weight_decay=0.05, warmup_epochs=0.5, mean=data.mean, std=data.std)
    return module, data


def main_methods(grid: Tuple[int, int]) -> Dict[str, Tuple[str, Dict[str, Any]]]:
    """Table name -> (registry name, arguments)."""
    pixel = {"grid": grid}
    return {
        "random": ("random", pixel),
        "gradcam": ("gradcam", {}),
        "input_x_gradient": ("input_x_gradient", pixel),
        "simple_insertion": ("simple_insertion", pixel),
        "simple_deletion": ("simple_deletion", pixel),
        "occlusion": ("occlusion", pixel),
        "caap_standard": ("caap", {"construction": "standard"}),
        "caap_frozen": ("caap", {"construction": "frozen"}),
    }


def plot_cut_sweep(sweep: Dict[str, Dict[str, Dict[str, Any]]], names: List[str], default: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    x = list(range(len(names)))
    for ax, construction in zip(axes, ("standard", "frozen")):
        for metric, label in (("insdel", "InsDel"), ("aupr_fg", "AUPR1"), ("pointing_game", "PG")):
            rows = [sweep[construction][n] for n in names]
            ax.errorbar(x, [r[metric]["mean"] for r in rows], yerr=[r[metric]["sem"] for r in rows],
                        marker="o", capsize=3, label=label)
        ax.axvline(names.index(default), color="grey", linestyle=":", label=f"default cut {default}")
        ax.set_xticks(x, names, rotation=30, fontsize=8)
        ax.set_title(f"ConvCAAP {construction}: cut sweep")
        ax.set_xlabel("cut (stage output patched)")
    axes[0].set_ylabel("score (mean ± sem)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(report: Dict[str, Any], verdicts: List[str]) -> str:
    model, settings = report["model"], report["settings"]
    n, n_sweep = settings["num_images"], settings["sweep_images"]
    stem = f"quality-cnn-{settings['data']}"
    out = [
        f"# Attribution quality on a CNN: ConvCAAP against the baselines ({settings['data']})",
        "",
        f"Generated by `benchmarks/quality_cnn.py --data {settings['data']}`"
        f"{' --quick (a smoke run: not results)' if settings['quick'] else ''}. Model: timm `{model['name']}` "
        f"({model['parameters'] / 1e6:.1f} M parameters) trained from scratch (seeded, CPU, {model['epochs']} epochs on "
        f"{model['num_train']} images, {model['train_seconds'] / 60:.1f} min) on {model['data']} "
        f"({model['num_classes']} classes, {model['img_size']} px, no cue); validation accuracy "
        f"{100 * model['val_accuracy']:.1f}% ({model['val_images']} images), {100 * model['probe_accuracy']:.1f}% on "
        f"the {n} held-out images below. The whole run took {settings['total_seconds'] / 60:.0f} min wall on a "
        "machine shared with other jobs.",
        "",
        f"Maps are for the true class; metrics are means ± standard error over {n} held-out images, in percent as "
        f"in the paper: Deletion/Insertion AUC (RISE protocol, {settings['insdel_step_pixels']} pixels per step), "
        "InsDel = Ins - Del, AUPR1/AUPR0 and the pointing game against the object masks. ConvCAAP's default cut is "
        f"`{settings['default_cut']}` (the middle stage boundary), giving a {settings['grid'][0]}x{settings['grid'][1]} "
        "patch grid; the pixel methods use the same grid, Grad-CAM the last stage's map "
        f"({settings['gradcam_grid'][0]}x{settings['gradcam_grid'][1]}). Seconds per map: one `attribute` call on "
        f"{settings['batch']} images, wall time on {settings['threads']} CPU threads ({settings['machine']}), the "
        "fastest of 3 rounds taken in turns.",
        "",
        "## Main table",
        "",
        *score_table(report["methods"], list(report["methods"]), label=LABELS.get),
        "",
        f"## Cut sweep (cumulative: the stages after the cut run on the patched map; first {n_sweep} images)",
        "",
    ]
    for construction, rows in report["cut_sweep"].items():
        out += [f"### {construction}", "", *score_table(rows, list(rows), first="cut", label=lambda v: v), ""]
    out += [f"![cut sweep]({stem}_cut_sweep.png)", "", "## What the numbers say", "", *[f"- {v}" for v in verdicts], "",
            "## Caveats", "",
            "- One small model, one seed, one data set per table: the standard errors cover the choice of images only.",
            "- Grad-CAM's map has the last stage's resolution, coarser than the others': that is the method as "
            "it is used, and part of what its localisation scores measure.",
            "- Input×Gradient multiplies by the normalised input, larger on the object than on the background here, "
            "so its AUPR and PG partly measure the image.", ""]
    return "\n".join(out)


def verdicts_for(report: Dict[str, Any], per_image: Dict[str, Dict[str, torch.Tensor]], n: int) -> List[str]:
    methods = report["methods"]
    baselines = [m for m in methods if not m.startswith("caap")]
    says = []
    for metric, label in (("insdel", "InsDel"), ("aupr_fg", "AUPR1"), ("pointing_game", "PG")):
        top = max(methods, key=lambda m: methods[m][metric]["mean"])
        top_base = max(baselines, key=lambda m: methods[m][metric]["mean"])
        for caap in ("caap_standard", "caap_frozen"):
            d = paired(per_image[caap], per_image[top_base], metric, n)
            says.append(f"{label}: best overall {LABELS[top]} ({fmt_stat(methods[top][metric])}); {LABELS[caap]} minus the "
                        f"best baseline {LABELS[top_base]}: {fmt_diff(d)}"
                        f"{' (significant at 2 sem)' if abs(d['mean']) > 2 * d['sem'] else ' (within 2 sem)'}.")
    for construction, rows in report["cut_sweep"].items():
        best = max(rows, key=lambda c: rows[c]["insdel"]["mean"])
        says.append(f"{construction}: the cut with the best mean InsDel (what `layer_cutoff=\"auto\"` picks on such a "
                    f"probe) is `{best}` ({fmt_stat(rows[best]['insdel'])}).")
    return says


def main() -> Dict[str, Any]:
    args = parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    started = time.perf_counter()
    module, data = build(args)
    data.prepare_data()
    data.setup()
    training = fit_timed(module, data, args.epochs, args.num_train)
    model = module.model.eval()
    probe = data.probe_batch(args.num_images)
    images, labels, masks = probe.images, probe.labels, probe.masks
    default = get_method("caap", model)
    grid = tuple(default.attribute(images[:1], target=labels[:1]).shape[-2:])
    step = (data.img_size // grid[0]) * (data.img_size // grid[1])  # one patch per step, as quality.py
    with torch.no_grad():
        probe_acc = (model(images).argmax(-1) == labels).double().mean().item()
    report: Dict[str, Any] = {
        "model": {"name": args.model, "parameters": sum(p.numel() for p in model.parameters()), **training,
                  "data": "the synthetic shapes" if args.data == "shapes" else
                          f"Fashion-MNIST classes {FASHION_CLASSES} on a canvas",
                  "num_classes": data.num_classes, "img_size": data.img_size,
                  "val_accuracy": round(accuracy(model, data), 4), "val_images": len(data.sources()[1]),
                  "probe_accuracy": round(probe_acc, 4), "seed": args.seed},
        "settings": {"data": args.data, "quick": args.quick, "num_images": len(images), "sweep_images": args.sweep_images,
                     "threads": args.threads, "batch": args.batch, "machine": f"{platform.machine()}, torch {torch.__version__}",
                     "target": "true class", "insdel_step_pixels": step, "default_cut": default.cut_name, "grid": grid},
        "methods": {}, "cut_sweep": {},
    }
    per_image: Dict[str, Dict[str, torch.Tensor]] = {}
    timed: Dict[str, Any] = {}

    def run(label: str, name: str, kwargs: Dict[str, Any], n: int) -> Dict[str, Any]:
        method = get_method(name, model, **kwargs)
        scores, row, maps = score_method(method, model, images[:n], labels[:n], masks[:n], step, args.batch, args.metric_batch)
        per_image[label], timed[label] = scores, method
        row["grid"] = list(maps.shape[-2:])
        print(json.dumps({"config": label, **{m: row[m]["mean"] for m in METRICS},
                          "elapsed_s": round(time.perf_counter() - started)}), flush=True)
        return row

    for label, (name, kwargs) in main_methods(grid).items():
        report["methods"][label] = run(label, name, kwargs, len(images))
    report["settings"]["gradcam_grid"] = report["methods"]["gradcam"]["grid"]
    for construction in ("standard", "frozen"):
        rows = {}
        for cut in default.cut_names:
            rows[cut] = run(f"{construction}@{cut}", "caap", {"construction": construction, "layer_cutoff": cut},
                            args.sweep_images)
        report["cut_sweep"][construction] = rows
    seconds = seconds_per_image(timed, images[:args.batch], labels[:args.batch])
    for label, row in report["methods"].items():
        row["seconds_per_image"] = seconds[label]
    for construction, rows in report["cut_sweep"].items():
        for cut, row in rows.items():
            row["seconds_per_image"] = seconds[f"{construction}@{cut}"]
    report["verdicts"] = verdicts_for(report, per_image, len(images))
    report["settings"]["total_seconds"] = round(time.perf_counter() - started, 1)
    stem = f"quality-cnn-{args.data}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report, report["verdicts"]))
    plot_cut_sweep(report["cut_sweep"], list(default.cut_names), default.cut_name, args.out / f"{stem}_cut_sweep.png")
    print(f"wrote {args.out}/{stem}.md, .json and the cut sweep plot in {report['settings']['total_seconds']} s")
    return report


if __name__ == "__main__":
    main()
