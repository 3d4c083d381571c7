"""caap_lightning.datamodules"""
