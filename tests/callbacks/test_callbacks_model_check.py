"""The model explained is the user's model: the head is whatever maps the backbone's features to the module's
outputs, and setup compares the attribution classifier with the module's own forward."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from caap_lightning.attribution import vit
from caap_lightning.callbacks import CAAPCallback
from caap_lightning.callbacks.discovery import (
    BinaryAsTwoClasses,
    check_class_scores,
    find_attribution_model,
    names_its_classifier,
    nonfinite_rows,
    verify_attribution_model,
)
from caap_lightning.utils import eval_mode, normalize, output_logits

DIM = 32  # the tiny ViT's num_features
HALF = (0.5, 0.5, 0.5)


class Backboned(L.LightningModule):
    """A headless ViT and a head of the module's own; ``forward`` is ``head(backbone(x))`` unless given."""

    def __init__(self, backbone: nn.Module, forward=None, **modules: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        for name, module in modules.items():
            setattr(self, name, module)
        self._forward = forward

    def forward(self, x):
        if self._forward is not None:
            return self._forward(self, x)
        return self.head(self.backbone(x))


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def explained(module: nn.Module) -> nn.Module:
    """The classifier the callbacks explain for ``module``'s ViT."""
    return vit.Classifier(*find_attribution_model(module))


@pytest.mark.parametrize(
    "head",
    [
        lambda: nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 3)),
        lambda: nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 3)),
        lambda: nn.Sequential(nn.Dropout(0.1), nn.Sequential(nn.Linear(DIM, DIM), nn.GELU()), nn.Linear(DIM, 3)),
    ],
    ids=["mlp", "layernorm-linear", "nested"],
)
def test_the_head_is_the_whole_sequential_that_gives_the_outputs(vit_factory, head):
    module = Backboned(vit_factory(num_classes=0), head=head())
    model, found = find_attribution_model(module)
    assert model is module.backbone and found is module.head
    x = images()
    assert verify_attribution_model(module, vit.Classifier(model, found), x) is None
    with torch.no_grad(), eval_mode(module):
        torch.testing.assert_close(vit.Classifier(model, found)(x), module(x), rtol=0, atol=0)


def test_the_first_linear_of_an_mlp_head_is_refused_naming_the_rest(vit_factory):
    module = Backboned(vit_factory(num_classes=0), head=nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 3)))
    classifier = vit.Classifier(module.backbone, module.head[0])  # what head="head.0" (or the old discovery) takes
    with pytest.raises(ValueError, match=r"is not Backboned's classifier: on 4 probe images the module's forward "
                                         r"gives outputs of shape \(4, 3\), the attribution model \(4, 64\)\. The "
                                         r"module's forward also runs 'head.1' \(ReLU\), 'head.2' \(Linear\) after "
                                         r"it\..*get_attribution_model\(\).*head="):
        verify_attribution_model(module, classifier, images())


def test_a_separate_norm_before_the_linear_is_named(vit_factory):
    module = Backboned(vit_factory(num_classes=0), norm=nn.LayerNorm(DIM), fc=nn.Linear(DIM, 3),
                       forward=lambda self, x: self.fc(self.norm(self.backbone(x))))
    with torch.no_grad():
        module.norm.weight.mul_(3.0)  # an identity LayerNorm would still change the features; make sure of it
    model, head = find_attribution_model(module)
    assert head is module.fc
    with pytest.raises(ValueError, match=r"their outputs differ by up to \d.*also runs 'norm' \(LayerNorm\) after it"):
        verify_attribution_model(module, vit.Classifier(model, head), images())


def test_a_vit_keeping_its_own_head_under_a_module_linear_is_refused(vit_factory):
    module = Backboned(vit_factory(num_classes=10), head=nn.Linear(10, 3))
    model, head = find_attribution_model(module)
    assert model is module.backbone and head is None
    with pytest.raises(ValueError, match=r"gives outputs of shape \(4, 3\), the attribution model \(4, 10\)\. The "
                                         r"module's forward also runs 'head' \(Linear\) after it"):
        verify_attribution_model(module, vit.Classifier(model, head), images())


