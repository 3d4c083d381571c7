"""ConvCAAP against a naive per-patch oracle built from forward hooks on the model's own modules."""

from __future__ import annotations

import functools
import warnings
from fractions import Fraction

import pytest
import timm
import torch
import torchvision.models as tvm
from torch import nn

from caap_lightning.attribution.blanks import make_blank
from caap_lightning.attribution.cnn import ConvCAAP, conv_stages, region_masks, stage_macs
from _oracle_reference import assert_spread as _assert_spread, members as _members, patch_of as _patch_of, random_images
from caap_lightning.attribution.selection import SELECTIONS

# Random-weight models often classify the white blank confidently; one test checks the warning.
pytestmark = pytest.mark.filterwarnings("ignore:ConvCAAP. the 'white' blank is itself classified")


# ---------------------------------------------------------------------- tiny random CNNs
def _spread(model: nn.Module, logit_std: float = 2.0) -> nn.Module:
    """Scale the last linear layer so that logits on random images have std ``logit_std``.

    Random-weight logits are either too close for maps to vary or (scaled by a constant)
    so far apart that the softmax saturates and probability maps go flat.
    """
    model.eval()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        factor = logit_std / model(_images(4, seed=0)).std().item()
        last.weight.mul_(factor)
        if last.bias is not None:
            last.bias.mul_(factor)
    return model


def _small_tv_vgg16() -> nn.Module:
    # VGG's classifier is 25088 x 4096 whatever the input: build it on the meta device and
    # swap in a small one, so the test does not allocate (and initialise) 120M weights.
    with torch.device("meta"):
        model = tvm.VGG(nn.Identity(), num_classes=10, init_weights=False)
    model.features = tvm.vgg.make_layers(tvm.vgg.cfgs["D"])
    for conv in model.features.modules():
        if isinstance(conv, nn.Conv2d):  # torchvision's init: the default one fades out over 13 convs
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10))
    return model


def _tiny_tv_convnext() -> nn.Module:
    cfg = tvm.convnext.CNBlockConfig
    settings = [cfg(16, 32, 1), cfg(32, 64, 1), cfg(64, 128, 1), cfg(128, None, 1)]
    return tvm.convnext.ConvNeXt(settings, layer_scale=0.5, num_classes=10)


BUILDERS = {
    "tv_resnet18": lambda: tvm.resnet18(num_classes=10),
    # timm zero-inits each block's last BN: blocks would be identities with random weights.
    "timm_resnet18": lambda: timm.create_model("resnet18", num_classes=10, zero_init_last=False),
    "tv_vgg16": _small_tv_vgg16,
    "tv_densenet121": lambda: tvm.densenet121(num_classes=10),
    # timm's layer scale starts at 1e-6: blocks would be identities.
    "timm_convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=10, ls_init_value=0.5),
    "tv_convnext_tiny_cfg": _tiny_tv_convnext,
    "timm_densenet_tiny_cfg": lambda: timm.models.densenet.DenseNet(8, (2, 2, 2, 2), num_classes=10),
    "timm_vgg_tiny_cfg": lambda: timm.models.vgg.VGG([16, "M", 32, "M", 64, "M", 64, "M", 64, "M"], num_classes=10,
                                                     mlp_ratio=1 / 64),
}

# The oracle's own reading of each model: the module whose output is each cut, in order.
_DENSE = ["features.pool0"]
_DENSE += [f"features.{n}{i}" for i in (1, 2, 3) for n in ("denseblock", "transition")] + ["features.denseblock4"]
BOUNDARIES = {
    "tv_resnet18": ["maxpool", "layer1", "layer2", "layer3", "layer4"],
    "timm_resnet18": ["maxpool", "layer1", "layer2", "layer3", "layer4"],
    "tv_vgg16": ["features.4", "features.9", "features.16", "features.23", "features.30"],
    "tv_densenet121": _DENSE,
    "timm_convnext_atto": ["stem", "stages.0", "stages.1", "stages.2", "stages.3"],
    "tv_convnext_tiny_cfg": [f"features.{i}" for i in range(8)],
    "timm_densenet_tiny_cfg": _DENSE,
    "timm_vgg_tiny_cfg": ["features.2", "features.5", "features.8", "features.11", "features.14"],
}
CUT_NAMES = {
    "tv_resnet18": ("stem", "layer1", "layer2", "layer3", "layer4"),
    "timm_resnet18": ("stem", "layer1", "layer2", "layer3", "layer4"),
    "tv_vgg16": ("features.4", "features.9", "features.16", "features.23", "features.30"),
    "tv_densenet121": ("stem", *_DENSE[1:]),
    "timm_convnext_atto": ("stem", "stages.0", "stages.1", "stages.2", "stages.3"),
    "tv_convnext_tiny_cfg": tuple(f"features.{i}" for i in range(8)),
    "timm_densenet_tiny_cfg": ("stem", *_DENSE[1:]),
    "timm_vgg_tiny_cfg": ("features.2", "features.5", "features.8", "features.11", "features.14"),
}

