"""Hugging Face and torchvision ViTs: their maps equal a timm ViT's holding the same weights.

The reference timm ViT is built independently and loaded through the explicit state-dict
mappings below (``_timm_state_*``), so a mistake in ``twins.py``'s wiring cannot hide in both.
"""

from __future__ import annotations

from typing import Callable, Dict

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from caap_lightning.attribution import CAAP, ConvCAAP, get_method
from caap_lightning.attribution.caap import CONSTRUCTIONS
from caap_lightning.attribution.twins import as_timm_vit, unwrap_compiled, vit_kind
from caap_lightning.utils import output_logits

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore:CAAP. the .* blank is itself classified")

# Tiny models of one shape: 32 px, 8 px patches, 2 blocks of width 32 with 2 heads, 5 classes.
_HF_SHAPE = dict(image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                 intermediate_size=64, num_labels=5, layer_norm_eps=1e-6)
_BASELINES = ("gradcam", "rollout", "tattr", "input_x_gradient", "simple_insertion", "simple_deletion", "occlusion")


def _scaled(model: nn.Module, seed: int) -> nn.Module:
    """Random weights large enough that maps vary from patch to patch (default inits give flat maps)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.4 if p.dim() >= 2 else 0.1))
    return model.eval()


def hf_vit(seed: int = 0) -> nn.Module:
    return _scaled(transformers.ViTForImageClassification(transformers.ViTConfig(**_HF_SHAPE)), seed)


def hf_deit(seed: int = 0) -> nn.Module:
    return _scaled(transformers.DeiTForImageClassification(transformers.DeiTConfig(**_HF_SHAPE)), seed)


def hf_vit_msn(seed: int = 0) -> nn.Module:
    return _scaled(transformers.ViTMSNForImageClassification(transformers.ViTMSNConfig(**_HF_SHAPE)), seed)


def hf_ijepa(seed: int = 0) -> nn.Module:
    """No class token: the classifier reads the mean of the normed patch tokens (timm's ``avg`` pooling)."""
    return _scaled(transformers.IJepaForImageClassification(transformers.IJepaConfig(**_HF_SHAPE)), seed)


def torchvision_vit(seed: int = 0) -> nn.Module:
    model = TorchvisionViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                           num_classes=5)
    return _scaled(model, seed)


def _reference(name: str) -> VisionTransformer:
    pooling = dict(class_token=False, global_pool="avg", fc_norm=False) if name == "hf_ijepa" else {}
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                             num_classes=5, reg_tokens=1 if name == "hf_deit" else 0, qkv_bias=True,
                             **pooling).eval()


def _linear(prefix: str, linear: nn.Module) -> Dict[str, torch.Tensor]:
    return {f"{prefix}.weight": linear.weight, f"{prefix}.bias": linear.bias}


def _hf_layer_parts(layer: nn.Module):
    """One layer's (query, key, value, output, fc1, fc2) Linears, in transformers 5's or 4's names."""
    att = layer.attention
    if hasattr(att, "q_proj"):  # transformers 5
        return att.q_proj, att.k_proj, att.v_proj, att.o_proj, layer.mlp.fc1, layer.mlp.fc2
    inner = att.attention  # transformers 4
    return inner.query, inner.key, inner.value, att.output.dense, layer.intermediate.dense, layer.output.dense


def _timm_state_hf(model: nn.Module) -> Dict[str, torch.Tensor]:
    """transformers' ViT/DeiT names -> timm's."""
    backbone = next(getattr(model, name) for name in ("vit", "deit", "ijepa") if hasattr(model, name))
    emb = backbone.embeddings
    state = {"pos_embed": emb.position_embeddings,
             **_linear("patch_embed.proj", emb.patch_embeddings.projection),
             **_linear("norm", backbone.layernorm), **_linear("head", model.classifier)}
    if hasattr(emb, "cls_token"):
        state["cls_token"] = emb.cls_token
    if hasattr(emb, "distillation_token"):
        state["reg_token"] = emb.distillation_token
    layers = backbone.layers if hasattr(backbone, "layers") else backbone.encoder.layer
    for i, layer in enumerate(layers):
        query, key, value, output, fc1, fc2 = _hf_layer_parts(layer)
        state.update({
            f"blocks.{i}.attn.qkv.weight": torch.cat([query.weight, key.weight, value.weight]),
            f"blocks.{i}.attn.qkv.bias": torch.cat([query.bias, key.bias, value.bias]),
            **_linear(f"blocks.{i}.attn.proj", output),
            **_linear(f"blocks.{i}.norm1", layer.layernorm_before),
            **_linear(f"blocks.{i}.norm2", layer.layernorm_after),
            **_linear(f"blocks.{i}.mlp.fc1", fc1),
            **_linear(f"blocks.{i}.mlp.fc2", fc2),
        })
    return state


