"""Attribution quality of CAAP and the baselines, in the paper's format, with its ablations.

Two testbeds (``--data``): ``shapes`` trains the tiny ViT (4 blocks) on the synthetic shapes
without a spurious cue (the recipe of ``benchmarks/train_synthetic.py``); ``fashion`` trains a
deeper ViT (8 blocks, dim 128) on Fashion-MNIST garments placed on a canvas, with silhouette
masks (real images; Debian's ``dataset-fashion-mnist`` provides them offline). Either model is
trained here (fixed seed, CPU) or loaded from ``--checkpoint``. On a fixed held-out probe set
(``probe_batch``: seeded validation images, not used for training or model selection) every
method's maps for the true class are scored with the project's metrics: Deletion, Insertion,
InsDel (RISE protocol, one patch per step), AUPR1, AUPR0 and the pointing game, as mean ±
standard error over images, plus seconds per image.

CAAP runs as ``parallel``, ``efficient``, ``windowed`` (w = 2, 3, 4) and ``standard``
(textbook patching); the ablations vary one CAAP setting at a time around the defaults
(cumulative layer cutoff k = 0..L as in the paper's Fig. 7, selection, blank, score), and
"CAAP tuned" puts the ablations' winners together (chosen on the ablation images, scored on all).
Differences between settings are paired (same images), with their standard error. The
diagnoses say where CAAP loses, per image: saturated blanks, the border bias of the selection,
and E-CAAP's rank agreement with CAAP (``_diagnose.py``).

Writes ``<prefix>.json``, ``<prefix>.md``, ``<prefix>-per-image.csv`` (every score of every
image), ``<prefix>_layer_sweep.png`` and ``<prefix>_vs_cost.png`` to ``--out``, with prefix
``quality`` (shapes) or ``quality-fashion``.

    python benchmarks/quality.py                 # shapes: the full run (the report gives its time)
    python benchmarks/quality.py --data fashion  # Fashion-MNIST: the same, on the deeper ViT
    python benchmarks/quality.py --quick         # smoke run: tiny training, 8 images
    python benchmarks/quality.py --checkpoint vit.pt   # skip training
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import lightning as L
import torch

from caap_lightning.attribution import CAAP, get_method
from caap_lightning.attribution.blanks import BLANK_KINDS, prediction_entropy
from caap_lightning.attribution.selection import SELECTIONS
from caap_lightning.datamodules import SyntheticSpuriousDataModule
from caap_lightning.models import ViTClassifier

from _diagnose import border_bias, saturated, spearman
from harness import DEEP_VIT, METHOD_NAMES, RESULTS, TINY_VIT, TINY_VIT_RECIPE, accuracy, fit_timed
from map_quality import (
    METRICS, fmt_diff, fmt_stat, mean_sem, paired, score_method, score_table, seconds_per_image, summarise,
    testbed_data,
)

WINDOWS = (2, 3, 4)
# CAAP's defaults, read off its signature, around which each ablation varies one setting
# (caap_parallel's scores are reused as each ablation's default row; k defaults to L // 2).
DEFAULTS = {name: inspect.signature(CAAP).parameters[name].default for name in ("selection", "blank", "score")}
# The prototype's numbers quoted in issue 6 (200 images, tiny ViT at 98.8%): InsDel, AUPR1, PG.
PROTOTYPE = {
    "caap_parallel": (0.49, 0.46, 0.61),
    "caap_standard": (0.57, 0.59, 0.69),
    "rollout": (0.58, 0.57, 0.48),
    "gradcam": (0.28, 0.42, 0.33),
    "random": (0.41, 0.14, 0.12),
}
LABELS = {
    **{name: label for name, label in METHOD_NAMES.items() if name != "caap"},
    "caap_parallel": "CAAP parallel", "caap_efficient": "CAAP efficient (E-CAAP)",
    "caap_standard": "CAAP standard (textbook patching)",
    **{f"caap_windowed_w{w}": f"CAAP windowed w={w}" for w in WINDOWS},
    "caap_tuned": "CAAP tuned (parallel)", "caap_tuned_windowed": "CAAP tuned (windowed w=2)",
}


# Per testbed: the model, the training length and the held-out images (the paper scores 500).
TESTBEDS = {
    "shapes": {"vit": TINY_VIT, "epochs": 10, "num_train": 8000, "num_images": 500, "prefix": "quality"},
    "fashion": {"vit": DEEP_VIT, "epochs": 8, "num_train": 12000, "num_images": 500, "prefix": "quality-fashion"},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=tuple(TESTBEDS), default="shapes",
                        help="shapes: the synthetic shapes and the tiny ViT; fashion: Fashion-MNIST garments on a "
                             "canvas and the deeper ViT")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 short epoch, 8 images, 4 patches per step")
    parser.add_argument("--checkpoint", help="weights of the benchmark ViT (skip training)")
    parser.add_argument("--save-checkpoint", help="save the trained ViT's weights here")
    parser.add_argument("--num-images", type=int, help="held-out images for the main table (default: the testbed's)")
    parser.add_argument("--ablation-images", type=int, default=200, help="the first images of those, for ablations")
    parser.add_argument("--step-patches", type=int, default=1, help="patches revealed/deleted per insertion/deletion step")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the testbed's)")
    parser.add_argument("--num-train", type=int, help="training images (default: the testbed's)")
    parser.add_argument("--batch", type=int, default=25, help="images per attribute() call")
    parser.add_argument("--metric-batch", type=int, default=256, help="perturbed images per metric forward")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fashion-root", default=str(Path(tempfile.gettempdir()) / "caap-fashion"),
                        help="where Fashion-MNIST's IDX files are or get unpacked (from Debian's dataset-fashion-mnist)")
    parser.add_argument("--out", help=f"output folder (default {RESULTS}; a temporary one with --quick)")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the markdown report from a saved JSON report")
    args = parser.parse_args()
    testbed = TESTBEDS[args.data]
    for name in ("epochs", "num_train", "num_images"):
        if getattr(args, name) is None:
            setattr(args, name, testbed[name])
    if args.quick:
        args.epochs, args.num_train, args.num_images, args.ablation_images, args.step_patches = 1, 512, 8, 8, 4
    args.ablation_images = min(args.ablation_images, args.num_images)
    args.out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "caap-quality-quick" if args.quick else RESULTS)
    args.prefix = testbed["prefix"]
    return args


# ---------------------------------------------------------------- the model and the data


def build(args: argparse.Namespace) -> Tuple[ViTClassifier, L.LightningDataModule]:
    """The testbed's data, and its ViT (the recipe of ``benchmarks/train_synthetic.py``)."""
    data = testbed_data(args)
    module = ViTClassifier(
        num_classes=data.num_classes, img_size=data.img_size, **TESTBEDS[args.data]["vit"], **TINY_VIT_RECIPE,
        checkpoint_path=args.checkpoint, mean=data.mean, std=data.std,
    )
    return module, data