@pytest.mark.parametrize("mean", [HALF, (0.485, 0.456, 0.406)])
def test_normalisation_inside_forward_is_named_with_its_mean_and_std(vit_factory, mean):
    std = HALF if mean == HALF else (0.229, 0.224, 0.225)
    module = Backboned(vit_factory(), forward=lambda self, x: self.backbone(normalize(x, mean, std)))
    model, head = find_attribution_model(module)
    said = re.escape(f"normalised with mean={tuple(mean)}, std={tuple(std)}")
    with pytest.raises(ValueError, match=rf"normalises the images itself .*{said}.*move that normalisation into "
                                         r"the data's transforms"):
        # The callback's mean/std after the pixel-range warning's advice: the raw pixels reach the ViT.
        verify_attribution_model(module, vit.Classifier(model, head), images(), mean=(0.0,) * 3, std=(1.0,) * 3)


@pytest.mark.parametrize(
    "wrap",
    [lambda t: {"logits": t, "loss": None}, lambda t: (t, t.mean()), lambda t: type("Out", (), {"logits": t})()],
    ids=["dict", "tuple", "object"],
)
def test_outputs_that_are_objects_are_read_for_their_logits(vit_factory, wrap):
    module = Backboned(vit_factory(), forward=lambda self, x: wrap(self.backbone(x)))
    model, head = find_attribution_model(module)
    assert verify_attribution_model(module, vit.Classifier(model, head), images()) is None
    t = torch.ones(2, 3)
    assert output_logits(wrap(t)) is t
    with pytest.raises(TypeError, match=r"cannot read logits from a model output of type str"):
        output_logits("logits")


def test_a_module_that_names_its_classifier_is_not_compared_with_its_forward(vit_factory):
    class Named(Backboned):
        def get_attribution_model(self):
            return self.backbone

    module = Named(vit_factory(), forward=lambda self, x: self.backbone.forward_features(x))  # features, not logits
    model, head = find_attribution_model(module)
    assert names_its_classifier(module, model)
    assert verify_attribution_model(module, vit.Classifier(model, head), images(), against_forward=False) is None
    # A headless ViT named by the hook is only named whole with its head.
    headless = Named(vit_factory(num_classes=0), head=nn.Linear(DIM, 3))
    assert not names_its_classifier(headless, headless.backbone)
    assert names_its_classifier(headless, headless.backbone, head="head")
    assert not names_its_classifier(Backboned(vit_factory()), module.backbone)


def test_a_forward_that_cannot_take_images_gives_a_note(vit_factory):
    module = Backboned(vit_factory(), forward=lambda self, batch: self.backbone(batch.pixel_values))
    model, head = find_attribution_model(module)
    note = verify_attribution_model(module, vit.Classifier(model, head), images())
    assert "could not be compared with Backboned's forward, which failed on a batch of probe images" in note
    assert "define get_attribution_model()" in note


def test_verifying_leaves_the_module_and_every_generator_as_found(vit_factory):
    backbone = vit_factory(num_classes=0, drop_rate=0.5, drop_path_rate=0.5)
    module = Backboned(backbone, head=nn.Sequential(nn.Dropout(0.5), nn.Linear(DIM, 3)))
    module.train()
    module.head[0].eval()  # a flag of its own, restored as it was
    flags = [m.training for m in module.modules()]
    rng = torch.get_rng_state()
    assert verify_attribution_model(module, explained(module), images()) is None
    assert [m.training for m in module.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in module.parameters())


def test_class_scores_refuse_one_output_and_name_nonfinite_images():
    with pytest.raises(ValueError, match=r"the head gives one output per image \(a one-logit binary classifier.*"
                                         r"BinaryAsTwoClasses\(head\).*get_attribution_head\(\)"):
        check_class_scores(torch.zeros(4, 1), "the head")
    logits = torch.zeros(5, 3)
    logits[1, 2] = float("nan")
    logits[3, 0] = float("inf")
    assert nonfinite_rows(logits) == [1, 3]
    with pytest.raises(ValueError, match=r"NaN or inf outputs on probe image\(s\) \[1, 3\].*argmaxes to class 0"):
        check_class_scores(logits)
    with pytest.raises(ValueError, match=r"outputs of shape \(5,\), not class scores"):
        check_class_scores(torch.zeros(5))
    check_class_scores(torch.zeros(5, 2))


