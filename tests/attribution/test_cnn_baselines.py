"""The baselines on CNNs against naive per-patch references, the registry's dispatch by family,
and the model left as found."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision.models as tvm
from torch import nn

from caap_lightning import CAAP
from caap_lightning.attribution import (
    AttentionRollout,
    ConvCAAP,
    GradCAM,
    InputXGradient,
    PatchOcclusion,
    RandomMap,
    SimpleDeletion,
    SimpleInsertion,
    TransformerAttribution,
    available_methods,
    family_of,
    get_method,
    method_class,
)
from caap_lightning.attribution.blanks import make_blank
from _oracle_reference import assert_spread as _assert_spread, members as _members, patch_of as _patch_of, random_images

# Random-weight CNNs often classify the white blank confidently (ConvCAAP warns).
pytestmark = pytest.mark.filterwarnings("ignore:ConvCAAP. the 'white' blank is itself classified")

CNN_METHODS = ["caap", "gradcam", "input_x_gradient", "simple_insertion", "simple_deletion", "occlusion", "random"]
SIZE = 64  # every model's last map is 2x2 at 64 px

BUILDERS = {
    "tv_resnet18": lambda: tvm.resnet18(num_classes=5),
    # A narrow bottleneck ResNet (ResNet-50's block); timm zero-inits each block's last BN, which
    # would make blocks identities with random weights.
    "timm_resnet_tiny": lambda: timm.models.resnet.ResNet(
        timm.models.resnet.Bottleneck, (1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=16, num_classes=5,
        zero_init_last=False,
    ),
    "timm_vgg_tiny": lambda: timm.models.vgg.VGG([16, "M", 32, "M", 64, "M", 64, "M", 64, "M"], num_classes=5,
                                                 mlp_ratio=1 / 64),
    "tv_densenet_tiny": lambda: tvm.DenseNet(8, (2, 2, 2, 2), 16, num_classes=5),
    # timm's layer scale starts at 1e-6: blocks would be identities.
    "timm_convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=5, ls_init_value=0.5),
}
# The module whose output is the last stage's map, as a user would name it for pytorch-grad-cam.
LAST_STAGE = {
    "tv_resnet18": "layer4",
    "timm_resnet_tiny": "layer4",
    "timm_vgg_tiny": "features.14",
    "tv_densenet_tiny": "features.denseblock4",
    "timm_convnext_atto": "stages.3",
}

_MODELS = {}



def _images(n, size=SIZE, seed=1):
    return random_images(n, size, seed)


def _model(name: str) -> nn.Module:
    """Built once per session (seeded), logits spread to std 2 so that probability maps vary."""
    if name not in _MODELS:
        torch.manual_seed(list(BUILDERS).index(name))
        model = BUILDERS[name]().eval()
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            factor = 2.0 / model(_images(4, seed=0)).std().item()
            last.weight.mul_(factor)
            last.bias.mul_(factor)
        _MODELS[name] = model
    return _MODELS[name]


# ---------------------------------------------------------------------- the naive references
def _pixel_patch(grid, size):
    """``(H, W)`` long: each pixel's patch, row-major, by its centre."""
    (gh, gw), (h, w) = grid, size
    rows = [_patch_of(i, h, gh) for i in range(h)]
    cols = [_patch_of(j, w, gw) for j in range(w)]
    return torch.tensor([[r * gw + c for c in cols] for r in rows])


def _scores(model, images, targets, score):
    with torch.no_grad():
        logits = model(images)
    if score == "probability":
        logits = logits.softmax(-1)
    return logits[torch.arange(len(images)), targets]


def _hooked_gradcam(model, module_name, images, targets):
    """Textbook Grad-CAM with a forward hook on the named module: ReLU(sum_c mean(dA_c) * A_c)."""
    model = copy.deepcopy(model).eval()
    kept = []
    module = dict(model.named_modules())[module_name]

    def keep(module, args, out):
        out.retain_grad()
        kept.append(out)

    module.register_forward_hook(keep)
    logits = model(images)
    logits[torch.arange(len(images)), targets].sum().backward()
    activations = kept[-1]
    weights = activations.grad.mean((2, 3), keepdim=True)
    return (weights * activations).sum(1).clamp(min=0).detach()


