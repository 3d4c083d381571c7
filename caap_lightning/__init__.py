"""caap-lightning: see what a Vision Transformer looks at while it trains."""

__version__ = "0.1.0"
__all__ = ["CAAP"]


def __getattr__(name):
    # Lazy, so that ``import caap_lightning.metrics`` does not pull in timm.
    if name == "CAAP":
        from caap_lightning.attribution.caap import CAAP

        return CAAP
    raise AttributeError(f"module 'caap_lightning' has no attribute {name!r}")
