"""Bad input at every public entry point: a ValueError/TypeError that names the argument, or the documented result.

One table of cases over ``CAAP``, every metric's function and class, and the callbacks'
constructors. The README's reliability paragraph quotes how many cases this file tries.
"""

from __future__ import annotations

import copy
from typing import Callable, List, NamedTuple

import pytest
import timm
import torch
from torch import nn

from caap_lightning import CAAP
from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.metrics import (
    AUPR,
    AttributionMass,
    InsertionDeletion,
    PointingGame,
    attribution_mass,
    aupr,
    insertion_deletion,
    pointing_game,
)


def make_vit(num_classes: int = 5, scale: float = 1.0) -> nn.Module:
    """A tiny random-weight ViT (32 px, patch 8); ``scale`` spreads its maps."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=32,
                              patch_size=8, embed_dim=32, depth=2, num_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    return model.eval()


class Case(NamedTuple):
    name: str
    call: Callable[[], object]
    names: str  # the argument the message must name


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def maps(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 32, 32, generator=torch.Generator().manual_seed(1))


def masks(n: int = 2) -> torch.Tensor:
    m = torch.zeros(n, 32, 32, dtype=torch.bool)
    m[:, 8:24, 8:24] = True
    return m


def with_nan_weight(model: nn.Module) -> nn.Module:
    broken = copy.deepcopy(model)
    with torch.no_grad():
        next(broken.parameters()).view(-1)[0] = float("nan")
    return broken


def engine_cases(model: nn.Module) -> List[Case]:
    caap = CAAP(model)
    x = images()
    return [
        Case("uint8 images", lambda: caap.attribute((x * 50 + 128).clamp(0, 255).to(torch.uint8)), "images"),
        Case("int8 images", lambda: caap.attribute(x.to(torch.int8)), "images"),
        Case("NaN pixels", lambda: caap.attribute(x.masked_fill(torch.rand_like(x) < 0.01, float("nan"))), "images"),
        Case("inf pixels", lambda: caap.attribute(x.masked_fill(torch.rand_like(x) < 0.01, float("inf"))), "images"),
        Case("wrong channels", lambda: caap.attribute(torch.randn(2, 1, 32, 32)), "images"),
        Case("3-d images", lambda: caap.attribute(torch.randn(3, 32, 32)), "images"),
        Case("float target 1.7", lambda: caap.attribute(x, target=torch.tensor([1.7, 0.0])), "target"),
        Case("bool target", lambda: caap.attribute(x, target=torch.tensor([True, False])), "target"),
        Case("target out of range", lambda: caap.attribute(x, target=[0, 5]), "target"),
        Case("negative target", lambda: caap.attribute(x, target=-1), "target"),
        Case("target of wrong length", lambda: caap.attribute(x, target=[0, 1, 2]), "target"),
        Case("NaN weights", lambda: CAAP(with_nan_weight(model)).attribute(x), "weights"),
        Case("std with a zero", lambda: CAAP(model, std=(0.5, 0.0, 0.5)), "std"),
        Case("headless ViT without head", lambda: CAAP(make_vit(num_classes=0)), "head"),
        Case("head of the wrong width", lambda: CAAP(make_vit(num_classes=0), head=nn.Linear(7, 3)), "head"),
        Case("unknown construction", lambda: CAAP(model, construction="fast"), "construction"),
        Case("unknown selection", lambda: CAAP(model, selection="box9"), "selection"),
        Case("unknown blank", lambda: CAAP(model, blank="grey"), "blank"),
        Case("negative layer_cutoff", lambda: CAAP(model, layer_cutoff=-1), "layer_cutoff"),
    ]


def metric_cases(model: nn.Module) -> List[Case]:
    m, k = maps(), masks()
    trimap = k.long() + 1  # Oxford Pets' raw trimap values {1, 2}
    soft = k.float() * 0.7
    nan_maps = m.clone()
    nan_maps[1, 0, 0] = float("nan")
    wide = torch.rand(2, 4, 8)  # another aspect ratio than the 32x32 masks
    mask_fns = {
        "aupr": lambda mp, mk: aupr(mp, mk),
        "pointing_game": lambda mp, mk: pointing_game(mp, mk),
        "attribution_mass": lambda mp, mk: attribution_mass(mp, mk),
        "AUPR": lambda mp, mk: AUPR().update(mp, mk),
        "PointingGame": lambda mp, mk: PointingGame().update(mp, mk),
        "AttributionMass": lambda mp, mk: AttributionMass().update(mp, mk),
    }
    cases = []
    for name, fn in mask_fns.items():
        cases += [
            Case(f"{name}: raw trimap", lambda fn=fn: fn(m, trimap), "masks"),
            Case(f"{name}: soft mask", lambda fn=fn: fn(m, soft), "masks"),
            Case(f"{name}: mask of another size", lambda fn=fn: fn(m, k[:, :16]), "masks"),
            Case(f"{name}: maps of another aspect ratio", lambda fn=fn: fn(wide, k), "maps"),
            Case(f"{name}: NaN maps", lambda fn=fn: fn(nan_maps, k), "maps"),
        ]
    x = images()
    insdel_fns = {
        "insertion_deletion": lambda imgs, mp, target=None: insertion_deletion(model, imgs, mp, target=target),
        "InsertionDeletion": lambda imgs, mp, target=None: InsertionDeletion(model).update(imgs, mp, target=target),
    }
    for name, fn in insdel_fns.items():
        cases += [
            Case(f"{name}: float target", lambda fn=fn: fn(x, m, torch.tensor([1.7, 0.0])), "target"),
            Case(f"{name}: bool target", lambda fn=fn: fn(x, m, torch.tensor([True, False])), "target"),
            Case(f"{name}: target out of range", lambda fn=fn: fn(x, m, [0, 9]), "target"),
            Case(f"{name}: negative target", lambda fn=fn: fn(x, m, -1), "target"),
            Case(f"{name}: target of wrong length", lambda fn=fn: fn(x, m, [0, 1, 2]), "target"),
            Case(f"{name}: uint8 images", lambda fn=fn: fn(x.to(torch.uint8), m), "images"),
            Case(f"{name}: wrong channels", lambda fn=fn: fn(torch.randn(2, 1, 32, 32), m), "images"),
            Case(f"{name}: wrong image size", lambda fn=fn: fn(torch.randn(2, 3, 48, 48), torch.rand(2, 48, 48)), "images"),
            Case(f"{name}: NaN maps", lambda fn=fn: fn(x, nan_maps), "maps"),
            Case(f"{name}: maps of another aspect ratio", lambda fn=fn: fn(x, wide), "maps"),
        ]
    cases.append(Case("pointing_game tolerance=1.5", lambda: pointing_game(m, k, tolerance=1.5), "tolerance"))
    cases.append(Case("PointingGame tolerance=-1", lambda: PointingGame(tolerance=-1), "tolerance"))
    return cases


def callback_cases() -> List[Case]:
    bad_caap = {
        "every_n_epochs": 0, "num_images": 0, "layer_cutoff": -1, "window": -1, "grid": 0, "insertion_deletion_steps": 0,
        "selection": "box9", "blank": "grey", "construction": "fast", "score": "log", "target": "true",
        "on_error": "ignore", "precision": "bf16", "metrics": ["aupr"], "methods": ["gradcam++"], "prefix": "a/b",
        "probe": "images.png", "probe_keys": {"pictures": "x"},
    }
    bad_monitor = {"alarm_on": "max", "patience": 0, "min_delta": -1.0, "num_images": -1, "monitor": "acc",
                   "on_error": "ignore", "prefix": "", "strategies": "yes", "strategy_max_clusters": 1}
    return [Case(f"CAAPCallback({arg}={value!r})", lambda arg=arg, value=value: CAAPCallback(**{arg: value}),
                 "probe" if arg == "probe_keys" else arg) for arg, value in bad_caap.items()] + [
        Case(f"SpuriousCueMonitor({arg}={value!r})", lambda arg=arg, value=value: SpuriousCueMonitor(**{arg: value}),
             "prefix" if arg == "prefix" else arg) for arg, value in bad_monitor.items()
    ]


def probe_and_output_cases() -> List[Case]:
    """What a probe or a model's outputs can hold that would otherwise give a silent wrong answer or a raw crash."""
    from torch.utils.data import DataLoader

    from caap_lightning.callbacks.discovery import check_class_scores
    from caap_lightning.callbacks.probe import read_probe
    from caap_lightning.callbacks.strategies import discover_strategies
    from caap_lightning.utils import output_logits

    def probe_of(*samples):
        return read_probe(DataLoader(list(samples), batch_size=1), len(samples))

    image = torch.zeros(3, 8, 8)
    return [
        Case("a one-logit binary model", lambda: check_class_scores(torch.zeros(4, 1)), "one output per image"),
        Case("NaN model outputs", lambda: check_class_scores(torch.full((4, 3), float("nan"))), "NaN or inf outputs"),
        Case("a model output without logits", lambda: output_logits("logits"), "cannot read logits"),
        Case("NaN maps to cluster", lambda: discover_strategies(torch.full((8, 4, 4), float("nan")),
                                                              torch.zeros(8, dtype=torch.long), str), "NaN or inf"),
        Case("probe images of two sizes", lambda: probe_of((image, 0), (torch.zeros(3, 16, 16), 1)), "shapes differ"),
        Case("masks in some probe samples", lambda: probe_of((image, 0, torch.ones(8, 8)), (image, 1)),
             "masks are in dataset index 0 but not"),
        Case("NaN probe pixels", lambda: probe_of((torch.full((3, 8, 8), float("nan")), 0)), "NaN or inf pixels"),
        Case("insertion_deletion(outputs='softmax')",
             lambda: insertion_deletion(MODEL, torch.zeros(1, 3, 32, 32), torch.zeros(1, 4, 4), outputs="softmax"),
             "outputs"),
    ]