def _timm_state_torchvision(model: nn.Module) -> Dict[str, torch.Tensor]:
    """torchvision's VisionTransformer names -> timm's."""
    state = {"cls_token": model.class_token, "pos_embed": model.encoder.pos_embedding,
             **_linear("patch_embed.proj", model.conv_proj), **_linear("norm", model.encoder.ln),
             **_linear("head", model.heads.head)}
    for i, block in enumerate(model.encoder.layers):
        att = block.self_attention
        state.update({
            f"blocks.{i}.attn.qkv.weight": att.in_proj_weight, f"blocks.{i}.attn.qkv.bias": att.in_proj_bias,
            **_linear(f"blocks.{i}.attn.proj", att.out_proj),
            **_linear(f"blocks.{i}.norm1", block.ln_1), **_linear(f"blocks.{i}.norm2", block.ln_2),
            **_linear(f"blocks.{i}.mlp.fc1", block.mlp[0]), **_linear(f"blocks.{i}.mlp.fc2", block.mlp[3]),
        })
    return state


_FAMILIES: Dict[str, Callable[[], nn.Module]] = {
    "hf_vit": hf_vit, "hf_deit": hf_deit, "hf_vit_msn": hf_vit_msn, "hf_ijepa": hf_ijepa, "torchvision": torchvision_vit,
}


def _pair(name: str):
    """A model of ``name``'s family and an independent timm ViT loaded with its weights."""
    model = _FAMILIES[name]()
    reference = _reference(name)
    mapping = _timm_state_torchvision(model) if name == "torchvision" else _timm_state_hf(model)
    reference.load_state_dict({k: v.detach().clone() for k, v in mapping.items()}, strict=True)
    return model, reference


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(_FAMILIES))
def test_twin_and_reference_give_the_original_logits(name):
    model, reference = _pair(name)
    images = _images()
    with torch.no_grad():
        original = output_logits(model(images))
        torch.testing.assert_close(as_timm_vit(model)(images), original, atol=1e-5, rtol=0)
        torch.testing.assert_close(reference(images), original, atol=1e-5, rtol=0)
    assert original.std() > 0.1  # the comparison is of varied logits, not of zeros


@pytest.mark.parametrize("construction", CONSTRUCTIONS)
@pytest.mark.parametrize("name", list(_FAMILIES))
def test_caap_maps_equal_the_timm_reference(name, construction):
    model, reference = _pair(name)
    images, target = _images(), torch.tensor([1, 3])
    maps = CAAP(model, construction=construction, layer_cutoff=1).attribute(images, target=target)
    expected = CAAP(reference, construction=construction, layer_cutoff=1).attribute(images, target=target)
    torch.testing.assert_close(maps, expected, atol=1e-4, rtol=0)
    assert maps.std() > 1e-3


@pytest.mark.parametrize("method", _BASELINES)
@pytest.mark.parametrize("name", list(_FAMILIES))
def test_baselines_equal_the_timm_reference(name, method):
    model, reference = _pair(name)
    images, target = _images(), torch.tensor([0, 4])
    maps = get_method(method, model).attribute(images, target=target)
    expected = get_method(method, reference).attribute(images, target=target)
    torch.testing.assert_close(maps, expected, atol=1e-4, rtol=1e-4)
    assert maps.shape == (2, 4, 4) and maps.abs().sum() > 0


def test_compiled_models_give_the_uncompiled_maps():
    # torch.compile wraps lazily: attribution unwraps it and never runs the compiler, so no C++ toolchain is needed.
    model, images = hf_vit(), _images()
    compiled = torch.compile(model)
    assert unwrap_compiled(compiled) is model and vit_kind(compiled) == "transformers"
    for construction in CONSTRUCTIONS:
        torch.testing.assert_close(CAAP(compiled, construction=construction).attribute(images, target=2),
                                   CAAP(model, construction=construction).attribute(images, target=2))
    torch.testing.assert_close(get_method("tattr", compiled).attribute(images, target=2),
                               get_method("tattr", model).attribute(images, target=2))


