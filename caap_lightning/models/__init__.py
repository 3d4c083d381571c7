"""caap_lightning.models: the LightningModule that fine-tunes (or trains) a timm ViT."""

from caap_lightning.models.vit import ViTClassifier, load_checkpoint_weights

__all__ = ["ViTClassifier", "load_checkpoint_weights"]