MODEL = make_vit(scale=2.0)
CASES = engine_cases(MODEL) + metric_cases(MODEL) + callback_cases() + probe_and_output_cases()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_an_error_that_names_the_argument(case: Case):
    with pytest.raises((ValueError, TypeError)) as info:
        case.call()
    assert case.names in str(info.value), str(info.value)


def test_documented_results_of_edge_inputs():
    model = MODEL
    # blank_score(target=None): the blank's own top class, whose probability is the highest.
    caap = CAAP(model)
    own = caap.blank_score(target=None, image_size=(32, 32))
    every = torch.stack([caap.blank_score(target=c, image_size=(32, 32)) for c in range(5)]).flatten()
    assert float(own.max()) == pytest.approx(float(every.max()), rel=1e-6)
    # A map with no positive part carries no evidence in any region: mass 0, and the image counts.
    below = -torch.rand(2, 32, 32)
    assert torch.equal(attribution_mass(below, masks()), torch.zeros(2, dtype=torch.float64))
    # int and list targets are the documented forms of insertion_deletion, as of CAAP.
    x, m = images(), maps()
    by_int = insertion_deletion(model, x, m, target=1, step=256)
    by_list = insertion_deletion(model, x, m, target=[1, 1], step=256)
    torch.testing.assert_close(by_int.insertion, by_list.insertion)


