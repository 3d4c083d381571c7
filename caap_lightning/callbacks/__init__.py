"""Callbacks that watch, as a model trains, what it looks at: CAAP maps, metrics and a spurious-cue alarm."""

from caap_lightning.callbacks.caap_callback import CAAPCallback, ProbeResult
from caap_lightning.callbacks.spurious_cue_monitor import SpuriousCueMonitor

__all__ = ["CAAPCallback", "ProbeResult", "SpuriousCueMonitor"]