_MODELS = {}



def _images(n, size=32, seed=1):
    return random_images(n, size, seed)


def _model(name: str) -> nn.Module:
    """Built once per session (seeded); every test leaves it as found, which one test checks."""
    if name not in _MODELS:
        torch.manual_seed(list(BUILDERS).index(name))
        _MODELS[name] = _spread(BUILDERS[name]())
    return _MODELS[name]


# ---------------------------------------------------------------------- the naive oracle
@functools.lru_cache(maxsize=None)
def _spans_overlap(a, n, b, m):
    return Fraction(a, n) < Fraction(b + 1, m) and Fraction(b, m) < Fraction(a + 1, n)


def naive_regions(grid, selection, cut_size, later_sizes, p):
    """S(p)'s cells at the cut (by cell centre) and at each later map (by overlapping span)."""
    members = _members(grid, p, selection)
    h, w = cut_size
    cut = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            cut[i, j] = _patch_of(i, h, grid[0]) * grid[1] + _patch_of(j, w, grid[1]) in members
    inside = [(i, j) for i in range(h) for j in range(w) if cut[i, j]]
    later = []
    for hj, wj in later_sizes:
        m = torch.zeros(hj, wj, dtype=torch.bool)
        for r in range(hj):
            for c in range(wj):
                m[r, c] = any(_spans_overlap(r, hj, i, h) and _spans_overlap(c, wj, j, w) for i, j in inside)
        later.append(m)
    return cut, later


def _outputs(model, names, image):
    modules = dict(model.named_modules())
    out = {}

    def keep(name):
        def hook(module, args, output):
            out[name] = output.clone()
        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in names]
    try:
        model(image)
    finally:
        for h in handles:
            h.remove()
    return out


def oracle(model, images, boundaries, cut, grid, selection, blank_image, construction):
    """Logits ``(B, gh*gw, classes)``: ``model(blank)`` once per patch, with a forward hook on
    the cut's module pasting S(p)'s cells from the source and, for ``frozen``, hooks on every
    later boundary resetting the cells outside the region to the blank's."""
    model.eval()
    modules = dict(model.named_modules())
    k = boundaries.index(cut)
    later = boundaries[k + 1:] if construction == "frozen" else []
    blank = _outputs(model, boundaries, blank_image)
    cut_size = tuple(blank[cut].shape[-2:])
    grid = grid or cut_size
    sizes = [tuple(blank[n].shape[-2:]) for n in later]
    out = []
    with torch.no_grad():
        for b in range(len(images)):
            source = _outputs(model, [cut], images[b:b + 1])[cut]
            rows = []
            for p in range(grid[0] * grid[1]):
                cut_mask, later_masks = naive_regions(grid, selection, cut_size, sizes, p)

                def paste(module, args, output, mask=cut_mask):
                    output = output.clone()
                    output[..., mask] = source[..., mask]
                    return output

                def reset(name, mask):
                    def hook(module, args, output):
                        output = output.clone()
                        output[..., ~mask] = blank[name][..., ~mask]
                        return output
                    return hook

                handles = [modules[cut].register_forward_hook(paste)]
                handles += [modules[n].register_forward_hook(reset(n, m)) for n, m in zip(later, later_masks)]
                try:
                    rows.append(model(blank_image)[0])
                finally:
                    for h in handles:
                        h.remove()
            out.append(torch.stack(rows))
    return torch.stack(out)