def data_recipe(data: L.LightningDataModule) -> str:
    if isinstance(data, SyntheticSpuriousDataModule):
        return (f"SyntheticSpuriousDataModule defaults (shape_contrast {data.shape_contrast}, object_size "
                f"{data.object_size}) with cue_correlation None")
    return (f"FashionCanvasDataModule, Fashion-MNIST classes {data.classes} ({', '.join(data.class_names)}), "
            f"object_size {data.object_size}, no cue")


def train(module: ViTClassifier, data: L.LightningDataModule, args: argparse.Namespace) -> Dict[str, Any]:
    training = fit_timed(module, data, args.epochs, args.num_train)
    if args.save_checkpoint:
        # timm's loader reads "state_dict"; "training" lets a --checkpoint run report how it was trained.
        torch.save({"state_dict": module.model.state_dict(), "training": training}, args.save_checkpoint)
    return training


def checkpoint_training(path: str) -> Dict[str, Any]:
    """The training record saved with ``--save-checkpoint`` (empty for other checkpoints)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return dict(saved.get("training", {})) if isinstance(saved, dict) else {}


# ---------------------------------------------------------------- the methods
def main_methods() -> Dict[str, Tuple[str, Dict[str, Any]]]:
    """Table name -> (registry name, arguments)."""
    methods: Dict[str, Tuple[str, Dict[str, Any]]] = {
        "random": ("random", {}),
        "gradcam": ("gradcam", {}),
        "rollout": ("rollout", {}),
        "tattr": ("tattr", {}),
        "input_x_gradient": ("input_x_gradient", {}),
        "simple_insertion": ("simple_insertion", {}),
        "simple_deletion": ("simple_deletion", {}),
        "occlusion": ("occlusion", {}),
        "caap_parallel": ("caap", {"construction": "parallel"}),
        "caap_efficient": ("caap", {"construction": "efficient"}),
    }
    methods.update({f"caap_windowed_w{w}": ("caap", {"construction": "windowed", "window": w}) for w in WINDOWS})
    methods["caap_standard"] = ("caap", {"construction": "standard"})
    return methods


def default_setting(ablation: str, default_layer_cutoff: int) -> str:
    return str(default_layer_cutoff) if ablation == "layer_cutoff" else DEFAULTS[ablation]


def ablation_settings(depth: int) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Ablation -> value -> CAAP (parallel) arguments; each varies one default."""
    return {
        "layer_cutoff": {str(k): {"layer_cutoff": k} for k in range(depth + 1)},
        "selection": {s: {"selection": s} for s in SELECTIONS},
        "blank": {b: {"blank": b} for b in BLANK_KINDS},
        "score": {s: {"score": s} for s in ("probability", "logit")},
    }


# The ablations' winners together, in the exact construction and in the callback's.
TUNED = {"caap_tuned": {"construction": "parallel"}, "caap_tuned_windowed": {"construction": "windowed", "window": 2}}


def tuned_settings(ablations: Dict[str, Dict[str, Dict[str, Any]]], depth: int) -> Dict[str, Any]:
    """Per ablation, the value with the largest mean paired gain in InsDel + AUPR1 over the default
    (the default where none gains), as CAAP arguments."""
    settings = ablation_settings(depth)
    chosen: Dict[str, Any] = {}
    for ablation, rows in ablations.items():
        gain = {v: r["vs_default"]["insdel"]["mean"] + r["vs_default"]["aupr_fg"]["mean"] for v, r in rows.items()}
        value = max(gain, key=gain.get)
        chosen.update(settings[ablation][value] if gain[value] > 0 else {})
    return chosen


# ---------------------------------------------------------------- evaluation


def versus_best_baseline(methods: Dict[str, Any], per_image: Dict[str, Dict[str, torch.Tensor]], configs: List[str],
                         n_chosen: int) -> List[Dict[str, Any]]:
    """Each config minus the best baseline of InsDel and of AUPR1, paired, on the images after the first
    ``n_chosen`` (not used to choose the config) and on all."""
    baselines = [m for m in methods if not m.startswith("caap")]
    rows = []
    for config in configs:
        for metric in ("insdel", "aupr_fg"):
            base = best(methods, baselines, metric)
            diff = per_image[config][metric] - per_image[base][metric]
            rows.append({"config": config, "metric": metric, "baseline": base,
                         "held_out": mean_sem(diff[n_chosen:]), "all": mean_sem(diff)})
    return rows


def leads(methods: Dict[str, Any], name: str, metric: str) -> bool:
    """``name`` is first on ``metric`` with a standard error bar that overlaps no other method's."""
    low = methods[name][metric]["mean"] - methods[name][metric]["sem"]
    return all(low > r[metric]["mean"] + r[metric]["sem"] for other, r in methods.items() if other != name)


