"""find_attribution_model: which ViT or CNN of a LightningModule is explained, and the head of a headless ViT."""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torchvision
from torch import nn

from caap_lightning.callbacks.discovery import find_attribution_model

DIM = 32  # the tiny ViT's embed_dim, so its num_features


class Holder(L.LightningModule):
    """A LightningModule holding the given submodules as attributes."""

    def __init__(self, **modules: nn.Module) -> None:
        super().__init__()
        for name, module in modules.items():
            setattr(self, name, module)


def test_hook_wins(vit_factory):
    explained = vit_factory(seed=1)

    class Hooked(Holder):
        def get_attribution_model(self):
            return explained

    module = Hooked(model=vit_factory(), student=explained)
    assert find_attribution_model(module) == (explained, None)


def test_model_attribute(vit_factory):
    module = Holder(model=vit_factory(), ema=vit_factory(seed=1))
    assert find_attribution_model(module) == (module.model, None)


def test_model_attribute_that_is_no_vit_is_returned_for_the_methods_to_judge():
    module = Holder(model=nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    assert find_attribution_model(module) == (module.model, None)


@pytest.mark.parametrize("name", ["backbone", "net", "encoder"])
def test_single_vit_under_any_name(vit_factory, name):
    module = Holder(**{name: vit_factory()})
    assert find_attribution_model(module) == (getattr(module, name), None)


def test_module_that_is_a_vit(vit_factory):
    vit = vit_factory()
    assert find_attribution_model(vit) == (vit, None)


def test_model_that_wraps_a_headless_vit_and_its_head(vit_factory):
    wrapper = nn.Sequential(vit_factory(num_classes=0), nn.Linear(DIM, 3))
    module = Holder(model=wrapper)
    assert find_attribution_model(module) == (wrapper[0], wrapper[1])


def test_several_vits_name_their_paths(vit_factory):
    module = Holder(teacher=vit_factory(), student=vit_factory(seed=1))
    with pytest.raises(ValueError, match=r"2 supported models \('teacher' \(VisionTransformer\), 'student' "
                                         r"\(VisionTransformer\)\).*define get_attribution_model\(\) returning the one"):
        find_attribution_model(module)


def test_one_vit_shared_by_two_attributes_counts_once(vit_factory):
    vit = vit_factory()
    module = Holder(backbone=vit, alias=vit)
    assert find_attribution_model(module) == (vit, None)


def test_nothing_supported_names_both_families():
    module = Holder(net=nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    with pytest.raises(ValueError, match=r"no supported ViT nor CNN found.*get_attribution_model.*"
                                         r"`model` attribute.*a ViT \(timm VisionTransformer.*torchvision VisionTransformer.*or a CNN that ConvCAAP reads "
                                         r"\(torchvision ResNet"):
        find_attribution_model(module)


def tiny_resnet(num_classes: int = 3) -> nn.Module:
    return torchvision.models.resnet18(num_classes=num_classes)


@pytest.mark.parametrize("name", ["model", "net", "backbone"])
def test_a_supported_cnn_under_any_name_keeps_its_own_head(name):
    module = Holder(**{name: tiny_resnet()}, classifier=nn.Linear(512, 3))
    assert find_attribution_model(module) == (getattr(module, name), None)


def test_model_that_wraps_a_cnn_gives_the_cnn():
    wrapper = nn.Sequential(nn.Identity(), timm.create_model("resnet18", pretrained=False, num_classes=3))
    module = Holder(model=wrapper)
    assert find_attribution_model(module) == (wrapper[1], None)


def test_a_vit_and_a_cnn_are_two_candidates(vit_factory):
    module = Holder(student=vit_factory(), teacher=tiny_resnet())
    with pytest.raises(ValueError, match=r"2 supported models \('student' \(VisionTransformer\), 'teacher' \(ResNet\)\)"):
        find_attribution_model(module)


def test_head_argument_with_a_cnn_is_refused():
    module = Holder(model=tiny_resnet(), classifier=nn.Linear(512, 3))
    with pytest.raises(ValueError, match=r"head='classifier' completes a timm ViT built with num_classes=0, but the "
                                         r"attribution model \(ResNet\) is a CNN.*remove head="):
        find_attribution_model(module, head="classifier")


def test_a_headless_timm_cnn_is_refused():
    module = Holder(backbone=timm.create_model("resnet18", pretrained=False, num_classes=0), classifier=nn.Linear(512, 3))
    with pytest.raises(ValueError, match=r"ResNet has num_classes=0: its outputs are features"):
        find_attribution_model(module)


def test_headless_vit_gets_the_linear_that_takes_its_features(vit_factory):
    module = Holder(backbone=vit_factory(num_classes=0), proj=nn.Linear(7, DIM), classifier=nn.Linear(DIM, 3))
    assert find_attribution_model(module) == (module.backbone, module.classifier)


@pytest.mark.parametrize("path", ["classifier", "heads.0"])
def test_head_by_attribute_path(vit_factory, path):
    module = Holder(backbone=vit_factory(num_classes=0), classifier=nn.Linear(DIM, 3),
                    heads=nn.ModuleList([nn.Linear(DIM, 4), nn.Linear(DIM, 2)]))
    assert find_attribution_model(module, head=path)[1] is module.get_submodule(path)


def test_head_hook_wins(vit_factory):
    mlp = nn.Sequential(nn.Linear(DIM, 8), nn.ReLU(), nn.Linear(8, 3))

    class Hooked(Holder):
        def get_attribution_head(self):
            return mlp

    module = Hooked(backbone=vit_factory(num_classes=0), classifier=nn.Linear(DIM, 3), mlp=mlp)
    assert find_attribution_model(module, head="classifier") == (module.backbone, mlp)


def test_head_hook_must_return_a_module(vit_factory):
    class Hooked(Holder):
        def get_attribution_head(self):
            return "classifier"

    with pytest.raises(ValueError, match=r"get_attribution_head\(\) returned str"):
        find_attribution_model(Hooked(backbone=vit_factory(num_classes=0)))


def test_several_fitting_linears_name_them_and_the_remedy(vit_factory):
    module = Holder(backbone=vit_factory(num_classes=0), cls_head=nn.Linear(DIM, 3), aux_head=nn.Linear(DIM, 2))
    with pytest.raises(ValueError, match=r"2 nn.Linear layers take its 32 features \('cls_head', 'aux_head'\); "
                                         r"pass head=.*get_attribution_head\(\)"):
        find_attribution_model(module)


def test_no_fitting_linear_names_the_linears_and_the_remedy(vit_factory):
    module = Holder(backbone=vit_factory(num_classes=0), proj=nn.Linear(7, 3))
    with pytest.raises(ValueError, match=r"no nn.Linear outside it takes its 32 features .*'proj' \(7 in\).*"
                                         r"pass head=.*get_attribution_head\(\)"):
        find_attribution_model(module)


def test_linear_inside_the_vit_is_no_candidate(vit_factory):
    with pytest.raises(ValueError, match=r"nn.Linear layers outside the ViT: none"):
        find_attribution_model(Holder(backbone=vit_factory(num_classes=0)))


def test_head_argument_with_a_vit_that_has_its_own_head(vit_factory):
    module = Holder(model=vit_factory(), classifier=nn.Linear(DIM, 3))
    with pytest.raises(ValueError, match=r"the ViT has its own head \(num_classes=5\).*remove head="):
        find_attribution_model(module, head="classifier")


def test_head_argument_that_names_nothing(vit_factory):
    module = Holder(backbone=vit_factory(num_classes=0), classifier=nn.Linear(DIM, 3))
    with pytest.raises(ValueError, match=r"head='clasifier' names no submodule of Holder.*'classifier'"):
        find_attribution_model(module, head="clasifier")


def test_head_argument_with_the_wrong_width(vit_factory):
    module = Holder(backbone=vit_factory(num_classes=0), proj=nn.Linear(7, 3))
    with pytest.raises(ValueError, match="head='proj' takes 7 features but the ViT gives 32"):
        find_attribution_model(module, head="proj")


def test_a_swapped_model_is_found_without_a_forward(vit_factory):
    module = Holder(model=vit_factory(num_classes=0), classifier=nn.Linear(DIM, 3))
    first = find_attribution_model(module)
    module.model = vit_factory(num_classes=0, seed=1)  # e.g. an averaged copy put in during the fit

    def no_forward(*args, **kwargs):
        raise AssertionError("discovery must not run the model")

    module.model.forward = no_forward
    assert first[0] is not module.model
    assert find_attribution_model(module) == (module.model, module.classifier)
