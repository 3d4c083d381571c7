"""Baselines: one known property per method, the registry, and model hygiene for all of them."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from caap_lightning import CAAP
from caap_lightning.attribution import (
    AttentionRollout,
    GradCAM,
    InputXGradient,
    PatchOcclusion,
    RandomMap,
    SimpleDeletion,
    SimpleInsertion,
    TransformerAttribution,
    available_methods,
    get_method,
)
from caap_lightning.attribution.blanks import make_blank

pytestmark = pytest.mark.filterwarnings("ignore:CAAP. the .* blank is itself classified")

AVG_POOL = dict(global_pool="avg", class_token=False, fc_norm=True)


@pytest.fixture
def model(vit_factory):
    # A register token makes the prefix two tokens wide, so prefix handling is exercised.
    return vit_factory(scale=4.0, seed=0, reg_tokens=1)


def _images(n, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _probabilities(model, images, targets):
    with torch.no_grad():
        return model(images).softmax(-1)[torch.arange(len(images)), targets]


# ---------------------------------------------------------------- registry and call shape
def test_registry_names_every_method_and_builds_it_with_its_arguments(model):
    assert available_methods() == [
        "caap", "gradcam", "rollout", "tattr", "input_x_gradient",
        "simple_insertion", "simple_deletion", "occlusion", "random",
    ]
    caap = get_method("caap", model, layer_cutoff=1, construction="efficient")
    assert isinstance(caap, CAAP) and caap.layer_cutoff == 1 and caap.construction == "efficient"
    assert isinstance(get_method("simple_deletion", model, selection="point"), SimpleDeletion)
    with pytest.raises(ValueError, match="unknown attribution method 'gradcam\\+\\+'.*'rollout'"):
        get_method("gradcam++", model)


@pytest.mark.parametrize("name", available_methods())
def test_every_method_has_the_call_shape_and_target_forms_agree(model, name):
    images = _images(3)
    predicted = model(images).argmax(-1)
    maps = get_method(name, model).attribute(images)
    assert maps.shape == (3, 4, 4) and maps.dtype == torch.float32 and torch.isfinite(maps).all()
    torch.testing.assert_close(get_method(name, model).attribute(images, target=predicted), maps)
    torch.testing.assert_close(get_method(name, model).attribute(images, target=predicted.tolist()), maps)
    single = get_method(name, model).attribute(images[:1], target=int(predicted[0]))
    torch.testing.assert_close(single, maps[:1], atol=1e-5, rtol=0)
    assert get_method(name, model).attribute(images, target=1, upsample=True).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        get_method(name, model).attribute(images, target=[0, 1])
    with pytest.raises(ValueError, match="out of range"):
        get_method(name, model).attribute(images, target=5)


@pytest.mark.parametrize("name", available_methods())
def test_no_state_is_left_on_the_model_even_under_inference_mode(model, name):
    model.train()
    model.blocks[1].eval()
    model.patch_embed.requires_grad_(False)
    flags = {n: m.training for n, m in model.named_modules()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    fused = [b.attn.fused_attn for b in model.blocks]
    method = get_method(name, model)
    with torch.inference_mode():
        maps = method.attribute(_images(2), target=[0, 1])
        # Targets as tensors made in inference mode, as a validation loop's predictions are.
        from_tensor = get_method(name, model).attribute(_images(2), target=torch.tensor([0, 1]))
    assert torch.isfinite(maps).all()
    torch.testing.assert_close(from_tensor, maps)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    assert all(p.grad is None for p in model.parameters())
    assert [b.attn.fused_attn for b in model.blocks] == fused
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


# ---------------------------------------------------------------- one property per method
def test_gradcam_matches_pytorch_grad_cam_on_the_patch_grid(model):
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class OnTheGrid(ReferenceGradCAM):  # no resize to pixels: compare patch maps directly
        def get_target_width_height(self, input_tensor):
            return 4, 4

    images, targets = _images(2), [3, 1]
    prefix, copied = model.num_prefix_tokens, copy.deepcopy(model)
    reference = OnTheGrid(
        model=copied,
        target_layers=[copied.blocks[-1].norm1],
        reshape_transform=lambda t: t[:, prefix:].reshape(t.shape[0], 4, 4, -1).permute(0, 3, 1, 2),
    )
    expected = reference(images, targets=[ClassifierOutputTarget(t) for t in targets])
    ours = GradCAM(model).attribute(images, target=targets)
    low = ours.flatten(1).min(1).values[:, None, None]
    scaled = (ours - low) / (1e-7 + (ours - low).flatten(1).max(1).values[:, None, None])
    assert ours.min() >= 0 and (ours.flatten(1).max(1).values > 0).all()
    torch.testing.assert_close(scaled, torch.from_numpy(expected), atol=1e-5, rtol=0)


def _real_attentions(model, images):
    """Attention probabilities of the real timm forward (unfused), heads second, with grads."""
    model = copy.deepcopy(model)
    captured = []

    def keep(module, args, out):
        out.retain_grad()
        captured.append(out)

    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(keep)
    return model, captured


def test_rollout_rows_sum_to_one_and_one_block_is_half_attention_half_identity(vit_factory):
    images = _images(2)
    model = vit_factory(scale=4.0, reg_tokens=1)
    joint = AttentionRollout(model).joint_attention(images)
    assert joint.shape == (2, 18, 18)
    torch.testing.assert_close(joint.sum(-1), torch.ones(2, 18), atol=1e-5, rtol=0)

    shallow = vit_factory(scale=4.0, depth=1, **AVG_POOL)
    real, captured = _real_attentions(shallow, images)
    real(images)
    expected = 0.5 * captured[0].mean(1) + 0.5 * torch.eye(16)
    torch.testing.assert_close(AttentionRollout(shallow).joint_attention(images), expected.detach(), atol=1e-5, rtol=0)
    # avg pooling reads the mean of the patch rows
    maps = AttentionRollout(shallow).attribute(images)
    torch.testing.assert_close(maps, expected.mean(1).view(2, 4, 4).detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pool", [dict(reg_tokens=1), AVG_POOL])
def test_tattr_matches_a_naive_hooked_chefer_recursion(vit_factory, pool):
    model = vit_factory(scale=4.0, **pool)
    images, targets = _images(2), torch.tensor([2, 0])
    real, captured = _real_attentions(model, images)
    logits = real(images)
    logits[torch.arange(2), targets].sum().backward()
    relevance = torch.eye(captured[0].shape[-1]).repeat(2, 1, 1)
    for attn in captured:
        relevance = relevance + (attn.grad * attn).clamp(min=0).mean(1) @ relevance
    P = model.num_prefix_tokens
    expected = relevance[:, 0, P:] if model.global_pool == "token" else relevance[:, P:, P:].mean(1)
    ours = TransformerAttribution(model).attribute(images, target=targets)
    # avg pooling adds the identity's 1/N to every patch: the spread sits on top of it
    assert (ours.flatten(1).std(1) > 1e-4).all()
    torch.testing.assert_close(ours, expected.view(2, 4, 4).detach(), atol=1e-6, rtol=1e-5)


def test_input_x_gradient_matches_captum_per_patch_and_a_zero_patch_scores_zero(model):
    from captum.attr import InputXGradient as CaptumInputXGradient

    images, targets = _images(2), torch.tensor([4, 2])
    images[:, :, 8:16, 16:24] = 0  # patch (1, 2) is all zeros
    reference = CaptumInputXGradient(copy.deepcopy(model)).attribute(images.clone().requires_grad_(), target=targets)
    expected = reference.detach().abs().sum(1).view(2, 4, 8, 4, 8).sum((2, 4))
    ours = InputXGradient(model).attribute(images, target=targets)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert (ours[:, 1, 2] == 0).all() and (ours.flatten(1).max(1).values > 0).all()


@pytest.mark.parametrize("selection,score", [("box1", "probability"), ("point", "logit"), ("cross1", "probability")])
def test_simple_insertion_is_textbook_patching_at_cutoff_zero(model, selection, score):
    # The patch embedding is per patch, so inserting pixels = patching h_0 and recomputing all.
    images, targets = _images(2), [1, 3]
    ours = SimpleInsertion(model, selection=selection, score=score, batch_size=5).attribute(images, target=targets)
    caap = CAAP(model, construction="standard", layer_cutoff=0, selection=selection, score=score)
    torch.testing.assert_close(ours, caap.attribute(images, target=targets), atol=1e-5, rtol=0)
    assert (ours.flatten(1).std(1) > 1e-3).all()


@pytest.mark.parametrize("blank", ["black", "noise"])
def test_simple_deletion_is_the_score_drop_of_patching_the_blank_into_the_image(model, blank):
    images, targets = _images(2), torch.tensor([0, 2])
    ours = SimpleDeletion(model, blank=blank).attribute(images, target=targets)
    caap = CAAP(model)
    blank_image = make_blank(blank, (32, 32), caap.mean, caap.std)
    clean = _probabilities(model, images, targets)
    for i in range(2):
        # CAAP with the image as its blank, attributing the blank: x with S(p) from the blank.
        swapped = CAAP(model, construction="standard", layer_cutoff=0, blank=images[i:i + 1])
        deleted = swapped.attribute(blank_image, target=int(targets[i]))
        torch.testing.assert_close(ours[i], clean[i] - deleted[0], atol=1e-5, rtol=0)
    assert (ours.flatten(1).std(1) > 1e-3).all()


def test_occlusion_is_simple_deletion_of_one_patch_to_the_dataset_mean(model):
    images, targets = _images(2), [3, 0]
    ours = PatchOcclusion(model, batch_size=7).attribute(images, target=targets)
    expected = SimpleDeletion(model, selection="point", blank="mean").attribute(images, target=targets)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    logit = PatchOcclusion(model, score="logit").attribute(images, target=targets)
    logit_expected = SimpleDeletion(model, selection="point", blank="mean", score="logit").attribute(images, target=targets)
    torch.testing.assert_close(logit, logit_expected, atol=1e-5, rtol=0)


def test_occlusion_without_captum_says_how_to_install_it(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(ImportError, match=r'pip install "caap-lightning\[baselines\]"'):
        PatchOcclusion(model)


def test_random_maps_are_seeded_uniform_and_ignore_the_class(model):
    images = _images(4)
    a = RandomMap(model, seed=3).attribute(images, target=0)
    torch.testing.assert_close(a, RandomMap(model, seed=3).attribute(images, target=1))
    assert not torch.equal(a, RandomMap(model, seed=4).attribute(images))
    assert 0 <= a.min() and a.max() < 1 and a.std() > 0.1


def test_invalid_arguments_fail_at_construction(model, vit_factory):
    with pytest.raises(ValueError, match="selection='box3'"):
        SimpleInsertion(model, selection="box3")
    with pytest.raises(ValueError, match="blank='grey'"):
        SimpleDeletion(model, blank="grey")
    with pytest.raises(ValueError, match="score='margin'"):
        PatchOcclusion(model, score="margin")
    with pytest.raises(ValueError, match="batch_size"):
        SimpleInsertion(model, batch_size=0)
    with pytest.raises(ValueError, match="patch_embed"):
        GradCAM(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="TransformerAttribution reads attention.*attention-pool"):
        TransformerAttribution(vit_factory(global_pool="map"))