def model_cases() -> List[Case]:
    """Models CAAP cannot patch: refused at construction, naming the part (``names``) and what is supported."""
    from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer

    transformers = pytest.importorskip("transformers")
    shape = dict(image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2, hidden_size=32,
                 intermediate_size=64, num_labels=3)
    swin = dict(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=4, num_labels=3)
    stem = [ConvStemConfig(out_channels=8, kernel_size=3, stride=2)]
    return [
        Case("DeiT with a distilled head", lambda: CAAP(transformers.DeiTForImageClassificationWithTeacher(
            transformers.DeiTConfig(**shape))), "distilled head"),
        Case("Swin", lambda: CAAP(transformers.SwinForImageClassification(transformers.SwinConfig(**swin))),
             "shifted-window attention"),
        Case("torchvision ViT with a conv stem", lambda: CAAP(VisionTransformer(
            image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=3,
            conv_stem_configs=stem)), "conv_stem_configs"),
        Case("a ViT inside a wrapper", lambda: CAAP(nn.Sequential(MODEL)), "supported: timm VisionTransformer"),
    ]


def test_unsupported_models_are_refused_naming_the_part():
    for case in model_cases():
        with pytest.raises(ValueError) as info:
            case.call()
        assert case.names in str(info.value), (case.name, str(info.value))


def test_the_readme_counts_these_cases():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"{len(CASES) + 3} cases" in readme, f"the README's reliability paragraph must say {len(CASES) + 3} cases"
