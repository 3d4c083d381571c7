"""Every datamodule argument is typed simply enough for LightningCLI/jsonargparse YAML."""

import json

import pytest
from jsonargparse import ArgumentParser

from caap_lightning.datamodules import CocoMaskDataModule, Food101DataModule, OxfordPetDataModule, SyntheticSpuriousDataModule

CASES = [
    (SyntheticSpuriousDataModule, dict(cue_correlation=None, shape_contrast=0.2, object_size=[0.5, 0.7], mean=[0.5, 0.5, 0.5])),
    (OxfordPetDataModule, dict(root="/data", label_type="species", img_size=96, std=[0.5, 0.5, 0.5])),
    (Food101DataModule, dict(root="/data", download=False, batch_size=8)),
    (CocoMaskDataModule, dict(train_images="a", train_annotations="a.json", val_images="b", val_annotations="b.json", categories=["dog", "cat"])),
]


@pytest.mark.parametrize("cls, args", CASES, ids=[c.__name__ for c, _ in CASES])
def test_yaml_configures_datamodule(cls, args):
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "data")
    data = parser.instantiate_classes(parser.parse_string(json.dumps({"data": args}))).data  # JSON is YAML
    assert isinstance(data, cls)
    for key, value in args.items():
        actual = getattr(data, key)
        assert (list(actual) if isinstance(actual, tuple) else actual) == value, key
