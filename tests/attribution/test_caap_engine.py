"""CAAP invariants, input checks, model hygiene, maps that follow the weights and E-CAAP's fidelity."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from scipy.stats import spearmanr

from caap_lightning import CAAP


@pytest.fixture
def model(vit_factory):
    return vit_factory(scale=8.0, seed=0, reg_tokens=1)


def _images(n, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_source_equal_to_blank_gives_the_blank_score_everywhere(model):
    caap = CAAP(model, blank="black")
    black = caap_blank_image(caap)
    maps = caap.attribute(black, target=[2])
    expected = caap.blank_score(target=[2])
    assert expected.item() > 0  # a real probability
    torch.testing.assert_close(maps, expected.view(1, 1, 1).expand(1, 4, 4), atol=1e-5, rtol=0)


def caap_blank_image(caap):
    from caap_lightning.attribution.blanks import make_blank

    return make_blank(caap.blank, (32, 32), caap.mean, caap.std)


@pytest.mark.parametrize("pool", [dict(), dict(global_pool="avg", class_token=False, fc_norm=True)])
def test_all_patches_selected_at_full_cutoff_reproduce_the_models_score(vit_factory, pool):
    model = vit_factory(scale=8.0, **pool)
    images = _images(2)
    # On the 4x4 grid, box2 around patch (1, 1) covers every patch.
    maps = CAAP(model, layer_cutoff=4, selection="box2").attribute(images, target=[0, 1])
    probs = model(images).softmax(-1)[[0, 1], [0, 1]]
    torch.testing.assert_close(maps[:, 1, 1], probs.detach(), atol=1e-5, rtol=0)
    assert (maps[:, 0, 0] - maps[:, 1, 1]).abs().max() > 1e-3  # other patches do differ


@pytest.mark.parametrize("construction", ["parallel", "efficient", "standard", "windowed"])
def test_batch_equals_single_images_and_chunking_changes_nothing(model, construction):
    images = _images(3)
    caap = CAAP(model, construction=construction, layer_cutoff=2)
    batch = caap.attribute(images, target=[0, 1, 2])
    singles = torch.cat([caap.attribute(images[i:i + 1], target=i) for i in range(3)])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=0)
    for chunk in (1, 3, 7, 100):
        chunked = CAAP(model, construction=construction, layer_cutoff=2, chunk_size=chunk).attribute(images, target=[0, 1, 2])
        torch.testing.assert_close(chunked, batch, atol=1e-5, rtol=0)


def test_target_none_uses_the_predicted_class(model):
    images = _images(2)
    caap = CAAP(model)
    predicted = model(images).argmax(-1)
    torch.testing.assert_close(caap.attribute(images), caap.attribute(images, target=predicted))


def test_upsample_and_relative(model):
    images = _images(2)
    caap = CAAP(model)
    maps = caap.attribute(images, target=[1, 2])
    pixels = caap.attribute(images, target=[1, 2], upsample=True)
    assert pixels.shape == (2, 32, 32)
    # The centre of each 8x8 patch is close to its patch value; bilinear keeps the range.
    assert pixels.min() >= maps.min() - 1e-6 and pixels.max() <= maps.max() + 1e-6
    relative = caap.attribute(images, target=[1, 2], relative=True)
    torch.testing.assert_close(relative, maps - caap.blank_score(target=[1, 2])[:, None, None])


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [getattr(m, "fused_attn", None) for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


@pytest.mark.parametrize("construction", ["parallel", "efficient", "standard"])
def test_model_is_left_exactly_as_found(model, construction):
    model.train()
    model.blocks[1].eval()  # a mixed state must survive too
    before = _snapshot(model)
    CAAP(model, construction=construction).attribute(_images(2), target=[0, 1])
    after = _snapshot(model)
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert before[1:] == after[1:]
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(p.grad is None for p in model.parameters())


def _fused_adamw_step(model, images):
    # Fused optimisers write the weights without bumping their version counters.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(images).logsumexp(-1).sum().backward()
    opt.step()
    model.zero_grad(set_to_none=True)


def _halve_through_data(model, images):
    for p in model.parameters():
        p.data.mul_(0.5)


def _copy_through_data(model, images):
    for p in model.parameters():
        p.data.copy_(p.data.roll(1, 0))  # e.g. loading other weights by hand


@pytest.mark.filterwarnings("ignore:CAAP. the .* blank is itself classified")
@pytest.mark.parametrize("change", [_fused_adamw_step, _halve_through_data, _copy_through_data])
@pytest.mark.parametrize("construction", ["parallel", "efficient"])
def test_maps_follow_weights_changed_in_place_without_a_version_bump(model, change, construction):
    images, targets = _images(2), [0, 1]
    caap = CAAP(model, construction=construction)
    before = caap.attribute(images, target=targets)
    blank_before = caap.blank_score(target=targets)
    change(model, images)
    fresh = CAAP(model, construction=construction)
    expected, blank_expected = fresh.attribute(images, target=targets), fresh.blank_score(target=targets)
    assert (expected - before).abs().max() > 1e-3  # the change does change the maps
    assert (blank_expected - blank_before).abs().max() > 1e-4
    torch.testing.assert_close(caap.attribute(images, target=targets), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(caap.blank_score(target=targets), blank_expected, atol=1e-6, rtol=0)
    rel = caap.attribute(images, target=targets, relative=True)
    torch.testing.assert_close(rel, expected - blank_expected[:, None, None], atol=1e-6, rtol=0)


def test_blank_score_without_target_is_the_blanks_own_top_class(model):
    from caap_lightning.attribution.blanks import make_blank

    caap = CAAP(model, blank="noise")
    probs = model(make_blank("noise", (32, 32), caap.mean, caap.std)).softmax(-1)[0].detach()
    top = int(probs.argmax())
    score = caap.blank_score()
    assert score.shape == (1,) and probs.max() > probs.min() + 0.05
    torch.testing.assert_close(score, probs[top:top + 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(score, caap.blank_score(target=top))
    logits = model(make_blank("noise", (32, 32), caap.mean, caap.std))[0].detach()
    torch.testing.assert_close(CAAP(model, blank="noise", score="logit").blank_score(), logits[top:top + 1],
                               atol=1e-4, rtol=0)


def test_saturated_blank_warns_once_per_class(vit_factory):
    model = vit_factory(scale=1.0)
    with torch.no_grad():
        model.head.bias.zero_()
        model.head.bias[0] = 20.0  # every input, the white blank included, reads as class 0
    caap = CAAP(model)
    images = _images(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        caap.attribute(images, target=[0, 0])
        caap.attribute(images, target=[0, 1])
        caap.attribute(images, target=[1, 1])
    saturated = [w for w in caught if "saturated" in str(w.message)]
    assert len(saturated) == 1
    assert "class 0" in str(saturated[0].message) and "score='logit'" in str(saturated[0].message)
    assert saturated[0].filename == __file__  # points at the caller, not at CAAP


def test_efficient_ranks_patches_like_parallel(vit_factory):
    # E-CAAP's blank part uses the blank's queries instead of the group's. Scale 8 makes
    # attention sharp, where the two differ most: measured rho 0.957..0.997 over 4 seeds
    # (1.0 at timm's init scale). 0.9 leaves room across seeds; the exactness test below
    # is what catches a broken subtraction of the S(p) terms.
    rhos = []
    for seed in range(3):
        model = vit_factory(scale=8.0, seed=seed, img_size=48)
        images = _images(2, size=48, seed=seed)
        parallel = CAAP(model, layer_cutoff=2).attribute(images, target=[0, 1])
        efficient = CAAP(model, layer_cutoff=2, construction="efficient").attribute(images, target=[0, 1])
        for a, b in zip(parallel, efficient):
            rhos.append(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)
    assert min(rhos) > 0.9, rhos


def test_efficient_is_exact_where_the_group_query_is_the_blanks(vit_factory):
    # In block 1 the class token's state is the image-independent h_0, so its query equals
    # the blank context's: with one block and k = 1, E-CAAP's only approximation vanishes
    # and it must equal parallel. Not subtracting the S(p) blank terms breaks this.
    model = vit_factory(scale=8.0, depth=1)
    images = _images(2)
    parallel = CAAP(model, layer_cutoff=1).attribute(images, target=[0, 1])
    efficient = CAAP(model, layer_cutoff=1, construction="efficient").attribute(images, target=[0, 1])
    assert (parallel.amax((1, 2)) - parallel.amin((1, 2))).min() > 0.02
    torch.testing.assert_close(efficient, parallel, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "images, target, match",
    [
        (torch.zeros(1, 1, 32, 32), None, "channels"),
        (torch.zeros(1, 3, 30, 32), None, "not divisible by the patch size"),
        (torch.zeros(1, 3, 40, 40), None, "dynamic_img_size=True"),
        (torch.zeros(0, 3, 32, 32), None, "empty batch"),
        (torch.zeros(1, 3, 32, 32), [5], "out of range"),
        (torch.zeros(2, 3, 32, 32), [0, 1, 2], "3 entries for a batch of 2"),
        (torch.zeros(3, 32, 32), None, r"\(B, C, H, W\)"),
    ],
)
def test_bad_input_gets_a_clear_error(model, images, target, match):
    with pytest.raises(ValueError, match=match):
        CAAP(model).attribute(images, target=target)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layer_cutoff=5), r"0\.\.4"),
        (dict(layer_cutoff=-1), r"0\.\.4"),
        (dict(selection="box3"), "selection"),
        (dict(blank="grey"), "blank"),
        (dict(blank=torch.zeros(3, 32, 32)), r"\(1, 3, H, W\)"),
        (dict(construction="fast"), "construction"),
        (dict(score="softmax"), "score"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_settings_fail_at_construction(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CAAP(model, **kwargs)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: timm.create_model("resnet18", num_classes=3), "VisionTransformer"),
        (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, global_pool="map"), "attention-pool"),
        (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, global_pool="max"), "global_pool='max'"),
        (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, block_fn=timm.models.vision_transformer.ResPostBlock), "ResPostBlock"),
        (lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2), "distillation"),
        (lambda: timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=2), "VisionTransformer"),
    ],
)
def test_unsupported_models_are_named_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        CAAP(build())


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2",
                                  "vit_base_patch16_clip_224"])
def test_timm_families_are_supported(name):
    kwargs = dict(img_size=28 if "patch14" in name else 32, depth=2, num_classes=4)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    patch = model.patch_embed.patch_size[0]
    images = _images(1, size=2 * patch)
    if getattr(model, "dynamic_img_size", False) is False:
        images = _images(1, size=kwargs["img_size"])
    maps = CAAP(model).attribute(images, target=[1])
    assert torch.isfinite(maps).all() and maps.shape[0] == 1


def test_dynamic_img_size_accepts_any_patch_multiple(vit_factory):
    model = vit_factory(scale=4.0, dynamic_img_size=True)
    caap = CAAP(model)
    assert caap.attribute(_images(1, size=48)).shape == (1, 6, 6)
    assert caap.attribute(torch.randn(1, 3, 16, 40)).shape == (1, 2, 5)


def test_custom_blank_tensor(model):
    blank = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    caap = CAAP(model, blank=blank)
    maps = caap.attribute(blank, target=[1])
    torch.testing.assert_close(maps, caap.blank_score(target=[1]).view(1, 1, 1).expand(1, 4, 4), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="images' size"):
        CAAP(model, blank=torch.zeros(1, 3, 16, 16)).attribute(_images(1))


def _entropies(model, caap, size=(32, 32)):
    """The predicted distribution's entropy for each fixed blank, written out from the definition."""
    from caap_lightning.attribution.blanks import FIXED_BLANKS, make_blank

    out = {}
    for kind in FIXED_BLANKS:
        p = model(make_blank(kind, size, caap.mean, caap.std)).softmax(-1)[0].double()
        out[kind] = float(-(p * p.log()).sum())
    return out