def _check_against_oracle(model, name, images, targets, cut, construction, grid=None, selection="box1", blank="white"):
    prob = ConvCAAP(model, layer_cutoff=cut, grid=grid, selection=selection, blank=blank, construction=construction)
    logit = ConvCAAP(model, layer_cutoff=cut, grid=grid, selection=selection, blank=blank, construction=construction,
                     score="logit")
    maps_p, maps_l = prob.attribute(images, target=targets), logit.attribute(images, target=targets)
    blank_image = make_blank(blank, tuple(images.shape[-2:]), prob.mean, prob.std)
    logits = oracle(model, images, BOUNDARIES[name], BOUNDARIES[name][CUT_NAMES[name].index(cut)], grid, selection,
                    blank_image, construction)
    index = targets.view(-1, 1, 1).expand(-1, logits.shape[1], 1)
    expected_l = logits.gather(-1, index)[..., 0].view_as(maps_l)
    expected_p = logits.softmax(-1).gather(-1, index)[..., 0].view_as(maps_p)
    _assert_spread(expected_l, 5e-2)
    _assert_spread(expected_p, 1e-2)
    torch.testing.assert_close(maps_l, expected_l, atol=1e-4, rtol=0)
    torch.testing.assert_close(maps_p, expected_p, atol=1e-4, rtol=0)
    return maps_l


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(BUILDERS))
def test_stages_reproduce_the_model_and_name_the_cuts(name):
    model = _model(name)
    table = conv_stages(model)
    assert table.names == CUT_NAMES[name]
    x = _images(2)
    with torch.no_grad():
        y = x
        for stage in table.stages:
            y = stage(y)
        torch.testing.assert_close(table.head(y), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("construction", ["standard", "frozen"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_matches_oracle_at_the_default_cut(name, construction):
    model = _model(name)
    caap = ConvCAAP(model)
    assert caap.layer_cutoff == caap.table.depth // 2
    images = _images(2)
    with torch.no_grad():
        targets = model(images).argmax(-1)  # the usual target; a fixed class can sit at p ~ 0
    _check_against_oracle(model, name, images, targets, caap.cut_name, construction)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_frozen_differs_from_standard(name):
    # Otherwise the frozen oracle tests could pass on a model where resets change nothing.
    model, images = _model(name), _images(2)
    standard = ConvCAAP(model, score="logit").attribute(images, target=1)
    frozen = ConvCAAP(model, score="logit", construction="frozen").attribute(images, target=1)
    assert (standard - frozen).abs().max() > 1e-2


@pytest.mark.parametrize("construction", ["standard", "frozen"])
@pytest.mark.parametrize(
    "cut, grid, selection",
    [
        ("layer2", (3, 3), "box1"),  # 8x8 cells on 3x3 patches: uneven areas
        ("layer2", (5, 4), "cross1"),
        ("layer2", None, "point"),
        ("layer1", (4, 4), "box2"),
        ("stem", (6, 6), "box1"),
        ("layer4", None, "point"),  # the last cut: only the head follows
    ],
)
def test_matches_oracle_other_cuts_grids_and_selections(cut, grid, selection, construction):
    model = _model("tv_resnet18")
    images, targets = _images(1, size=64, seed=2), torch.tensor([3])
    _check_against_oracle(model, "tv_resnet18", images, targets, cut, construction, grid, selection)


def test_matches_oracle_non_square_images_and_noise_blank():
    model = _model("timm_convnext_atto")
    images = torch.randn(1, 3, 64, 32, generator=torch.Generator().manual_seed(3))
    _check_against_oracle(model, "timm_convnext_atto", images, torch.tensor([2]), "stages.0", "frozen",
                          grid=(3, 2), blank="noise")


@pytest.mark.parametrize(
    "grid, cut_size, later",
    [((4, 4), (7, 7), [(4, 4), (2, 2)]), ((3, 2), (5, 6), [(3, 3), (1, 1)]), ((8, 8), (8, 8), [(4, 4), (2, 2), (1, 1)])],
)
@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_region_masks_match_the_naive_definition(grid, cut_size, later, selection):
    masks = region_masks(grid, selection, cut_size, later)
    for p in range(grid[0] * grid[1]):
        cut, later_masks = naive_regions(grid, selection, cut_size, later, p)
        assert torch.equal(masks[0][p], cut)
        for got, want in zip(masks[1:], later_masks):
            assert torch.equal(got[p], want)


def test_chunking_changes_nothing():
    model, images = _model("tv_densenet121"), _images(2)
    whole = ConvCAAP(model, construction="frozen").attribute(images, target=[0, 4])
    for chunk in (1, 3, 7):
        part = ConvCAAP(model, construction="frozen", chunk_size=chunk).attribute(images, target=[0, 4])
        torch.testing.assert_close(part, whole, atol=1e-6, rtol=0)


def test_model_left_as_found():
    model = _model("tv_resnet18")
    model.train()
    model.layer3.eval()  # a mixed state, to check each module's own flag is restored
    flags = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        maps = ConvCAAP(model, construction="frozen").attribute(_images(2), target=1)
        ConvCAAP(model).cost((32, 32))
        assert not maps.requires_grad
        assert {n: m.training for n, m in model.named_modules()} == flags
        for n, m in model.named_modules():
            assert not m._forward_hooks and not m._forward_pre_hooks, n
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k  # BN running stats untouched
        assert all(p.requires_grad for p in model.parameters())
    finally:
        model.eval()


def test_relative_blank_score_predicted_target_and_upsample():
    model, images = _model("timm_resnet18"), _images(2)
    caap = ConvCAAP(model, score="logit")
    predicted = model(images).argmax(-1)
    maps = caap.attribute(images)
    torch.testing.assert_close(maps, caap.attribute(images, target=predicted))
    rel = caap.attribute(images, target=predicted, relative=True)
    torch.testing.assert_close(rel, maps - caap.blank_score(predicted)[:, None, None])
    up = caap.attribute(images, target=predicted, upsample=True)
    assert up.shape == (2, 32, 32)


def test_cut_by_name_equals_cut_by_index():
    model, images = _model("tv_convnext_tiny_cfg"), _images(1)
    by_name = ConvCAAP(model, layer_cutoff="features.2").attribute(images, target=0)
    by_index = ConvCAAP(model, layer_cutoff=2).attribute(images, target=0)
    torch.testing.assert_close(by_name, by_index, atol=0, rtol=0)


def test_maps_follow_weights_changed_in_place():
    torch.manual_seed(1)
    model = _spread(tvm.resnet18(num_classes=10))
    images = _images(1)
    caap = ConvCAAP(model, score="logit")
    before = caap.attribute(images, target=0)
    with torch.no_grad():
        model.layer3[0].conv1.weight.data.mul_(2.0)  # no version bump: nothing may be cached on it
    after = caap.attribute(images, target=0)
    torch.testing.assert_close(after, ConvCAAP(model, score="logit").attribute(images, target=0))
    assert (after - before).abs().max() > 1e-3


def test_calibrate_picks_the_best_cut_and_enables_auto():
    model, images = _model("tv_resnet18"), _images(2)
    caap = ConvCAAP(model, layer_cutoff="auto")
    with pytest.raises(RuntimeError, match="calibrate"):
        caap.attribute(images)
    rows = caap.calibrate(images, target=[1, 2], layer_cutoffs=["layer1", 2], step=128)
    assert [r["cut"] for r in rows] == ["layer1", "layer2"]
    assert caap.layer_cutoff == max(rows, key=lambda r: r["insdel"])["layer_cutoff"]
    assert caap.attribute(images).shape[0] == 2


def test_cost_counts_resnet18():
    torch.manual_seed(0)
    model = tvm.resnet18().eval()
    per_stage = stage_macs(model, (224, 224))
    assert abs(sum(per_stage) / 1.814e9 - 1) < 0.01  # the published 1.8 GMACs of ResNet-18
    cost = ConvCAAP(model).cost((224, 224))
    assert cost["cut"] == "layer2" and cost["patches"] == 28 * 28
    assert cost["per_patch_macs"] == sum(per_stage[3:])
    assert cost["ratio"] == pytest.approx(1 + 784 * cost["per_patch_macs"] / cost["forward_macs"])
    coarse = ConvCAAP(model, grid=(7, 7)).cost((224, 224))
    assert coarse["patches"] == 49 and coarse["ratio"] < cost["ratio"] / 10


def test_clear_errors():
    model = _model("tv_resnet18")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    for bad in (vit, nn.Sequential(nn.Conv2d(3, 4, 3))):
        with pytest.raises(ValueError, match=rf"{type(bad).__name__}.*supported: torchvision ResNet"):
            ConvCAAP(bad)
    with pytest.raises(ValueError, match=r"ResNet.*'stem', 'layer1'"):
        ConvCAAP(model, layer_cutoff="layer5")
    for cut in (5, -1, True, 1.0):
        with pytest.raises(ValueError, match="0..4"):
            ConvCAAP(model, layer_cutoff=cut)
    for kwargs in (dict(grid=(0, 3)), dict(grid="7"), dict(construction="parallel"), dict(score="prob"),
                   dict(selection="box3"), dict(chunk_size=0), dict(blank="grey")):
        with pytest.raises(ValueError):
            ConvCAAP(model, **kwargs)
    caap = ConvCAAP(model)
    with pytest.raises(ValueError, match="finer than the cut 'layer2'"):
        ConvCAAP(model, grid=(7, 7)).attribute(_images(1), target=0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        caap.attribute(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        caap.attribute(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="out of range"):
        caap.attribute(_images(1), target=10)
    with pytest.raises(ValueError, match="entries for a batch"):
        caap.attribute(_images(2), target=[1, 2, 3])
    with pytest.raises(TypeError, match="class indices"):
        caap.attribute(_images(1), target=0.5)
    nan = _images(2)
    nan[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        caap.attribute(nan, target=0)
    with pytest.raises(ValueError, match="std"):
        ConvCAAP(model, std=(0.2, 0.0, 0.2))


def test_saturated_blank_warns_once_per_class():
    model = _model("timm_resnet18")  # its white blank is one class at p = 0.95
    caap = ConvCAAP(model)
    saturated = int(caap.blank_score(list(range(10)), (32, 32)).argmax())
    assert caap.blank_score(saturated, (32, 32)) > 0.5  # the premise of this test
    with pytest.warns(UserWarning, match=f"classified as class {saturated}"):
        caap.attribute(_images(1), target=saturated)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        caap.attribute(_images(1), target=saturated)


def test_auto_blank_is_the_fixed_blank_read_as_closest_to_uniform():
    from caap_lightning.attribution.blanks import FIXED_BLANKS, make_blank

    model, images = _model("timm_resnet18"), _images(2)
    caap = ConvCAAP(model, blank="auto")
    maps = caap.attribute(images, target=[0, 1])
    with torch.no_grad():
        probs = {kind: model(make_blank(kind, (32, 32), caap.mean, caap.std)).softmax(-1)[0].double() for kind in FIXED_BLANKS}
    entropies = {kind: float(-(p * p.log()).sum()) for kind, p in probs.items()}
    assert max(entropies.values()) - min(entropies.values()) > 1e-2  # the choice is not a tie
    chosen = max(entropies, key=entropies.get)
    assert caap.last_blank == chosen
    torch.testing.assert_close(maps, ConvCAAP(model, blank=chosen).attribute(images, target=[0, 1]), atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:ConvCAAP. the .* blank is itself classified")
@pytest.mark.parametrize("blank", ["white", "noise", "mean"])
def test_grey_scale_cnn_takes_a_one_channel_blank(blank):
    # A 1-channel ResNet equals a 3-channel one whose first conv splits each weight over RGB, on images
    # repeated over RGB: so their maps agree exactly when the blank has the model's channels.
    torch.manual_seed(0)
    grey = tvm.resnet18(num_classes=5)
    grey.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    grey = grey.eval()
    rgb = tvm.resnet18(num_classes=5).eval()
    rgb.load_state_dict({**grey.state_dict(), "conv1.weight": grey.conv1.weight.detach().repeat(1, 3, 1, 1) / 3})
    images = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    settings = dict(layer_cutoff="layer3", blank=blank, construction="frozen", score="logit")
    maps = ConvCAAP(grey, mean=(0.5,), std=(0.25,), **settings).attribute(images, target=[1, 2])
    expected = ConvCAAP(rgb, mean=(0.5,) * 3, std=(0.25,) * 3, **settings).attribute(images.repeat(1, 3, 1, 1),
                                                                                    target=[1, 2])
    if blank == "noise":  # RGB noise is not grey: only the shapes and the pipeline are comparable
        assert maps.shape == expected.shape and torch.isfinite(maps).all()
    else:
        torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)
        assert maps.std() > 1e-4
    assert ConvCAAP(grey, **settings).mean == (sum((0.485, 0.456, 0.406)) / 3,)
    with pytest.raises(ValueError, match=r"mean and std need 1 channels \(the model's input channels\)"):
        ConvCAAP(grey, mean=(0.5,) * 3, std=(0.25,) * 3)
