"""Both callbacks on a user's own LightningModule holding a Hugging Face or a torchvision ViT, with plain loaders.

The module's forward returns what the library returns (an object with ``.logits`` for Hugging Face),
the loaders are plain ``DataLoader``s of ``(image, label)`` tuples, and the TensorBoard events are read
back: the maps the callback logged are CAAP's maps of the user's model.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from caap_lightning import CAAP
from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.utils import output_logits

HALF = (0.5, 0.5, 0.5)
SIZE, PATCH, DIM, CLASSES = 32, 8, 32, 3


def hugging_face_vit(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config_class = transformers.DeiTConfig if name.startswith("DeiT") else transformers.ViTConfig
    config = config_class(image_size=SIZE, patch_size=PATCH, hidden_size=DIM, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, num_labels=CLASSES)
    torch.manual_seed(0)
    return getattr(transformers, name)(config)


def torchvision_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=SIZE, patch_size=PATCH, num_layers=2, num_heads=2, hidden_dim=DIM,
                             mlp_dim=64, num_classes=CLASSES)


class UserModule(L.LightningModule):
    """A user's module as the libraries' guides write it: ``self.model``'s own output, logits read in the steps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)  # Hugging Face: an ImageClassifierOutput, not a tensor

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(output_logits(self(x)), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(output_logits(self(x)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


MODELS = {
    "hf-vit": lambda: hugging_face_vit("ViTForImageClassification"),
    "hf-deit": lambda: hugging_face_vit("DeiTForImageClassification"),
    "torchvision-vit": torchvision_vit,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_hugging_face_or_torchvision_vit_in_a_users_module_is_attributed(tmp_path, name):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = MODELS[name]()
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(48, 3, SIZE, SIZE, generator=generator) * 2 - 1
    labels = torch.arange(48) % CLASSES
    train = DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(images[:24], labels[:24]), batch_size=8)
    caap = CAAPCallback(num_images=4, mean=HALF, std=HALF, max_images_logged=2)
    monitor = SpuriousCueMonitor(monitor="caap/insdel")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", callbacks=[caap, monitor], default_root_dir=tmp_path,
                        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run"), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(UserModule(model), train, val)

    assert len(caap.history) == 2
    result = caap.last
    # The maps logged are CAAP's maps of the user's (trained) model, read through its own library's layout.
    expected = CAAP(model, relative=True, mean=HALF, std=HALF).attribute(result.probe.images, target=result.targets)
    torch.testing.assert_close(result.maps, expected, atol=1e-4, rtol=0)
    assert result.maps.abs().max() > 0
    with torch.no_grad():
        own = output_logits(model.eval()(result.probe.images)).softmax(-1)
    torch.testing.assert_close(result.scores, own.gather(1, result.targets[:, None])[:, 0], atol=1e-5, rtol=0)

    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 0}).Reload()
    insdel = [e.value for e in events.Scalars("caap/insdel")]
    assert len(insdel) == 2 and all(math.isfinite(v) for v in insdel)
    assert insdel[-1] == pytest.approx(result.metrics["caap/insdel"], abs=1e-6)
    assert [e.value for e in events.Scalars("spurious/score")] == pytest.approx(insdel, abs=1e-6)
    assert "caap/heatmaps" in events.Tags()["images"]