def test_compiled_cnn_gives_the_uncompiled_maps():
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=5).eval()
    images = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(resnet)
    torch.testing.assert_close(ConvCAAP(compiled, layer_cutoff="layer3").attribute(images, target=1),
                               ConvCAAP(resnet, layer_cutoff="layer3").attribute(images, target=1))
    torch.testing.assert_close(get_method("gradcam", compiled).attribute(images, target=1),
                               get_method("gradcam", resnet).attribute(images, target=1))


@pytest.mark.parametrize("name", list(_FAMILIES))
def test_twin_shares_the_weights(name):
    model, _ = _pair(name)
    images = _images()
    caap = CAAP(model, score="logit")
    before = caap.attribute(images, target=1)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "projection.weight" in n or "conv_proj.weight" in n).mul_(3.0)
    after = caap.attribute(images, target=1)
    _, reference = _pair(name)  # rebuilt from the same seed, then given the same change by the mapping
    reference.load_state_dict({k: v.detach().clone() for k, v in (
        _timm_state_torchvision(model) if name == "torchvision" else _timm_state_hf(model)).items()})
    torch.testing.assert_close(after, CAAP(reference, score="logit").attribute(images, target=1), atol=1e-4, rtol=0)
    assert (after - before).abs().max() > 1e-3
    assert all(p.data_ptr() in {q.data_ptr() for q in model.parameters()} for p in caap.model.parameters())


def test_twin_is_cached_and_rebuilt_when_a_part_is_replaced():
    model = hf_vit()
    twin = as_timm_vit(model)
    assert as_timm_vit(model) is twin
    model.classifier = nn.Linear(32, 7)
    rebuilt = as_timm_vit(model)
    assert rebuilt is not twin and rebuilt.head is model.classifier and rebuilt.num_classes == 7


def test_vit_kind_names_the_library():
    import timm
    import torchvision

    assert vit_kind(hf_vit()) == "transformers"
    assert vit_kind(torchvision_vit()) == "torchvision"
    assert vit_kind(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)) == "timm"
    assert vit_kind(torchvision.models.resnet18()) is None
    assert vit_kind(nn.Linear(2, 2)) is None


def _swin():
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                     window_size=4, num_labels=3)
    return transformers.SwinForImageClassification(config)


def _dinov2():
    config = transformers.Dinov2Config(image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                                       hidden_size=32, mlp_ratio=2, num_labels=3)
    return transformers.Dinov2ForImageClassification(config)


def _deit_with_teacher():
    return transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**_HF_SHAPE))


def _torchvision_conv_stem():
    from torchvision.models.vision_transformer import ConvStemConfig

    stem = [ConvStemConfig(out_channels=8, kernel_size=3, stride=2)]
    return TorchvisionViT(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                          num_classes=5, conv_stem_configs=stem)


def _torchvision_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2],
                           num_classes=3)


@pytest.mark.parametrize("build, part", [
    (_deit_with_teacher, r"DeiTForImageClassificationWithTeacher has a distilled head"),
    (_swin, r"SwinForImageClassification has shifted-window attention"),
    (_dinov2, r"Dinov2ForImageClassification has a classifier on the class token concatenated"),
    (_torchvision_conv_stem, r"torchvision VisionTransformer has a convolutional stem \(conv_stem_configs\)"),
    (_torchvision_swin, r"torchvision SwinTransformer has windowed or multi-axis attention"),
])
def test_unsupported_vits_are_refused_naming_the_part(build, part):
    model = build()
    assert vit_kind(model) is not None  # found as a ViT, so that it is refused with a reason
    supported = r"which CAAP cannot patch; supported: timm VisionTransformer .*ViTForImageClassification"
    for construct in (CAAP, lambda m: get_method("rollout", m), lambda m: get_method("gradcam", m)):
        with pytest.raises(ValueError, match=part + ".*" + supported):
            construct(model)


def test_output_logits_reads_every_output_form():
    logits = torch.randn(2, 5)
    model = hf_vit()
    with torch.no_grad():
        expected = model(_images()).logits
        torch.testing.assert_close(output_logits(model(_images())), expected)
        torch.testing.assert_close(output_logits(model(_images(), return_dict=False)), expected)
    assert output_logits(logits) is logits
    assert output_logits({"logits": logits, "loss": None}) is logits
    assert output_logits((logits, torch.zeros(2))) is logits
    with pytest.raises(TypeError, match="cannot read logits from a model output of type str"):
        output_logits("logits")
    with pytest.raises(TypeError, match="of type dict"):
        output_logits({"features": logits})