# ---------------------------------------------------------------------- registry
def test_family_of_names_the_family_and_refuses_other_models(vit_factory):
    assert family_of(_model("tv_resnet18")) == "cnn" and family_of(_model("timm_convnext_atto")) == "cnn"
    assert family_of(vit_factory()) == "vit"
    for bad in (nn.Sequential(nn.Conv2d(3, 4, 3)), tvm.mobilenet_v3_small(num_classes=5)):
        with pytest.raises(ValueError, match=(
            rf"{type(bad).__name__} is not a model the attribution methods read: they take a timm Vision "
            r"Transformer \(a model with `patch_embed.patch_size`\) or a CNN \(torchvision ResNet, VGG"
        )):
            family_of(bad)
        with pytest.raises(ValueError, match="timm Vision Transformer.*torchvision ResNet"):
            get_method("gradcam", bad)


def test_registry_dispatches_by_family(vit_factory):
    resnet, vit = _model("tv_resnet18"), vit_factory()
    caap = get_method("caap", resnet, layer_cutoff="layer3", construction="frozen")
    assert type(caap) is ConvCAAP and caap.cut_name == "layer3" and caap.construction == "frozen"
    assert type(get_method("caap", vit)) is CAAP
    assert method_class("caap", resnet) is ConvCAAP and method_class("caap", "cnn") is ConvCAAP
    assert method_class("caap", vit) is CAAP and method_class("caap", "vit") is CAAP
    assert method_class("occlusion", "cnn") is PatchOcclusion is method_class("occlusion", vit)
    deletion = get_method("simple_deletion", resnet, selection="point", grid=4)
    assert type(deletion) is SimpleDeletion and deletion.selection == "point"
    assert available_methods("cnn") == CNN_METHODS
    assert available_methods("vit") == available_methods() == [
        "caap", "gradcam", "rollout", "tattr", "input_x_gradient",
        "simple_insertion", "simple_deletion", "occlusion", "random",
    ]
    with pytest.raises(ValueError, match=r"family='rnn' is not one of \('vit', 'cnn'\)"):
        available_methods("rnn")
    with pytest.raises(ValueError, match="unknown attribution method 'lime'"):
        method_class("lime", resnet)


@pytest.mark.parametrize("name, cls", [("rollout", AttentionRollout), ("tattr", TransformerAttribution)])
def test_attention_methods_on_a_cnn_name_the_methods_that_apply(name, cls):
    resnet = _model("tv_resnet18")
    applicable = ", ".join(repr(m) for m in CNN_METHODS)
    with pytest.raises(ValueError, match=(
        rf"'{name}' applies to timm Vision Transformers only, not to CNNs; the methods for CNNs are "
        rf"\[{applicable}\]"
    )):
        get_method(name, resnet)
    with pytest.raises(ValueError, match=rf"'{name}' applies to timm Vision Transformers only"):
        method_class(name, "cnn")
    with pytest.raises(ValueError, match=rf"{cls.__name__} reads attention, which ResNet \(a CNN\) does not have"):
        cls(resnet)


def test_family_specific_arguments_fail_at_construction(vit_factory):
    resnet, vit = _model("tv_resnet18"), vit_factory()
    with pytest.raises(ValueError, match="grid=2 is for CNNs: a ViT's maps are on its own patch grid"):
        InputXGradient(vit, grid=2)
    with pytest.raises(ValueError, match="head= is for a ViT built with num_classes=0; ResNet's own head"):
        GradCAM(resnet, head=nn.Linear(512, 5))
    for bad in ((0, 2), "4", (2, 2, 2), True):
        with pytest.raises(ValueError, match="grid must be None, a positive int or a pair"):
            SimpleInsertion(resnet, grid=bad)
    headless = timm.create_model("resnet18", num_classes=0)
    for name in CNN_METHODS:
        with pytest.raises(ValueError, match="ResNet has num_classes=0: its outputs are features"):
            get_method(name, headless)