def diagnoses(methods: Dict[str, Any], maps_of: Dict[str, torch.Tensor], per_image: Dict[str, Dict[str, torch.Tensor]],
              labels: torch.Tensor, masks: torch.Tensor) -> Dict[str, Any]:
    """Where CAAP loses, per image: saturated blanks, border bias and E-CAAP's agreement with CAAP."""
    out: Dict[str, Any] = {"saturated": {}, "border": {}, "per_image": {}}
    for label, maps in maps_of.items():
        n = len(maps)
        flags = None
        if hasattr(methods[label], "blank_score"):  # CAAP: its maps are scored against a blank
            blank = methods[label].blank_score(labels[:n], image_size=tuple(masks.shape[-2:]))
            flags = saturated(maps, blank)
            out["saturated"][label] = {"share": round(flags.double().mean().item(), 4), "n": n}
        bias = border_bias(maps, masks[:n])
        touches = bias["touches"].cpu()
        out["border"][label] = {
            "bias": mean_sem(bias["bias"]),
            "aupr_fg_touching": mean_sem(per_image[label]["aupr_fg"][touches]),
            "aupr_fg_inside": mean_sem(per_image[label]["aupr_fg"][~touches]),
        }
        out["per_image"][label] = {"saturated": flags, "border_bias": bias["bias"]}
    scores, flags = per_image["caap_parallel"], out["per_image"]["caap_parallel"]["saturated"]
    out["saturated_split"] = {
        metric: {"saturated": mean_sem(scores[metric][flags]), "not_saturated": mean_sem(scores[metric][~flags])}
        for metric in ("insdel", "aupr_fg")}
    out["rank_correlation"] = {
        other: rank_agreement(maps_of["caap_parallel"], maps_of[other])
        for other in ("caap_efficient", "caap_windowed_w2", "caap_standard") if other in maps_of}
    return out


def rank_agreement(a: torch.Tensor, b: torch.Tensor) -> Dict[str, Any]:
    """Spearman's rho between two methods' maps of each image, and how often their top patch agrees."""
    rho = spearman(a, b)
    top = a.flatten(1).argmax(1) == b.flatten(1).argmax(1)
    return {"spearman": mean_sem(rho), "median": round(rho.median().item(), 4), "min": round(rho.min().item(), 4),
            "share_above_0.9": round((rho > 0.9).double().mean().item(), 4),
            "top_patch_agrees": round(top.double().mean().item(), 4)}


def write_per_image(path: Path, per_image: Dict[str, Dict[str, torch.Tensor]], labels: torch.Tensor,
                    extra: Dict[str, Dict[str, Any]]) -> None:
    """One row per (configuration, image): every metric, and the diagnoses where they apply."""
    columns = [*METRICS, "substrate_is_target", "saturated", "border_bias"]
    lines = [",".join(["config", "image", "label", *columns])]
    for label, scores in per_image.items():
        if label not in extra:
            continue  # an ablation's default row: caap_parallel's first images again
        sat, bias = extra[label]["saturated"], extra[label]["border_bias"]
        for i in range(len(scores["insdel"])):
            values = [float(scores[m][i]) for m in METRICS] + [int(scores["substrate_is_target"][i])]
            values.append("" if sat is None else int(sat[i]))
            values.append(f"{float(bias[i]):.4f}")
            lines.append(",".join([label, str(i), str(int(labels[i])),
                                   *[f"{v:.5f}" if isinstance(v, float) else str(v) for v in values]]))
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- reports


