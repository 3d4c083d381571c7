"""compute() is one 0-dim tensor, so Lightning's self.log and MetricCollection take the metrics."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection

from caap_lightning.metrics import (
    AUPR,
    AttributionMass,
    InsertionDeletion,
    PointingGame,
    attribution_mass,
    aupr,
    insertion_deletion,
    pointing_game,
)


def tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


def probe_data(n: int = 4):
    generator = torch.Generator().manual_seed(1)
    masks = torch.zeros(n, 8, 8, dtype=torch.bool)
    masks[:, 2:6, 1:5] = True
    masks[1] = False  # skipped by AUPR and the pointing game: the means are over 3 images
    return (
        torch.randn(n, 3, 8, 8, generator=generator),
        torch.randn(n, 4, 4, generator=generator),
        masks,
        torch.arange(n) % 3,
    )


def expected_values(model, images, maps, masks, target):
    return {
        "aupr": torch.nanmean(aupr(maps, masks).aupr),
        "pointing_game": torch.nanmean(pointing_game(maps, masks)),
        "attribution_mass": torch.nanmean(attribution_mass(maps, masks)),
        "insdel": (lambda r: (r.insertion - r.deletion).mean())(
            insertion_deletion(model, images, maps, target=target, step=16)
        ),
    }


def make_metrics(model):
    return {
        "aupr": AUPR(),
        "pointing_game": PointingGame(),
        "attribution_mass": AttributionMass(),
        "insdel": InsertionDeletion(model, step=16),
    }


def update(name, metric, images, maps, masks, target):
    if name == "insdel":
        metric.update(images, maps, target)
    else:
        metric.update(maps, masks)


def test_compute_is_a_scalar_equal_to_the_main_detail():
    model = tiny_classifier()
    data = probe_data()
    expected = expected_values(model, *data)
    for name, metric in make_metrics(model).items():
        update(name, metric, *data)
        value, details = metric.compute(), metric.compute_details()
        assert isinstance(value, torch.Tensor) and value.dim() == 0, name
        assert metric.main_key == name
        torch.testing.assert_close(value, details[name])
        torch.testing.assert_close(value.double(), expected[name].double(), msg=name)
        assert int(details["count"]) == (4 if name == "insdel" else 3)


def test_compute_details_leaves_states_accumulating():
    # The details are copies: a later update must not change what was returned.
    data = probe_data()
    metric = PointingGame()
    metric.update(*data[1:3])
    details = metric.compute_details()
    count = int(details["count"])
    metric.update(*data[1:3])
    assert int(details["count"]) == count and int(metric.compute_details()["count"]) == 2 * count


def test_metric_collection_computes_scalars():
    _, maps, masks, _ = probe_data()
    collection = MetricCollection(
        {"aupr_fg": AUPR(), "aupr_bg": AUPR(region="background"), "pg": PointingGame(), "mass": AttributionMass()},
        prefix="val/",
    )
    collection.update(maps[:2], masks[:2])
    collection.update(maps[2:], masks[2:])
    out = collection.compute()
    assert set(out) == {"val/aupr_fg", "val/aupr_bg", "val/pg", "val/mass"}
    assert all(value.dim() == 0 for value in out.values())
    torch.testing.assert_close(out["val/pg"], torch.nanmean(pointing_game(maps, masks)))
    torch.testing.assert_close(out["val/aupr_bg"], torch.nanmean(aupr(maps, masks, region="background").aupr))


class ProbeModule(pl.LightningModule):
    """Logs each metric object from validation_step, as a Lightning user would."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        metrics = make_metrics(model)
        self.aupr, self.pointing_game = metrics["aupr"], metrics["pointing_game"]
        self.attribution_mass, self.insdel = metrics["attribution_mass"], metrics["insdel"]
        self.collection = MetricCollection({"pg": PointingGame(), "mass": AttributionMass()}, prefix="col/")

    def validation_step(self, batch, batch_idx):
        images, maps, masks, target = batch
        for name in ("aupr", "pointing_game", "attribution_mass", "insdel"):
            metric = getattr(self, name)
            update(name, metric, images, maps, masks, target)
            self.log(f"val/{name}", metric)
        self.collection.update(maps, masks)
        self.log_dict(self.collection)


def test_lightning_logs_the_metric_objects(tmp_path):
    model = tiny_classifier()
    data = probe_data()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    # Two validation batches: the logged values are the epoch's, not the last batch's.
    (logged,) = trainer.validate(ProbeModule(model), DataLoader(TensorDataset(*data), batch_size=2), verbose=False)
    expected = expected_values(model, *data)
    for name, value in expected.items():
        assert logged[f"val/{name}"] == pytest.approx(float(value), abs=1e-6), name
    assert logged["col/pg"] == pytest.approx(float(expected["pointing_game"]), abs=1e-6)
    assert logged["col/mass"] == pytest.approx(float(expected["attribution_mass"]), abs=1e-6)


def test_metric_collection_keeps_configurations_apart():
    # After a first batch of maps with no positive part, mass inside and outside are both
    # 0 on the same count: equal states, which MetricCollection would merge into one
    # compute group and then report the inside mass as the outside one.
    _, maps, masks, _ = probe_data()
    negative = -maps.abs() - 0.1
    collection = MetricCollection({
        "inside": AttributionMass(), "outside": AttributionMass(region="outside"),
        "outside_ratio": AttributionMass(region="outside", normalize_by_area=True),
    })
    collection.update(negative, masks)
    collection.update(maps, masks)
    out = collection.compute()
    both = (torch.cat([negative, maps]), torch.cat([masks, masks]))
    for name, region, by_area in (("inside", "mask", False), ("outside", "outside", False),
                                  ("outside_ratio", "outside", True)):
        expected = torch.nanmean(attribution_mass(*both, region=region, normalize_by_area=by_area))
        torch.testing.assert_close(out[name], expected, msg=name)
