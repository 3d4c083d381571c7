"""CAAPCallback with several attribution methods side by side: tags, grid, gradients in a fit, errors."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from caap_lightning.attribution.baselines import GradCAM, InputXGradient, TransformerAttribution
from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.model_tests import MODEL_TESTS
from caap_lightning.callbacks import figures
from caap_lightning.metrics import attribution_mass

PRIMARY_SCALARS = ("aupr_fg", "pointing_game", "insdel", "cue_mass_ratio", "background_mass_ratio")


def tile_columns(grid_width: int, tile: int = 128, gap: int = 4) -> int:
    """Columns of a heatmap grid of 32 px images (tiles upscaled 4x to 128 px, 4 px apart)."""
    assert (grid_width + gap) % (tile + gap) == 0, grid_width
    return (grid_width + gap) // (tile + gap)


def primary_metrics(history_row):
    return {k: v for k, v in history_row.items() if k.count("/") == 1 and k != "caap/seconds"}


def test_each_method_logs_its_scalars_and_draws_its_column(
    tmp_path, data_factory, classifier_factory, trainer_factory, events_reader
):
    caap = CAAPCallback(num_images=4, methods=["caap", "gradcam", "rollout"], max_images_logged=2, on_error="raise")
    trainer = trainer_factory(tmp_path, [caap], max_epochs=2, limit_train_batches=1)
    trainer.fit(classifier_factory(), datamodule=data_factory())

    scalars = events_reader(trainer.logger.log_dir)["scalars"]
    val_steps = sorted(scalars["val/acc"])
    for name in PRIMARY_SCALARS:
        for tag in (f"caap/{name}", f"caap/gradcam/{name}", f"caap/rollout/{name}"):
            assert sorted(scalars[tag]) == val_steps, tag
            assert all(math.isfinite(v) for v in scalars[tag].values()), tag
    assert "caap/caap/insdel" not in scalars and "caap/gradcam/seconds" not in scalars
    # Every logged scalar is announced, and every history row holds every method's.
    announced = set(caap.logged_metrics)
    assert {tag for tag in scalars if tag.startswith("caap/")} <= announced
    assert {"caap/insdel", "caap/gradcam/insdel", "caap/rollout/insdel", "caap/seconds"} <= announced
    for row in caap.history:
        assert set(row) - {"epoch", "step", "stage"} <= announced
        assert {f"caap/{m}{name}" for m in ("", "gradcam/", "rollout/") for name in PRIMARY_SCALARS} <= set(row)

    last = caap.last
    assert list(last.method_maps) == ["caap", "gradcam", "rollout"]
    assert last.maps is last.method_maps["caap"]
    assert all(m.shape == (4, 4, 4) and torch.isfinite(m).all() for m in last.method_maps.values())
    assert list(last.method_curves) == ["caap", "gradcam", "rollout"] and last.curves is last.method_curves["caap"]
    # image | CAAP | gradcam | rollout | object mask | cue mask: one overlay column more per further method.
    grid = last.draw_rows([0, 1])
    single = CAAPCallback(num_images=4, log_images=False)
    trainer_factory(tmp_path, [single]).validate(trainer.lightning_module, datamodule=trainer.datamodule, verbose=False)
    alone = single.last.draw_rows([0, 1])
    assert grid.shape[0] == alone.shape[0] and grid.shape[1] - alone.shape[1] == 2 * (128 + 4)
    assert (tile_columns(alone.shape[1]), tile_columns(grid.shape[1])) == (4, 6)


@pytest.mark.parametrize(
    "name, method", [("gradcam", GradCAM), ("tattr", TransformerAttribution), ("input_x_gradient", InputXGradient)]
)
def test_gradient_methods_run_in_a_fit(tmp_path, name, method, data_factory, classifier_factory, trainer_factory):
    # Lightning validates under inference mode: the callback must turn gradients back on.
    caap = CAAPCallback(num_images=4, methods=["caap", name], metrics=["insertion_deletion"], log_images=False, on_error="raise")
    model, data = classifier_factory(), data_factory()
    trainer_factory(tmp_path, [caap], max_epochs=1, limit_train_batches=2).fit(model, datamodule=data)
    maps = caap.last.method_maps[name]
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0
    assert math.isfinite(caap.history[-1][f"caap/{name}/insdel"])
    # The maps are the method's own, called directly on the trained model.
    probe = data.probe_batch(4)
    with torch.no_grad():  # the callback's default target="predicted": the trained model's top-1
        predicted = model.model.eval()(probe.images).argmax(-1)
    assert torch.equal(caap.last.targets, predicted)
    expected = method(model.model).attribute(probe.images, target=predicted)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)


def test_the_primary_is_the_same_with_or_without_other_methods(tmp_path, data_factory, classifier_factory, trainer_factory):
    model, data = classifier_factory(), data_factory()

    def check(methods):
        caap = CAAPCallback(num_images=4, methods=methods, log_images=False)
        trainer_factory(tmp_path, [caap]).validate(model, datamodule=data, verbose=False)
        return caap

    alone, together, swapped = check(["caap"]), check(["caap", "gradcam", "rollout"]), check(["gradcam", "caap"])
    assert primary_metrics(alone.history[-1]) == primary_metrics(together.history[-1])
    assert torch.equal(alone.last.maps, together.last.maps)
    # The first method is the primary whichever it is: gradcam's scalars move to caap/<scalar>. The model tests
    # (swap and insertion ratios) are logged once, under the primary's names, whichever method that is.
    # Ratios, follow shares and the swap probe's skill.
    tests = {f"caap/{scalar}" for test in MODEL_TESTS.values() for scalar in test.scalars} | {"caap/swap_probe_skill"}
    assert tests & set(alone.history[-1]) and not any(k.startswith("caap/gradcam/") and k.replace("gradcam/", "") in tests
                                                        for k in together.history[-1])
    gradcam = {k.replace("gradcam/", ""): v for k, v in together.history[-1].items() if k.startswith("caap/gradcam/")}
    model_tests = {k: v for k, v in alone.history[-1].items() if k in tests}
    assert primary_metrics(swapped.history[-1]) == {**gradcam, **model_tests}
    assert {k.replace("caap/caap/", "caap/"): v for k, v in swapped.history[-1].items() if k.startswith("caap/caap/")} == (
        {k: v for k, v in primary_metrics(alone.history[-1]).items() if k not in tests}
    )
    assert torch.equal(swapped.last.maps, together.last.method_maps["gradcam"])


def broken(self, *args, **kwargs):
    raise RuntimeError("boom")


def test_a_failing_further_method_is_left_out_and_training_goes_on(
    tmp_path, monkeypatch, data_factory, classifier_factory, trainer_factory, events_reader
):
    monkeypatch.setattr(GradCAM, "attribute", broken)
    caap = CAAPCallback(num_images=4, methods=["caap", "gradcam", "rollout"], max_images_logged=2)
    trainer = trainer_factory(tmp_path, [caap], max_epochs=2, limit_train_batches=1)
    message = r"computing the gradcam maps and metric updates failed at epoch \d \(RuntimeError: boom\); its metrics are left out"
    with pytest.warns(UserWarning, match=message):
        trainer.fit(classifier_factory(), datamodule=data_factory())
    assert trainer.current_epoch == 2
    assert [row["epoch"] for row in caap.history] == [0, 1]
    for row in caap.history:
        assert "caap/insdel" in row and "caap/rollout/insdel" in row
        assert not any(k.startswith("caap/gradcam/") for k in row)
    assert list(caap.last.method_maps) == ["caap", "rollout"]
    events = events_reader(trainer.logger.log_dir)
    assert len(events["images"]["caap/heatmaps"]) == 2


def test_a_failing_primary_skips_the_maps_but_not_the_model_tests(
    tmp_path, monkeypatch, data_factory, classifier_factory, trainer_factory
):
    monkeypatch.setattr(GradCAM, "attribute", broken)
    caap = CAAPCallback(num_images=4, methods=["gradcam", "caap"], log_images=False)
    trainer = trainer_factory(tmp_path, [caap], max_epochs=1, limit_train_batches=1)
    with pytest.warns(UserWarning, match=r"computing the gradcam maps .* failed .*; its maps and their metrics are skipped"):
        trainer.fit(classifier_factory(), datamodule=data_factory())
    # The further method is not attributed either; the model tests, which test the model and not a map, are logged.
    tests = {f"caap/{scalar}" for name in caap.active_metrics if name in MODEL_TESTS for scalar in MODEL_TESTS[name].scalars}
    assert [row["epoch"] for row in caap.history] == [0] and caap.last.method_maps == {}
    assert tests and set(caap.last.metrics) <= tests | {"caap/swap_probe_skill", "caap/seconds"}


def test_monitor_can_watch_a_further_method(tmp_path, data_factory, classifier_factory, trainer_factory):
    caap = CAAPCallback(num_images=4, methods=["caap", "gradcam"], metrics=["cue_mass_ratio"], log_images=False)
    monitor = SpuriousCueMonitor(monitor="caap/gradcam/cue_mass_ratio", threshold=None)
    trainer_factory(tmp_path, [caap, monitor], max_epochs=2, limit_train_batches=1).fit(
        classifier_factory(), datamodule=data_factory()
    )
    assert [h["score"] for h in monitor.history] == [row["caap/gradcam/cue_mass_ratio"] for row in caap.history]
    per_image = caap.last.per_image["caap/gradcam/cue_mass_ratio"]
    expected = attribution_mass(caap.last.method_maps["gradcam"], caap.probe.cue_masks, region="mask", normalize_by_area=True)
    torch.testing.assert_close(per_image, expected.float(), equal_nan=True)
    # The per-image values the alarm ranks by average to the scalar the metric logged.
    assert torch.nanmean(per_image).item() == pytest.approx(caap.history[-1]["caap/gradcam/cue_mass_ratio"], rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"methods": ["caap", "gradcm"]}, r"unknown: \['gradcm'\]"),
        ({"methods": ["caap", "gradcam", "caap"]}, r"distinct names from \['caap', 'gradcam', 'rollout'"),
        ({"methods": []}, "one or more"),
        ({"method_kwargs": {"caap": {"layer_cutoff": 1}}}, r"method_kwargs has \['caap'\].*CAAP takes the callback's own"),
        ({"methods": ["caap"], "method_kwargs": {"rollout": {}}}, r"method_kwargs has \['rollout'\]"),
        (
            {"methods": ["caap", "simple_insertion"], "method_kwargs": {"simple_insertion": {"bach_size": 8}}},
            r"\['bach_size'\], which SimpleInsertion does not take; it takes \[.*'batch_size'",
        ),
        ({"window": -1}, "window must be an int >= 0"),
    ],
)
def test_methods_are_validated_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CAAPCallback(**kwargs)


def test_occlusion_without_captum_fails_in_init(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "captum" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"occlusion method needs captum.*pip install 'caap-lightning\[baselines\]'"):
        CAAPCallback(methods=["caap", "occlusion"])
    CAAPCallback(methods=["caap", "gradcam"])  # the others do not need it


def test_method_kwargs_and_the_datas_normalisation_reach_the_method(tmp_path, data_factory, classifier_factory, trainer_factory):
    caap = CAAPCallback(
        num_images=4, methods=["caap", "simple_insertion"], method_kwargs={"simple_insertion": {"batch_size": 7}},
        metrics=["pointing_game"], log_images=False, on_error="raise",
    )
    data = data_factory()
    trainer_factory(tmp_path, [caap]).validate(classifier_factory(), datamodule=data, verbose=False)
    method = caap._methods["simple_insertion"]
    assert method.batch_size == 7 and method.mean == tuple(data.mean) and method.std == tuple(data.std)
    assert math.isfinite(caap.history[-1]["caap/simple_insertion/pointing_game"])


def test_heatmap_grid_draws_one_column_per_map_each_on_its_own_scale():
    images = torch.full((2, 3, 32, 32), 0.5)
    signed = torch.linspace(-1, 1, 32 * 32).view(1, 32, 32).repeat(2, 1, 1)
    positive = 1000.0 * signed.clamp_min(0)  # Grad-CAM-like: non-negative, on another scale
    grid = figures.heatmap_grid(images, {"CAAP (A - A_blank)": signed, "gradcam": positive}, ["a", "b"])
    swapped = figures.heatmap_grid(images, {"gradcam": positive, "CAAP (A - A_blank)": signed}, ["a", "b"])
    assert grid.shape == swapped.shape and tile_columns(grid.shape[1]) == 3
    tile = 128
    # The column titles and colour bars, then the first row's caption (issue 29: a larger font, and a colour bar).
    top = figures.grid_header(tile) + figures.grid_line(tile)

    def column(g, c):
        return g[top : top + tile, c * (tile + 4) : c * (tile + 4) + tile]

    # The mapping's order is the columns' order.
    assert (column(grid, 1) == column(swapped, 2)).all() and (column(grid, 2) == column(swapped, 1)).all()
    caap, gradcam = (column(grid, c).astype(int) for c in (1, 2))
    redness = caap[..., 0] - caap[..., 2]
    assert redness.max() > 50 and redness.min() < -50  # the signed map goes red and blue
    redness = gradcam[..., 0] - gradcam[..., 2]
    assert redness.min() >= 0 and redness.max() > 50  # the non-negative one only red, as deep at its own scale


def test_curves_image_draws_each_curve_in_its_own_colour_where_its_values_are():
    flat = torch.full((5,), 0.75)  # a level line at 0.75
    rising = torch.linspace(0, 1, 5)  # the diagonal
    image = figures.curves_image({"flat": flat, "rising": rising}, "epoch 0")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    left, top, side = 44, 22, 180  # the axes box of curves_image
    first, second = (np.array(c) for c in figures.CURVE_COLOURS[:2])

    def colour_at(x: float, y: float) -> np.ndarray:
        return image[round(top + (1 - y) * side), round(left + x * side)].astype(int)

    for x in (0.2, 0.5, 0.8):
        assert np.abs(colour_at(x, 0.75) - first).max() < 40
        assert np.abs(colour_at(x, x) - second).max() < 40
    assert (colour_at(0.5, 0.25) == 255).all()  # off both curves: the white background
    # Each name in the legend, beside a sample of its colour.
    legend = image[top : top + 40, left + side + 10 :]
    for colour in (first, second):
        assert (np.abs(legend.reshape(-1, 3).astype(int) - colour).max(1) < 10).any()


def test_heatmap_grid_draws_every_row_of_a_column_on_one_scale_with_a_colour_bar():
    """Two maps a hundred times apart in one column: the weak one's tile is nearly blank, the strong one saturated."""
    images = torch.full((2, 3, 32, 32), 0.5)
    strong = torch.full((32, 32), 0.6)
    maps = torch.stack([strong / 100, strong])  # 0.006 and 0.6
    grid = figures.heatmap_grid(images, {"CAAP": maps}, ["weak", "strong"])
    tile = 128
    header, line = figures.grid_header(tile), figures.grid_line(tile)

    def overlay(row):
        top = header + row * (line + tile + figures.GRID_GAP) + line
        return grid[top : top + tile, tile + figures.GRID_GAP : 2 * tile + figures.GRID_GAP].astype(int)

    weak, saturated = overlay(0), overlay(1)
    # Blank: the overlay of a zero map (grey image under the colour map's white middle); saturated: its deep red end.
    from matplotlib import colormaps

    def drawn(value):
        return np.round((0.35 * 0.5 + 0.65 * np.array(colormaps["RdBu_r"](value)[:3])) * 255)

    assert np.abs(weak - drawn(0.5)).max() <= 3
    assert np.abs(saturated - drawn(1.0)).max() <= 1
    assert (saturated[..., 0] - saturated[..., 2]).min() > 40 and np.abs(weak[..., 0] - weak[..., 2]).max() < 10
    # The colour bar under the title runs from the colour map's blue end to its red end.
    bar = grid[header - figures.COLOUR_BAR - line + 2, tile + figures.GRID_GAP : 2 * tile + figures.GRID_GAP]
    assert bar[0, 2] > bar[0, 0] + 50 and bar[-1, 0] > bar[-1, 2] + 50


