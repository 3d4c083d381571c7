"""caap_lightning.models"""
