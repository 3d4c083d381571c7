"""caap_lightning.models: the LightningModule that fine-tunes (or trains) a timm ViT."""

from caap_lightning.models.vit import ViTClassifier, check_checkpoint_file, load_checkpoint_weights

__all__ = ["ViTClassifier", "check_checkpoint_file", "load_checkpoint_weights"]