def test_heatmap_grid_outlines_the_cue_masks_over_the_overlays():
    images = torch.full((1, 3, 32, 32), 0.5)
    cue = torch.zeros(1, 32, 32, dtype=torch.bool)
    cue[0, 4:12, 4:12] = True
    grid = figures.heatmap_grid(images, {"CAAP": torch.ones(1, 32, 32)}, ["a"], cue_masks=cue)
    top = figures.grid_header(128) + figures.grid_line(128)
    green = np.round(np.array(figures.OUTLINE_COLOUR) * 255)
    for left in (0, 128 + figures.GRID_GAP):  # the image and the overlay
        tile = grid[top : top + 128, left : left + 128].astype(int)
        assert (tile[16, 16:48] == green).all()  # the outline's top edge, 4x upscaled
        assert not (tile[20, 20] == green).all() and not (tile[100, 100] == green).all()  # inside, outside: none


def test_heatmap_grid_wraps_a_long_row_caption_onto_a_second_line_for_every_row():
    images, maps = torch.full((2, 3, 32, 32), 0.5), {"CAAP": torch.ones(2, 32, 32)}
    short = figures.heatmap_grid(images, maps, ["a", "b"])
    long = figures.heatmap_grid(images, maps, ["#3 bag -> bag p=0.98, cue: shirt · strategy 1/2 (40 images)", "b"])
    line = figures.grid_line(128)
    assert long.shape[0] == short.shape[0] + 2 * line  # one more caption line on each of the two rows
    # The rows' tiles are drawn alike, each lower by the longer captions above it (below the top few pixel rows,
    # which a caption's descenders may reach).
    top = figures.grid_header(128) + 2 * line + 8
    assert (long[top : top + 120] == short[top - line : top - line + 120]).all()
    second = figures.grid_header(128) + 2 * (2 * line) + 128 + figures.GRID_GAP
    assert (long[second : second + 128] == short[second - 2 * line : second - 2 * line + 128]).all()
    # The second caption line holds text (dark pixels) on the long grid only.
    caption = long[figures.grid_header(128) + line : figures.grid_header(128) + 2 * line]
    assert (caption < 100).any()


def test_colour_bar_ends_fall_back_to_one_centred_label_where_both_do_not_fit():
    from PIL import ImageFont

    drawn = []

    class Recorder:
        def text(self, xy, text, **kwargs):
            drawn.append((xy, text, kwargs.get("anchor")))

    font = ImageFont.load_default(size=20)
    figures.draw_bar_ends(Recorder(), font, 10, 0, 300, 0.063)
    assert drawn == [((10, 0), "-0.063", None), ((310, 0), "+0.063", "ra")]
    drawn.clear()
    figures.draw_bar_ends(Recorder(), font, 10, 0, 60, 0.063)
    assert drawn == [((40, 0), "±0.063", "ma")]