def test_auto_blank_is_the_fixed_blank_read_as_closest_to_uniform(model):
    images = _images(2)
    caap = CAAP(model, blank="auto")
    maps = caap.attribute(images, target=[0, 1])
    with torch.no_grad():
        entropies = _entropies(model, caap)
    assert max(entropies.values()) - min(entropies.values()) > 1e-2  # the choice is not a tie
    chosen = max(entropies, key=entropies.get)
    assert caap.last_blank == chosen
    torch.testing.assert_close(maps, CAAP(model, blank=chosen).attribute(images, target=[0, 1]), atol=0, rtol=0)
    torch.testing.assert_close(caap.blank_score([0]), CAAP(model, blank=chosen).blank_score([0]))


def test_auto_blank_follows_the_weights(vit_factory):
    model = vit_factory(scale=8.0, seed=0)
    caap = CAAP(model, blank="auto")
    caap.attribute(_images(1), target=[0])
    first = caap.last_blank
    # Redraw the head until the definition picks another blank; the next call must follow it.
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        with torch.no_grad():
            model.head.weight.copy_(3.0 * torch.randn(model.head.weight.shape, generator=gen))
            entropies = _entropies(model, caap)
        expected = max(entropies, key=entropies.get)
        if expected != first:
            break
    assert expected != first, "no head redraw changed the choice"
    caap.attribute(_images(1), target=[0])
    assert caap.last_blank == expected