# ---------------------------------------------------------------------- call shape
# tv_resnet18, the slowest, is in the reference, input and state tests.
@pytest.mark.parametrize("model_name", [name for name in BUILDERS if name != "tv_resnet18"])
@pytest.mark.parametrize("name", CNN_METHODS)
def test_every_cnn_method_has_the_call_shape_and_target_forms_agree(model_name, name):
    model, images = _model(model_name), _images(3)
    shape = (3, 8, 8) if name == "caap" else (3, 2, 2)  # ConvCAAP's default cut is the middle stage
    predicted = model(images).argmax(-1)
    maps = get_method(name, model).attribute(images)
    assert maps.shape == shape and maps.dtype == torch.float32 and torch.isfinite(maps).all()
    torch.testing.assert_close(get_method(name, model).attribute(images, target=predicted), maps)
    torch.testing.assert_close(get_method(name, model).attribute(images, target=predicted.tolist()), maps)
    single = get_method(name, model).attribute(images[:1], target=int(predicted[0]))
    torch.testing.assert_close(single, maps[:1], atol=1e-5, rtol=0)
    assert get_method(name, model).attribute(images, target=1, upsample=True).shape == (3, SIZE, SIZE)
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        get_method(name, model).attribute(images, target=[0, 1])
    with pytest.raises(ValueError, match=r"target \[5\] is out of range for a model with 5 classes"):
        get_method(name, model).attribute(images, target=5)


@pytest.mark.parametrize("name", CNN_METHODS)
def test_no_state_is_left_on_a_cnn_even_under_inference_mode(name):
    torch.manual_seed(0)
    model = tvm.resnet18(num_classes=5)
    model.train()
    model.layer2.eval()  # a mixed state: each module's own flag must come back
    model.conv1.requires_grad_(False)
    flags = {n: m.training for n, m in model.named_modules()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = _images(2, size=32)
    with torch.inference_mode():
        maps = get_method(name, model).attribute(images, target=[0, 1])
        # Targets as tensors made in inference mode, as a validation loop's predictions are.
        from_tensor = get_method(name, model).attribute(images, target=torch.tensor([0, 1]))
    assert torch.isfinite(maps).all() and not maps.requires_grad
    torch.testing.assert_close(from_tensor, maps)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BN running stats untouched: the forwards ran in eval mode
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


# ---------------------------------------------------------------------- one reference per method
@pytest.mark.parametrize("model_name", list(BUILDERS))
def test_gradcam_is_the_textbook_one_at_the_last_stage(model_name):
    model, images = _model(model_name), _images(2, size=96)  # 3x3 maps
    # The predicted class: a random model's CAM for another class is often zero (all ReLU'd away).
    targets = model(images).argmax(-1)
    ours = GradCAM(model).attribute(images, target=targets)
    expected = _hooked_gradcam(model, LAST_STAGE[model_name], images, targets)
    assert ours.shape == (2, 3, 3)
    _assert_spread(expected, 1e-4)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_gradcam_matches_pytorch_grad_cam_with_its_default_resnet_layer():
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class OnTheGrid(ReferenceGradCAM):  # no resize to pixels: compare the 3x3 maps directly
        def get_target_width_height(self, input_tensor):
            return 3, 3

    model, images = _model("tv_resnet18"), _images(2, size=96)
    targets = model(images).argmax(-1).tolist()
    copied = copy.deepcopy(model)
    reference = OnTheGrid(model=copied, target_layers=[copied.layer4[-1]])
    expected = torch.from_numpy(reference(images, targets=[ClassifierOutputTarget(t) for t in targets]))
    ours = GradCAM(model).attribute(images, target=targets)
    _assert_spread(ours, 1e-4)
    low = ours.amin((1, 2), keepdim=True)
    scaled = (ours - low) / (1e-7 + (ours - low).amax((1, 2), keepdim=True))
    torch.testing.assert_close(scaled, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_name, grid", [
    ("tv_resnet18", None), ("timm_resnet_tiny", (3, 5)), ("timm_convnext_atto", 4), ("tv_densenet_tiny", (5, 3)),
])
def test_input_x_gradient_sums_autograd_over_each_patch(model_name, grid):
    model, images, targets = _model(model_name), _images(2), torch.tensor([2, 0])
    inputs = images.clone().requires_grad_()
    logits = copy.deepcopy(model)(inputs)
    (grads,) = torch.autograd.grad(logits[torch.arange(2), targets].sum(), inputs)
    per_pixel = (images * grads).abs().sum(1)
    shape = (2, 2) if grid is None else (grid, grid) if isinstance(grid, int) else grid
    index = _pixel_patch(shape, (SIZE, SIZE))
    expected = torch.stack([
        torch.stack([per_pixel[b][index == p].sum() for p in range(shape[0] * shape[1])]) for b in range(2)
    ]).view(2, *shape)
    ours = InputXGradient(model, grid=grid).attribute(images, target=targets)
    _assert_spread(expected, 1e-3)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def _patched_reference(model, images, targets, grid, selection, blank, score, insert):
    """One forward per image and patch, with ``S(p)``'s pixels swapped by a loop over patches."""
    blank_image = make_blank(blank, tuple(images.shape[-2:]), ConvCAAP(model).mean, ConvCAAP(model).std)[0]
    index = _pixel_patch(grid, tuple(images.shape[-2:]))
    n = grid[0] * grid[1]
    rows = []
    for b in range(len(images)):
        row = []
        for p in range(n):
            inside = torch.zeros_like(index, dtype=torch.bool)
            for q in _members(grid, p, selection):
                inside |= index == q
            patched = torch.where(inside, images[b], blank_image) if insert else torch.where(inside, blank_image, images[b])
            row.append(_scores(model, patched[None], targets[b:b + 1], score)[0])
        rows.append(torch.stack(row))
    return torch.stack(rows).view(len(images), *grid)