def test_a_one_logit_model_is_refused_in_setup(vit_factory, tmp_path):
    module = Trainable(vit_factory(num_classes=0), nn.Linear(DIM, 1))
    trainer = quiet_trainer(tmp_path, CAAPCallback(num_images=4, mean=HALF, std=HALF, log_images=False))
    with pytest.raises(ValueError, match=r"CAAPCallback cannot attribute Trainable: the attribution model "
                                         r"\(Classifier\) gives one output per image"):
        trainer.fit(module, *loaders())


# ---------------------------------------------------------------------- in a fit
class Trainable(Backboned):
    def __init__(self, backbone: nn.Module, head: nn.Module, forward=None) -> None:
        super().__init__(backbone, forward=forward, head=head)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def loaders():
    x, y = images(8, seed=1) * 2 - 1, torch.arange(8) % 3  # normalised with mean = std = 0.5
    return DataLoader(TensorDataset(x, y), batch_size=4), DataLoader(TensorDataset(x, y), batch_size=4)


def quiet_trainer(root, *callbacks) -> L.Trainer:
    return L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=list(callbacks),
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     num_sanity_val_steps=0, default_root_dir=str(root))


def test_a_fit_explains_the_whole_mlp_head(vit_factory, tmp_path):
    module = Trainable(vit_factory(num_classes=0), nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 3)))
    caap = CAAPCallback(num_images=4, mean=HALF, std=HALF, log_images=False, metrics=["insertion_deletion"])
    quiet_trainer(tmp_path, caap).fit(module, *loaders())
    assert caap._classifier.head is module.head and caap._classifier.num_classes == 3
    assert len(caap.history) == 1 and "caap/insdel" in caap.history[0]


def test_a_fit_refuses_a_module_that_normalises_inside_forward(vit_factory, tmp_path):
    forward = lambda self, x: self.head(self.backbone(normalize(x, HALF, HALF)))  # noqa: E731
    module = Trainable(vit_factory(num_classes=0), nn.Linear(DIM, 3), forward=forward)
    caap = CAAPCallback(num_images=4, mean=(0.0,) * 3, std=(1.0,) * 3, log_images=False)
    with pytest.raises(ValueError, match=r"CAAPCallback cannot attribute Trainable: the attribution model "
                                         r"\(VisionTransformer \+ head Linear\) is not Trainable's classifier.*"
                                         r"normalises the images itself"):
        quiet_trainer(tmp_path, caap).fit(module, *loaders())


# ---------------------------------------------------------------------- compiled, Hugging Face and torchvision ViTs
def test_a_compiled_model_is_unwrapped_wherever_it_comes_from(vit_factory):
    plain = vit_factory()
    compiled = torch.compile(plain)

    class Hooked(Backboned):
        def get_attribution_model(self):
            return compiled

    assert find_attribution_model(Backboned(nn.Identity(), model=compiled)) == (plain, None)
    assert find_attribution_model(Backboned(compiled)) == (plain, None)
    assert find_attribution_model(Hooked(nn.Identity())) == (plain, None)


def test_a_torchvision_vit_is_found_in_a_module():
    from torchvision.models.vision_transformer import VisionTransformer

    tv = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=DIM, mlp_dim=64,
                           num_classes=3)
    module = Backboned(nn.Identity(), net=tv, extra=nn.Linear(3, 3))
    assert find_attribution_model(module) == (tv, None)
    from caap_lightning.attribution.twins import vit_kind

    assert vit_kind(tv) == "torchvision"


@pytest.mark.parametrize("name", ["ViTForImageClassification", "DeiTForImageClassification"])
def test_a_hugging_face_vit_is_found_in_a_module(name):
    transformers = pytest.importorskip("transformers")
    from caap_lightning.attribution.twins import vit_kind

    config_class = transformers.ViTConfig if name.startswith("ViT") else transformers.DeiTConfig
    config = config_class(image_size=32, patch_size=8, hidden_size=DIM, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, num_labels=3)
    hf = getattr(transformers, name)(config)
    module = Backboned(nn.Identity(), vit=hf)
    assert find_attribution_model(module) == (hf, None)
    assert vit_kind(hf) == "transformers"
    # Its outputs are objects: the check reads their .logits.
    assert output_logits(hf(pixel_values=images(2))).shape == (2, 3)


