"""Attribution methods with one call shape: ``Method(model).attribute(images, target=...)``."""

from caap_lightning.attribution.caap import CAAP

__all__ = ["CAAP"]