@pytest.mark.parametrize("model_name, grid, selection, score, blank", [
    ("timm_resnet_tiny", (4, 4), "box1", "probability", "white"),
    ("tv_densenet_tiny", (3, 5), "cross1", "logit", "black"),
    ("timm_vgg_tiny", (4, 4), "point", "probability", "noise"),
    ("timm_convnext_atto", (5, 3), "box1", "logit", "white"),
])
def test_simple_insertion_and_deletion_match_a_per_patch_loop(model_name, grid, selection, score, blank):
    model, images, targets = _model(model_name), _images(2), torch.tensor([1, 3])
    kwargs = dict(grid=grid, selection=selection, score=score, blank=blank, batch_size=7)
    inserted = SimpleInsertion(model, **kwargs).attribute(images, target=targets)
    deleted = SimpleDeletion(model, **kwargs).attribute(images, target=targets)
    expected_in = _patched_reference(model, images, targets, grid, selection, blank, score, insert=True)
    clean = _scores(model, images, targets, score)
    expected_out = clean[:, None, None] - _patched_reference(model, images, targets, grid, selection, blank, score,
                                                             insert=False)
    # Logits are a few units: batched and single forwards differ by float noise in the last digits.
    floor, atol = (1e-2, 1e-4) if score == "logit" else (1e-3, 1e-5)
    _assert_spread(expected_in, floor)
    _assert_spread(expected_out, floor)
    torch.testing.assert_close(inserted, expected_in, atol=atol, rtol=0)
    torch.testing.assert_close(deleted, expected_out, atol=atol, rtol=0)


