"""caap_lightning.callbacks"""