def plot_layer_sweep(sweep: Dict[str, Dict[str, Any]], default_k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(k) for k in sweep)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for metric, label in (("insdel", "InsDel"), ("aupr_fg", "AUPR1"), ("pointing_game", "PG")):
        mean = [sweep[str(k)][metric]["mean"] for k in ks]
        sem = [sweep[str(k)][metric]["sem"] for k in ks]
        ax.errorbar(ks, mean, yerr=sem, marker="o", capsize=3, label=label)
    ax.axvline(default_k, color="grey", linestyle=":", label=f"default k = L//2 = {default_k}")
    ax.set_xlabel("layer cutoff k (blocks 1..k patched)")
    ax.set_ylabel("score (mean ± sem)")
    ax.set_xticks(ks)
    ax.set_title("CAAP cumulative layer sweep (cf. paper Fig. 7)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_quality_vs_cost(rows: Dict[str, Dict[str, Any]], names: List[str], path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric, label in ((axes[0], "insdel", "InsDel"), (axes[1], "aupr_fg", "AUPR1")):
        for name in names:
            row = rows[name]
            ax.errorbar(row["seconds_per_image"], row[metric]["mean"], yerr=row[metric]["sem"], marker="o",
                        capsize=3, label=name.replace("caap_", ""))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"seconds per map (wall, {threads} CPU threads)")
        ax.set_ylabel(f"{label} (mean ± sem)")
    axes[1].legend(fontsize=8)
    fig.suptitle("CAAP constructions: quality against cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def best(rows: Dict[str, Dict[str, Any]], names, metric: str) -> str:
    return max(names, key=lambda n: rows[n][metric]["mean"])


DATASETS = {
    "shapes": ("the synthetic shapes without a cue", "the exact shape masks"),
    "fashion": ("Fashion-MNIST garments on a canvas (real images, no cue)", "the garments' silhouette masks"),
}
CAVEATS = {
    "shapes": [
        "Input×Gradient multiplies the gradient by the normalised input, which on these images is larger on the "
        "shape (a brightness step of `shape_contrast` from a grey background near the normalisation mean) than on "
        "the background: its AUPR and PG partly measure the image rather than the model.",
    ],
    "fashion": [
        "Input×Gradient multiplies the gradient by the normalised input, which is near zero on the dark canvas and "
        "large on the bright garment: as on the shapes, its AUPR and PG partly measure the image.",
        "Four Fashion-MNIST classes (trouser, bag, sneaker, shirt), so that a deeper ViT reaches 90% in 30 CPU "
        "minutes; the paper's models are ImageNet ViT-B/L.",
    ],
}


def markdown(report: Dict[str, Any], verdicts: List[str]) -> str:
    """The whole report, one section after another."""
    return "\n".join([*header_section(report), *prototype_section(report), *ablation_section(report),
                      *why_section(report), *tuned_section(report), *ecaap_section(report),
                      *closing_section(report, verdicts)])


def header_section(report: Dict[str, Any]) -> List[str]:
    model, methods, settings = report["model"], report["methods"], report["settings"]
    n, n_ab = settings["num_images"], settings["ablation_images"]
    described, masks = DATASETS[settings["data"]]
    return [
        f"# Attribution quality: CAAP against the baselines ({settings['data']})",
        "",
        f"Generated by `benchmarks/quality.py --data {settings['data']}`"
        f"{' --quick (a smoke run: not results)' if settings['quick'] else ''}. "
        f"Model: timm ViT (patch {model['patch_size']}, {model['img_size']} px, dim {model['embed_dim']}, "
        f"depth {model['depth']}, {model['num_heads']} heads) {model['source']} on {described} "
        f"({model['num_classes']} classes); validation accuracy "
        f"{100 * model['val_accuracy']:.1f}% ({model['val_images']} images), "
        f"{100 * model['probe_accuracy']:.1f}% on the {n} held-out images below. Training: "
        f"{model.get('epochs', '?')} epochs on {model.get('num_train', '?')} images, "
        f"{model.get('train_cpu_seconds', float('nan')) / 60:.0f} CPU-min. The whole run took "
        f"{settings['total_seconds'] / 60:.0f} min wall ({settings['total_cpu_seconds'] / 60:.0f} CPU-min) on a "
        f"machine shared with other jobs.",
        "",
        f"Maps are for the true class. Metrics are means ± standard error over {n} held-out images "
        "(`probe_batch`: seeded validation images, never used for training or model selection), in "
        "percent as in the paper: Deletion/Insertion AUC (RISE protocol, "
        f"{settings['insdel_step_pixels']} pixels per step, blurred "
        "insertion start, normalised-zero deletion), InsDel = Ins - Del, AUPR1/AUPR0 (foreground/background "
        f"average precision) and the pointing game against {masks}. Seconds per image: one "
        f"`attribute` call on {settings['batch']} images, wall time on {settings['threads']} CPU threads of a "
        f"machine shared with other work ({settings['machine']}); the methods take turns over 3 rounds and "
        "each keeps its fastest (the JSON also has the process CPU seconds per image of the scored run). "
        "CAAP's defaults: "
        f"k = L//2 = {settings['default_layer_cutoff']}, {DEFAULTS['selection']}, {DEFAULTS['blank']} blank, "
        f"{DEFAULTS['score']}. Every score of every image: `{settings['prefix']}-per-image.csv`.",
        "",
        "## Main table",
        "",
        *score_table(methods, list(methods), label=LABELS.get),
        "",
        f"CAAP tuned: the ablations' best settings together ({tuned_text(report)}), chosen on the first {n_ab} "
        "images; *The ablations' best together* below scores it on the images not used to choose.",
        "",
        f"InsDel over the images whose deletion substrate is *not* classified as the target (the others "
        f"cannot show a falling deletion curve): see `insdel_informative` in the JSON "
        f"(CAAP parallel: {fmt_stat(methods['caap_parallel']['insdel_informative'])}, "
        f"n = {methods['caap_parallel']['insdel_informative']['n']}).",
        "",
    ]


def prototype_section(report: Dict[str, Any]) -> List[str]:
    if report["settings"]["data"] != "shapes":
        return []
    methods = report["methods"]
    out = ["## Against the prototype quoted in issue 6", "",
           "| Method | InsDel here | prototype | AUPR1 here | prototype | PG here | prototype |",
           "|---|---|---|---|---|---|---|"]
    for name, (insdel, aupr1, pg) in PROTOTYPE.items():
        row = methods[name]
        out.append(f"| {LABELS[name]} | {row['insdel']['mean']:.2f} | {insdel:.2f} | {row['aupr_fg']['mean']:.2f} | "
                   f"{aupr1:.2f} | {row['pointing_game']['mean']:.2f} | {pg:.2f} |")
    return out + [""]


def ablation_section(report: Dict[str, Any]) -> List[str]:
    model, settings = report["model"], report["settings"]
    n_ab, prefix = settings["ablation_images"], settings["prefix"]
    out = ["## Ablations (CAAP parallel, one setting varied from the defaults)", "",
           f"On the first {n_ab} of the held-out images. The paired difference is against the default "
           "setting on the same images (mean ± sem of the per-image difference). `blank=\"auto\"` picks, per "
           "model, the fixed blank whose prediction is closest to uniform (highest entropy).", ""]
    titles = {"layer_cutoff": "Layer cutoff k (cumulative: blocks 1..k patched; paper Fig. 7)",
              "selection": "Selection operator", "blank": "Blank", "score": "Score"}
    for ablation, rows in report["ablations"].items():
        out += [f"### {titles[ablation]}", "", *score_table(rows, list(rows), first=ablation, label=lambda v: v), ""]
        out += ["| " + ablation + " | ΔInsDel vs default | ΔAUPR1 vs default | ΔPG vs default |", "|---|---|---|---|"]
        for value, row in rows.items():
            d = row["vs_default"]
            out.append(f"| {value} | {fmt_diff(d['insdel'])} | {fmt_diff(d['aupr_fg'])} | {fmt_diff(d['pointing_game'])} |")
        out.append("")
        if ablation == "layer_cutoff":
            out += [f"![layer sweep]({prefix}_layer_sweep.png)", ""]
    out += ["### The blank's own class", "",
            f"Entropy in nats (uniform over {model['num_classes']} classes: {math.log(model['num_classes']):.3f}).", "",
            "| blank | class | probability | entropy |", "|---|---|---|---|"]
    for kind, b in report["blanks"].items():
        name = f"auto (= {b['is']})" if kind == "auto" else kind
        out.append(f"| {name} | {b['class']} | {b['probability']:.4f} | {b['entropy']:.3f} |")
    return out + [""]


def closing_section(report: Dict[str, Any], verdicts: List[str]) -> List[str]:
    model, settings = report["model"], report["settings"]
    prefix, data = settings["prefix"], settings["data"]
    return ["## InsDel by the target's class", "",
            "Classes differ in difficulty for every method (see Random): compare methods within a column. The "
            "white blank's class is one whose maps the blank saturates; the deletion substrate's class is one whose "
            "deletion curves cannot fall, for any method.", "",
            *by_class_table(report), "",
            "## Quality against cost of the CAAP constructions", "",
            "Error bars are the unpaired sem; the paired differences are under *What the numbers say*.", "",
            f"![quality vs cost]({prefix}_vs_cost.png)", "",
            "## What the numbers say", "", *[f"- {v}" for v in verdicts], "",
            "## Caveats", "",
            *[f"- {c}" for c in CAVEATS[data]],
            f"- The model has {model['depth']} blocks, so the cutoff sweep has {model['depth'] + 1} points; the paper's "
            "middle-layer argument concerns 12 to 24 block models. Timings are for a small model on CPU, where fixed "
            "per-call costs weigh more than at ViT-B scale (see `benchmarks/speed.py` for that).",
            "- One model, one seed, one data set: the standard errors cover the choice of images only.",
            "- `windowed` with w = 3 and 4 can score as well as `standard` or above it although it recomputes fewer "
            "tokens: on this 8x8 grid those windows still leave the tokens far from the patch frozen at the blank, a "
            "different intervention rather than a rougher copy of the same one. The construction itself converges: a "
            "window that covers the grid gives `standard`'s maps to 1e-5 (`tests/attribution/test_caap_oracle.py`).",
            "",
            "## The defaults these numbers support", "",
            "Rule: a setting is better than the default when its paired difference exceeds 2 sem on InsDel or "
            "AUPR1 and it is not 2 sem worse on the other. With about 24 such tests, one or two passes are "
            "expected by chance alone; a margin near 2 sem is a hint, not a verdict.", "",
            *[f"- {v}" for v in supported_defaults(report)], "",
            "What the project ships, and which method to pick for which purpose, is in the README "
            "(*Attribution quality*), from this file and its twin on the other testbed.", ""]


def tuned_text(report: Dict[str, Any]) -> str:
    chosen = report["tuned"]["settings"]
    return ", ".join(f"{k} = {v}" for k, v in chosen.items()) or "the defaults: no ablation gained"


def why_section(report: Dict[str, Any]) -> List[str]:
    """Saturated blanks and the border bias, per image."""
    diag, methods = report["diagnoses"], report["methods"]
    sat, split = diag["saturated"], diag["saturated_split"]
    out = ["## Where CAAP loses, per image", "",
           "### Saturated blanks", "",
           "A map is saturated when the blank's own score for the target is at least every patch's: each patch "
           "can then only lower a score the blank already gives, and the map ranks harm, not evidence.", "",
           "| configuration | saturated maps |", "|---|---|"]
    for label, row in sat.items():
        out.append(f"| {LABELS.get(label, label)} | {100 * row['share']:.1f}% of {row['n']} |")
    out += ["", "CAAP parallel's scores split by it:", "",
            "| | InsDel | AUPR1 |", "|---|---|---|",
            f"| saturated (n = {split['insdel']['saturated']['n']}) | {fmt_stat(split['insdel']['saturated'])} | "
            f"{fmt_stat(split['aupr_fg']['saturated'])} |",
            f"| not saturated (n = {split['insdel']['not_saturated']['n']}) | {fmt_stat(split['insdel']['not_saturated'])} | "
            f"{fmt_stat(split['aupr_fg']['not_saturated'])} |", "",
            "### Border bias", "",
            "Bias: per image, the mean score of the background patches on the grid's outer ring (where a box "
            "selection is clipped) minus that of the inner background patches, over the map's range, in percent: 0 "
            "for a map blind to position, negative where the map shuns the border. AUPR1 is split by whether the "
            "object reaches the ring.", "",
            "| configuration | bias | AUPR1, object on the ring | AUPR1, object inside |",
            "|---|---|---|---|"]
    for label, row in diag["border"].items():
        if label in methods or label.startswith("selection="):
            out.append(f"| {LABELS.get(label, label)} | {fmt_diff(row['bias'])} | "
                       f"{fmt_stat(row['aupr_fg_touching'])} (n = {row['aupr_fg_touching']['n']}) | "
                       f"{fmt_stat(row['aupr_fg_inside'])} (n = {row['aupr_fg_inside']['n']}) |")
    sweep = report["ablations"]["layer_cutoff"]
    k_best = best(sweep, list(sweep), "insdel")
    out += ["", "### The cutoff and the blank", "",
            f"The cutoff sweep above peaks on InsDel at k = {k_best} (default {report['settings']['default_layer_cutoff']}); "
            "the blank ablation and the blank table above give each blank's class, entropy and scores.", ""]
    return out


def tuned_section(report: Dict[str, Any]) -> List[str]:
    t = report["tuned"]
    out = ["## The ablations' best together", "",
           f"Settings: {tuned_text(report)}, chosen on the first {t['chosen_on_images']} images (the largest mean gain "
           "in InsDel + AUPR1 per ablation). Paired against the best baseline of each metric, on the images not used "
           "to choose (where there are any) and on all:", "",
           "| configuration | metric | best baseline | held-out images | all images |", "|---|---|---|---|---|"]
    for row in t["versus"]:
        held = fmt_diff(row["held_out"]) + f" (n = {row['held_out']['n']})" if row["held_out"]["n"] else "–"
        out.append(f"| {LABELS.get(row['config'], row['config'])} | {row['metric']} | {LABELS[row['baseline']]} | "
                   f"{held} | {fmt_diff(row['all'])} |")
    return out + [""]


def ecaap_section(report: Dict[str, Any]) -> List[str]:
    out = ["## E-CAAP against CAAP (the paper's appendix B.1)", "",
           "Spearman's rank correlation between CAAP parallel's map and another construction's, per image; and "
           "how often their top patch is the same.", "",
           "| against CAAP parallel | Spearman (mean ± sem) | median | min | share > 0.9 | same top patch |",
           "|---|---|---|---|---|---|"]
    for other, r in report["diagnoses"]["rank_correlation"].items():
        out.append(f"| {LABELS[other]} | {r['spearman']['mean']:.3f}±{r['spearman']['sem']:.3f} | {r['median']:.3f} | "
                   f"{r['min']:.3f} | {100 * r['share_above_0.9']:.1f}% | {100 * r['top_patch_agrees']:.1f}% |")
    return out + [""]


def by_class_table(report: Dict[str, Any]) -> List[str]:
    classes = list(next(iter(report["by_class"].values())))
    white, substrate = report["blanks"]["white"]["class"], report["blanks"]["mean"]["class"]
    notes = {str(white): " (white blank's class)", str(substrate): " (deletion substrate's class)"}
    if white == substrate:
        notes = {str(white): " (white blank's and deletion substrate's class)"}
    n = report["class_counts"]
    lines = ["| Method | " + " | ".join(f"class {c}{notes.get(c, '')}, n = {n[c]}" for c in classes) + " |",
             "|---|" + "---|" * len(classes)]
    for name, row in report["by_class"].items():
        lines.append(f"| {LABELS[name]} | " + " | ".join(fmt_stat(row[c]) for c in classes) + " |")
    return lines


def supported_defaults(report: Dict[str, Any]) -> List[str]:
    """Per ablation: keep the default unless a setting is significantly better (2 sem, paired)
    on InsDel or AUPR1 and not significantly worse on the other."""
    says = []
    for ablation, rows in report["ablations"].items():
        default = default_setting(ablation, report["settings"]["default_layer_cutoff"])
        better = []
        for value, row in rows.items():
            d = row["vs_default"]
            up = [m for m in ("insdel", "aupr_fg") if d[m]["mean"] > 2 * d[m]["sem"] > 0]
            down = [m for m in ("insdel", "aupr_fg") if -d[m]["mean"] > 2 * d[m]["sem"] > 0]
            if up and not down:
                better.append(f"{value} (InsDel {fmt_diff(d['insdel'])}, AUPR1 {fmt_diff(d['aupr_fg'])})")
        if better:
            says.append(f"{ablation}: significantly better than the default {default}: {'; '.join(better)}.")
        else:
            says.append(f"{ablation}: no setting passes the rule against the default {default} "
                        f"({report['settings']['ablation_images']} images): the numbers support keeping it.")
    return says


def significant(diff: Dict[str, float], z: float = 2.0) -> bool:
    return abs(diff["mean"]) > z * diff["sem"]


def verdicts_for(report: Dict[str, Any], per_image: Dict[str, Dict[str, torch.Tensor]], n: int) -> List[str]:
    methods, ablations = report["methods"], report["ablations"]
    says: List[str] = []
    baselines = [m for m in methods if not m.startswith("caap")]
    for metric, label in (("insdel", "InsDel"), ("aupr_fg", "AUPR1"), ("aupr_bg", "AUPR0"), ("pointing_game", "PG")):
        top = best(methods, list(methods), metric)
        top_base = best(methods, baselines, metric)
        d = paired(per_image["caap_parallel"], per_image[top_base], metric, n)
        says.append(f"{label}: best overall {LABELS[top]} ({fmt_stat(methods[top][metric])}); best baseline "
                    f"{LABELS[top_base]} ({fmt_stat(methods[top_base][metric])}); CAAP parallel minus it: {fmt_diff(d)}"
                    f"{' (significant at 2 sem)' if significant(d) else ' (within 2 sem)'}.")
    for name in ["caap_efficient", *[f"caap_windowed_w{w}" for w in WINDOWS], "caap_standard"]:
        d_insdel = paired(per_image[name], per_image["caap_parallel"], "insdel", n)
        d_aupr = paired(per_image[name], per_image["caap_parallel"], "aupr_fg", n)
        cost = methods[name]["seconds_per_image"] / methods["caap_parallel"]["seconds_per_image"]
        says.append(f"{LABELS[name]} minus parallel: InsDel {fmt_diff(d_insdel)}, AUPR1 {fmt_diff(d_aupr)}, "
                    f"at {cost:.1f}x parallel's time per map.")
    # The trade-off: the cheapest construction not significantly below standard on InsDel and AUPR1.
    constructions = ["caap_parallel", *[f"caap_windowed_w{w}" for w in WINDOWS], "caap_standard"]
    gaps = {(c, m): paired(per_image[c], per_image["caap_standard"], m, n) for c in constructions for m in ("insdel", "aupr_fg")}
    close = [c for c in constructions if all(gaps[c, m]["mean"] >= -2 * gaps[c, m]["sem"] for m in ("insdel", "aupr_fg"))]
    pick = min(close, key=lambda c: methods[c]["seconds_per_image"])
    says.append(f"Best quality/cost trade-off (cheapest construction whose InsDel and AUPR1 are not "
                f"significantly below standard's): {LABELS[pick]}.")
    costlier = [LABELS[c] for c in constructions if methods[c]["seconds_per_image"] > methods["caap_standard"]["seconds_per_image"]]
    if costlier:
        says.append(f"Slower than standard (textbook patching) on this model: {', '.join(costlier)}.")
    caaps = [m for m in methods if m.startswith("caap")]
    first = {metric: [m for m in caaps if leads(methods, m, metric)] for metric in ("insdel", "aupr_fg")}
    both = [m for m in first["insdel"] if m in first["aupr_fg"]]
    says.append("First on InsDel and on AUPR1 among all methods, with standard errors that overlap no other "
                f"method's: {', '.join(LABELS[m] for m in both) if both else 'no CAAP configuration'}"
                f" (first on InsDel alone: {', '.join(LABELS[m] for m in first['insdel']) or 'none'}; "
                f"on AUPR1 alone: {', '.join(LABELS[m] for m in first['aupr_fg']) or 'none'}).")
    sweep = ablations["layer_cutoff"]
    says.append(f"The cutoff with the best mean InsDel, which `CAAP.calibrate` would pick: k = {best(sweep, list(sweep), 'insdel')}.")
    for ablation, rows in ablations.items():
        default = default_setting(ablation, report["settings"]["default_layer_cutoff"])
        for metric, label in (("insdel", "InsDel"), ("aupr_fg", "AUPR1")):
            top = best(rows, list(rows), metric)
            d = rows[top]["vs_default"][metric]
            verdict = ("the default is best" if top == default else
                       f"{top} beats the default {default} by {fmt_diff(d)}"
                       f"{' (significant at 2 sem)' if significant(d) else ' (within 2 sem)'}")
            says.append(f"{ablation} by {label}: {verdict}.")
    return says


# ---------------------------------------------------------------- main
def describe_model(model, data, training: Dict[str, Any], args: argparse.Namespace, probe_acc: float) -> Dict[str, Any]:
    return {
        "source": "trained from scratch (seeded, CPU)" + (" in an earlier run, loaded from --checkpoint" if args.checkpoint else ""),
        "recipe": f"benchmarks/harness.py TINY_VIT_RECIPE {TINY_VIT_RECIPE} (AdamW, warmup then cosine), "
                  f"batch {data.batch_size}; " + data_recipe(data),
        **training,
        "num_classes": data.num_classes, "img_size": data.img_size,
        "patch_size": model.patch_embed.patch_size[0], "embed_dim": model.embed_dim, "depth": len(model.blocks),
        "num_heads": model.blocks[0].attn.num_heads,
        "val_accuracy": round(accuracy(model, data), 4), "val_images": data.num_val,
        "probe_accuracy": round(probe_acc, 4), "seed": args.seed,
    }


def score_ablations(run, per_image: Dict[str, Dict[str, torch.Tensor]], default_row: Dict[str, Any], depth: int,
                    n_ab: int) -> Dict[str, Dict[str, Any]]:
    """Each ablation's rows, with their paired difference to the default; ``run(label, kwargs, n)`` scores one."""
    ablations = {}
    for ablation, values in ablation_settings(depth).items():
        default = default_setting(ablation, depth // 2)
        # Per-image scores do not depend on the other images: the default is caap_parallel's first n_ab.
        per_image[f"{ablation}={default}"] = {k: v[:n_ab] for k, v in per_image["caap_parallel"].items()}
        rows = {}
        for value, kwargs in values.items():
            if value == default:
                rows[value] = summarise(per_image[f"{ablation}={default}"])
                rows[value]["cpu_seconds_per_image"] = default_row["cpu_seconds_per_image"]
            else:
                rows[value] = run(f"{ablation}={value}", kwargs, n_ab)
            rows[value]["vs_default"] = {m: paired(per_image[f"{ablation}={value}"], per_image[f"{ablation}={default}"], m, n_ab)
                                         for m in ("insdel", "aupr_fg", "pointing_game")}
        ablations[ablation] = rows
    return ablations


def blank_table(model, data) -> Dict[str, Any]:
    """Each blank's own class, probability and entropy, and what ``"auto"`` resolves to."""
    blanks = {}
    for kind in BLANK_KINDS:
        caap = get_method("caap", model, blank=kind, score="logit")
        logits = caap.blank_score(list(range(data.num_classes)), image_size=(data.img_size, data.img_size))
        probs = logits.softmax(-1)
        blanks[kind] = {"class": int(probs.argmax()), "probability": round(float(probs.max()), 4),
                        "entropy": round(float(prediction_entropy(logits[None])[0]), 4), "is": caap.last_blank}
    return blanks


def write_outputs(report: Dict[str, Any], per_image, args: argparse.Namespace, labels: torch.Tensor) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / args.prefix
    report["settings"]["prefix"] = args.prefix
    write_per_image(Path(f"{prefix}-per-image.csv"), per_image, labels, report["diagnoses"].pop("per_image"))
    Path(f"{prefix}.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(f"{prefix}.md").write_text(markdown(report, report["verdicts"]))
    plot_layer_sweep(report["ablations"]["layer_cutoff"], report["settings"]["default_layer_cutoff"],
                     Path(f"{prefix}_layer_sweep.png"))
    constructions = ["caap_parallel", "caap_efficient", *[f"caap_windowed_w{w}" for w in WINDOWS], "caap_standard"]
    plot_quality_vs_cost(report["methods"], constructions, Path(f"{prefix}_vs_cost.png"), args.threads)
    print(f"wrote {prefix}.md, .json, -per-image.csv and 2 plots in {report['settings']['total_seconds']} s")


def render(path: str) -> None:
    """Rewrite ``<prefix>.md`` beside a saved ``<prefix>.json``: report text changes need no rerun."""
    report = json.loads(Path(path).read_text())
    Path(path).with_suffix(".md").write_text(markdown(report, report["verdicts"]))


class Scorer:
    """Scores methods on the held-out images, keeping each one's per-image scores and maps, and the
    method itself, so that all are timed together at the end."""

    def __init__(self, model: torch.nn.Module, probe: Any, args: argparse.Namespace, started: float) -> None:
        self.model, self.args, self.started = model, args, started
        self.images, self.labels, self.masks = probe.images, probe.labels, probe.masks
        self.step = args.step_patches * model.patch_embed.patch_size[0] * model.patch_embed.patch_size[1]
        self.per_image: Dict[str, Dict[str, torch.Tensor]] = {}
        self.timed: Dict[str, Any] = {}
        self.maps_of: Dict[str, torch.Tensor] = {}

    def __call__(self, label: str, registry_name: str, kwargs: Dict[str, Any], n: int) -> Dict[str, Any]:
        """The summary row of one method on the first ``n`` images."""
        method = get_method(registry_name, self.model, **kwargs)
        scores, row, self.maps_of[label] = score_method(
            method, self.model, self.images[:n], self.labels[:n], self.masks[:n], self.step, self.args.batch,
            self.args.metric_batch,
        )
        self.per_image[label], self.timed[label] = scores, method
        print(json.dumps({"config": label, **{m: row[m]["mean"] for m in METRICS},
                          "elapsed_s": round(time.perf_counter() - self.started)}), flush=True)
        return row


def trained_model(args: argparse.Namespace) -> Tuple[torch.nn.Module, L.LightningDataModule, Dict[str, Any]]:
    """The testbed's ViT, trained here or loaded from ``--checkpoint``, its data and its training record."""
    module, data = build(args)
    data.setup()
    if args.checkpoint:
        training = {"checkpoint": args.checkpoint, **checkpoint_training(args.checkpoint)}
    else:
        training = train(module, data, args)
    return module.model.eval(), data, training


def new_report(model, data, training: Dict[str, Any], args: argparse.Namespace, scorer: Scorer) -> Dict[str, Any]:
    """The report's model and settings, before any method is scored."""
    with torch.no_grad():
        probe_acc = (model(scorer.images).argmax(-1) == scorer.labels).double().mean().item()
    return {
        "model": describe_model(model, data, training, args, probe_acc),
        "settings": {
            "quick": args.quick, "num_images": len(scorer.images), "ablation_images": args.ablation_images,
            "threads": args.threads, "batch": args.batch, "machine": f"{platform.machine()}, torch {torch.__version__}",
            "target": "true class", "insdel_step_pixels": scorer.step, "default_layer_cutoff": len(model.blocks) // 2,
            "data": args.data,
        },
        "methods": {}, "ablations": {}, "blanks": {},
    }


def score_all(report: Dict[str, Any], scorer: Scorer, depth: int, n_ab: int) -> None:
    """Every method, CAAP's ablations on the first ``n_ab`` images, then the ablations' best settings together."""
    n = len(scorer.images)
    for label, (name, kwargs) in main_methods().items():
        report["methods"][label] = scorer(label, name, kwargs, n)
    report["ablations"] = score_ablations(lambda label, kwargs, k: scorer(label, "caap", kwargs, k), scorer.per_image,
                                          report["methods"]["caap_parallel"], depth, n_ab)
    # The ablations' best settings together, chosen on the ablation images and scored on all.
    tuned = tuned_settings(report["ablations"], depth)
    report["tuned"] = {"settings": tuned, "chosen_on_images": n_ab}
    for label, construction in TUNED.items():
        report["methods"][label] = scorer(label, "caap", {**construction, **tuned}, n)
    report["tuned"]["versus"] = versus_best_baseline(report["methods"], scorer.per_image, list(TUNED), n_ab)


def add_seconds(report: Dict[str, Any], scorer: Scorer, batch: int) -> None:
    """Seconds per map of every scored method, timed together on one batch (an ablation's default row: CAAP's)."""
    seconds = seconds_per_image(scorer.timed, scorer.images[:batch], scorer.labels[:batch])
    for label, row in report["methods"].items():
        row["seconds_per_image"] = seconds[label]
    for ablation, rows in report["ablations"].items():
        for value, row in rows.items():
            row["seconds_per_image"] = seconds.get(f"{ablation}={value}", seconds["caap_parallel"])


def add_analyses(report: Dict[str, Any], scorer: Scorer, model, data) -> None:
    """The blanks, the per-image diagnoses, InsDel by class and the verdicts."""
    labels, per_image = scorer.labels, scorer.per_image
    report["blanks"] = blank_table(model, data)
    report["diagnoses"] = diagnoses(scorer.timed, scorer.maps_of, per_image, labels, scorer.masks)
    report["class_counts"] = {str(c): int((labels == c).sum()) for c in range(data.num_classes)}
    report["by_class"] = {name: {str(c): mean_sem(per_image[name]["insdel"][labels == c]) for c in range(data.num_classes)}
                          for name in report["methods"]}
    report["verdicts"] = verdicts_for(report, per_image, len(labels))


def main() -> Dict[str, Any]:
    args = parse_args()
    if args.render:
        render(args.render)
        return {}
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    started = time.perf_counter()
    model, data, training = trained_model(args)
    scorer = Scorer(model, data.probe_batch(args.num_images), args, started)
    report = new_report(model, data, training, args, scorer)
    score_all(report, scorer, len(model.blocks), args.ablation_images)
    add_seconds(report, scorer, args.batch)
    add_analyses(report, scorer, model, data)
    report["settings"]["total_seconds"] = round(time.perf_counter() - started, 1)
    report["settings"]["total_cpu_seconds"] = round(time.process_time(), 1)
    write_outputs(report, scorer.per_image, args, scorer.labels)
    return report


if __name__ == "__main__":
    main()