@pytest.mark.parametrize("model_name, grid, baseline, score", [
    ("tv_resnet18", None, 0.0, "probability"),
    ("tv_densenet_tiny", (4, 8), -1.5, "logit"),
    ("timm_convnext_atto", 4, 0.0, "probability"),
])
def test_occlusion_matches_a_per_patch_loop_with_the_baseline_value(model_name, grid, baseline, score):
    model, images, targets = _model(model_name), _images(2), torch.tensor([4, 2])
    shape = (2, 2) if grid is None else (grid, grid) if isinstance(grid, int) else grid
    ph, pw = SIZE // shape[0], SIZE // shape[1]
    clean = _scores(model, images, targets, score)
    expected = torch.zeros(2, *shape)
    for r in range(shape[0]):
        for c in range(shape[1]):
            occluded = images.clone()
            occluded[:, :, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = baseline
            expected[:, r, c] = clean - _scores(model, occluded, targets, score)
    ours = PatchOcclusion(model, grid=grid, baseline=baseline, score=score, batch_size=3).attribute(images, target=targets)
    floor, atol = (1e-2, 1e-4) if score == "logit" else (1e-3, 1e-5)
    _assert_spread(expected, floor)
    torch.testing.assert_close(ours, expected, atol=atol, rtol=0)


def test_occlusion_names_a_grid_that_divides_the_image():
    model = _model("tv_resnet18")
    with pytest.raises(ValueError, match=(
        r"image size 64x64 must divide into the grid 3x5; pass grid=\(2, 4\) \(the finest grid of at most 3x5"
    )):
        PatchOcclusion(model, grid=(3, 5)).attribute(_images(1), target=0)
    # ResNet's last map at 80 px is 3x3, which 80 px does not divide into
    with pytest.raises(ValueError, match=r"80x80 must divide into the grid 3x3; pass grid=\(2, 2\)"):
        PatchOcclusion(model).attribute(_images(1, size=80), target=0)


def test_random_maps_are_seeded_on_the_grid_and_ignore_the_class():
    model, images = _model("timm_vgg_tiny"), _images(4)
    a = RandomMap(model, seed=3, grid=(4, 6)).attribute(images, target=0)
    assert a.shape == (4, 4, 6)
    torch.testing.assert_close(a, RandomMap(model, seed=3, grid=(4, 6)).attribute(images, target=1))
    assert not torch.equal(a, RandomMap(model, seed=4, grid=(4, 6)).attribute(images))
    assert 0 <= a.min() and a.max() < 1 and a.std() > 0.1


# ---------------------------------------------------------------------- input checks
BAD_INPUTS = [
    pytest.param(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8), TypeError,
                 r"images must be float, normalised with the model's mean/std, got torch\.uint8", id="uint8"),
    pytest.param(torch.randn(2, 1, SIZE, SIZE), ValueError, "images have 1 channels but the model expects 3",
                 id="grey"),
    pytest.param(torch.randn(3, SIZE, SIZE), ValueError, r"images must be a \(B, C, H, W\) tensor, got \(3, 64, 64\)",
                 id="3d"),
    pytest.param(torch.full((2, 3, SIZE, SIZE), float("nan")), ValueError,
                 r"NaN or inf pixels \(image\(s\) \[0, 1\] of the batch\)", id="nan"),
]


@pytest.mark.parametrize("images, error, message", BAD_INPUTS)
def test_every_cnn_method_refuses_a_bad_input_with_the_same_message(images, error, message):
    model, messages = _model("tv_resnet18"), set()
    for name in CNN_METHODS:
        with pytest.raises(error, match=message) as caught:
            get_method(name, model).attribute(images, target=[0, 1])
        messages.add(str(caught.value))
    assert len(messages) == 1, messages


def test_baselines_check_targets_before_any_forward():
    model, calls = _model("tv_resnet18"), []
    hook = model.conv1.register_forward_hook(lambda *args: calls.append(1))
    try:
        for name in CNN_METHODS[1:]:  # ConvCAAP checks targets against the blank's logits
            with pytest.raises(ValueError, match="out of range"):
                get_method(name, model).attribute(_images(2), target=[0, 9])
    finally:
        hook.remove()
    assert calls == []


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_every_cnn_method_refuses_non_finite_weights_and_names_them(value):
    torch.manual_seed(0)
    model = tvm.resnet18(num_classes=5).eval()
    with torch.no_grad():
        model.layer3[1].conv2.weight[0, 0, 1, 1] = value
    messages = set()
    for name in CNN_METHODS:
        with pytest.raises(ValueError, match=r"weights contain NaN or inf \(layer3\.1\.conv2\.weight\)") as caught:
            get_method(name, model).attribute(_images(2), target=[0, 1])
        messages.add(str(caught.value))
    assert len(messages) == 1


def test_a_grid_finer_than_the_images_fails_before_any_work():
    with pytest.raises(ValueError, match=r"grid=\(65, 4\) is finer than the images \(64x64 pixels\)"):
        InputXGradient(_model("tv_resnet18"), grid=(65, 4)).attribute(_images(1), target=0)
