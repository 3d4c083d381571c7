"""caap_lightning.metrics"""