def test_nan_outputs_at_a_check_are_named_and_the_monitor_counts_nothing(vit_factory, tmp_path):
    from caap_lightning.callbacks import SpuriousCueMonitor

    class Diverging(Trainable):
        def on_validation_epoch_start(self):
            with torch.no_grad():
                self.head.weight.fill_(float("nan"))

    module = Diverging(vit_factory(num_classes=0), nn.Linear(DIM, 3))
    caap = CAAPCallback(num_images=4, mean=HALF, std=HALF, log_images=False)
    monitor = SpuriousCueMonitor()
    # The default watches the border swap test's follow share (issue 29).
    with pytest.warns(UserWarning, match=r"the check at epoch 0 is not counted: caap/border_swap_follow_share was not "
                      r"logged there \(the model's outputs on the probe images were not finite \(NaN or inf\)\)") as record:
        quiet_trainer(tmp_path, caap, monitor).fit(module, *loaders())
    assert monitor.monitor_key == "caap/border_swap_follow_share" and monitor.history == []
    assert caap.last.unscored["caap/border_swap_ratio"].startswith("the model's outputs")
    assert not any("class of its partner" in str(w.message) for w in record)


def test_an_attribution_model_that_fails_gives_a_note_not_an_error(vit_factory):
    class Failing(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    module = Backboned(vit_factory())
    note = verify_attribution_model(module, Failing(), images())
    assert note.startswith("the attribution model (Failing) failed on a batch of probe images (RuntimeError: boom)")


def test_a_one_logit_model_is_explained_through_two_classes_with_bce_probabilities(vit_factory, tmp_path):
    class Binary(Trainable):
        def get_attribution_head(self):
            return BinaryAsTwoClasses(self.head)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.binary_cross_entropy_with_logits(self(x)[:, 0], (y > 0).float())

    module = Binary(vit_factory(num_classes=0), nn.Linear(DIM, 1))
    x = images()
    model, head = find_attribution_model(module)
    assert isinstance(head, BinaryAsTwoClasses) and head.head is module.head
    with torch.no_grad(), eval_mode(module):
        z = module(x)[:, 0]
        two = vit.Classifier(model, head)(x)
    torch.testing.assert_close(two.softmax(-1)[:, 1], torch.sigmoid(z))
    # Its logit is the two classes' difference: the same classifier as the module's forward.
    assert verify_attribution_model(module, vit.Classifier(model, head), x) is None
    # A head that is not the module's still fails.
    other = BinaryAsTwoClasses(nn.Linear(DIM, 1))
    with pytest.raises(ValueError, match=r"their outputs differ by up to"):
        verify_attribution_model(module, vit.Classifier(model, other), x)
    caap = CAAPCallback(num_images=4, mean=HALF, std=HALF, log_images=False, metrics=["insertion_deletion"])
    quiet_trainer(tmp_path, caap).fit(module, *loaders())
    assert caap._classifier.num_classes == 2 and "caap/insdel" in caap.history[0]
    assert caap.history[0]["caap/insertion"] != caap.history[0]["caap/deletion"]


@pytest.mark.parametrize("ending", [lambda t: t.softmax(-1), lambda t: t.log_softmax(-1)],
                         ids=["softmax", "log_softmax"])
def test_a_forward_ending_in_a_softmax_explains_the_same_classifier(vit_factory, ending):
    module = Backboned(vit_factory(), forward=lambda self, x: ending(self.backbone(x)))
    assert verify_attribution_model(module, explained(module), images()) is None
    # Not the softmax of another classifier.
    other = Backboned(vit_factory(seed=1), forward=lambda self, x: ending(module.backbone(x)))
    with pytest.raises(ValueError, match=r"their outputs differ by up to"):
        verify_attribution_model(other, explained(other), images())