def test_auto_blank_in_the_input_patching_baselines_is_the_same_choice(model):
    from caap_lightning.attribution import get_method
    from caap_lightning.attribution.blanks import make_blank

    images = _images(2)
    caap = CAAP(model, blank="auto")
    caap.attribute(images, target=[0, 1])
    for name in ("simple_insertion", "simple_deletion"):
        method = get_method(name, model, blank="auto")
        maps = method.attribute(images, target=[0, 1])
        assert method.last_blank == caap.last_blank
        fixed = get_method(name, model, blank=caap.last_blank).attribute(images, target=[0, 1])
        torch.testing.assert_close(maps, fixed, atol=0, rtol=0)
    with pytest.raises(ValueError, match="choose_blank"):
        make_blank("auto", (32, 32), (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("kind", ["noise", "blur_noise"])
def test_noise_blanks_are_seeded(kind):
    from caap_lightning.attribution.blanks import make_blank

    a = make_blank(kind, (32, 32), (0.5,) * 3, (0.5,) * 3, seed=0)
    b = make_blank(kind, (32, 32), (0.5,) * 3, (0.5,) * 3, seed=0)
    c = make_blank(kind, (32, 32), (0.5,) * 3, (0.5,) * 3, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.std() > 0.01


def test_bf16_autocast_is_close_to_fp32(model):
    images = _images(2)
    caap = CAAP(model, score="logit")
    fp32 = caap.attribute(images, target=[0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = caap.attribute(images, target=[0, 1])
    assert bf16.dtype == torch.float32
    scale = (fp32.max() - fp32.min()).item()
    assert (bf16 - fp32).abs().max().item() < 0.1 * scale


def test_calibrate_sweeps_every_cutoff_and_keeps_the_best_insdel(model):
    from types import SimpleNamespace

    from caap_lightning.metrics.functional import insertion_deletion

    images = _images(2)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    probe = SimpleNamespace(images=images, labels=torch.tensor([0, 3]), masks=masks)
    caap = CAAP(model, layer_cutoff=1)
    rows = caap.calibrate(probe)
    assert [r["layer_cutoff"] for r in rows] == [0, 1, 2, 3, 4]
    best = max(rows, key=lambda r: r["insdel"])
    assert caap.layer_cutoff == best["layer_cutoff"]
    # Each row is the metric of that cutoff's maps, not a copy of one another.
    k2 = insertion_deletion(model, images, CAAP(model, layer_cutoff=2).attribute(images, target=[0, 3]),
                            target=torch.tensor([0, 3]))
    assert abs(rows[2]["insdel"] - (k2.insertion - k2.deletion).mean().item()) < 1e-6
    assert len({round(r["insdel"], 6) for r in rows}) > 1
    assert all(0 <= r["aupr_fg"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="0..4"):
        caap.calibrate(probe, layer_cutoffs=[7])


@pytest.mark.parametrize("construction", ["parallel", "efficient", "standard"])
def test_bf16_weights_run_in_their_dtype_and_stay_close(vit_factory, construction):
    images = _images(2)
    fp32 = CAAP(vit_factory(scale=4.0), score="logit", construction=construction).attribute(images, target=[0, 1])
    model = vit_factory(scale=4.0).to(torch.bfloat16)
    bf16 = CAAP(model, score="logit", construction=construction).attribute(images, target=[0, 1])
    assert bf16.dtype == torch.float32 and next(model.parameters()).dtype == torch.bfloat16
    assert (bf16 - fp32).abs().max().item() < 0.1 * (fp32.max() - fp32.min()).item()
