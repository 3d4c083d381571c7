"""Heatmap grids and curve figures for the callbacks, and the loggers they go to.

Images, figures and texts go to every logger of the trainer that can show them (TensorBoard,
Lightning's and the classic ``pytorch_lightning`` one, W&B, MLflow, Comet); when none can (a
``CSVLogger``, no logger), they are saved as PNG and Markdown files under
:func:`image_dir`. Only rank zero writes.
"""

from __future__ import annotations

import itertools
import re
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, Literal, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from lightning.pytorch import Trainer


# The grid's font size as a share of a tile's width: TensorBoard shrinks an image to its card's width, and at this
# share the text of a grid of five columns still reads at about 10 pixels on a default card.
FONT_SHARE = 0.18
MIN_FONT_SIZE = 12
GRID_GAP = 4  # between tiles
COLOUR_BAR = 10  # the colour bar's height under an overlay column's title
# The cue mask's outline over the image and the overlays: green, which the red-blue overlay does not use.
OUTLINE_COLOUR = (0.0, 0.85, 0.0)
OUTLINE_WIDTH = 2  # pixels of the drawn tile
TITLE_LINES = 2  # a column title's lines at most, so that grids of the same rows have the same height
ROW_LINES = 2  # a row caption's lines at most: an image's title after a strategy's, say, on a narrow grid


def grid_font_size(tile_width: int) -> int:
    """The grid's font size for tiles ``tile_width`` pixels wide (:data:`FONT_SHARE`)."""
    return max(MIN_FONT_SIZE, round(FONT_SHARE * tile_width))


def grid_line(tile_width: int) -> int:
    """A line of the grid's text, with its spacing: a row's caption."""
    return grid_font_size(tile_width) + 4


def grid_header(tile_width: int) -> int:
    """Above the first row: the column titles, and under an overlay's title its colour bar and the bar's labels."""
    return TITLE_LINES * grid_line(tile_width) + COLOUR_BAR + grid_line(tile_width)


def wrap(text: str, font: Any, width: int, most: int = TITLE_LINES) -> list:
    """``text`` in at most ``most`` lines of ``width`` pixels, broken at spaces (a longer word keeps its line), the
    last cut short with an ellipsis where the text runs on."""
    lines: list = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > most:
        lines = lines[: most - 1] + [" ".join(lines[most - 1 :])]
    while lines and len(lines[-1]) > 1 and font.getlength(lines[-1]) > width:
        lines[-1] = lines[-1][:-2] + "…"
    return lines or [""]


def outlines(masks: torch.Tensor, scale: int) -> np.ndarray:
    """``(n, H*scale, W*scale)`` bool: the inner edge, :data:`OUTLINE_WIDTH` pixels wide, of each upscaled mask."""
    from caap_lightning.model_tests.views import dilate

    big = masks.bool().cpu().repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return (big & dilate(~big, OUTLINE_WIDTH)).numpy()


def heatmap_grid(
    images: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    titles: Sequence[str],
    masks: Optional[torch.Tensor] = None,
    cue_masks: Optional[torch.Tensor] = None,
    min_tile: int = 112,
    views: Optional[Mapping[str, torch.Tensor]] = None,
) -> np.ndarray:
    """One row per image: image | one overlay per map | object mask | cue mask | views, as ``(H, W, 3)`` uint8.

    ``images`` are pixel-space ``(n, 3, H, W)`` in [0, 1]; ``maps`` gives the overlay columns
    in order, as ``{column title: pixel maps (n, H, W)}``; ``views`` further image columns
    (pixel-space ``(n, 3, H, W)``), e.g. what a model test showed the model.
    Maps are drawn red where they favour the target and blue where they oppose it (a
    non-negative map, e.g. Grad-CAM's, only goes red), every row of a column on one scale, that
    column's largest magnitude, which the colour bar under its title shows: a map a hundred times
    weaker than another looks a hundred times paler. Mask columns dim the image outside the mask;
    a column whose masks are ``None`` is left out; the cue masks are also outlined in green on the
    image and the overlays, where the overlay would hide a red or blue cue. Each row is captioned
    with its title, in a font sized to the tiles (:func:`grid_font_size`) so that it reads on a
    TensorBoard card, on up to :data:`ROW_LINES` lines where one does not hold it.
    Drawn with numpy and PIL: a matplotlib grid costs seconds per check on a CPU.
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    overlays = list(maps.items())
    if not overlays:
        raise ValueError("heatmap_grid needs at least one map column")
    mask_columns = [(name, m) for name, m in (("object mask", masks), ("cue mask", cue_masks)) if m is not None]
    view_columns = list((views or {}).items())
    columns = ["image"] + [name for name, _ in overlays] + [name for name, _ in mask_columns] + [name for name, _ in view_columns]
    n, _, h, w = images.shape
    scale = max(1, -(-min_tile // min(h, w)))  # nearest-neighbour upscaling of small images
    th, tw, gap, line = h * scale, w * scale, GRID_GAP, grid_line(w * scale)
    font = ImageFont.load_default(size=grid_font_size(tw))
    header = grid_header(tw)
    width = len(columns) * tw + (len(columns) - 1) * gap
    captions = [wrap(title, font, width - 4, most=ROW_LINES) for title in titles]
    caption = line * max((len(lines) for lines in captions), default=1)  # every row alike: the tiles line up
    canvas = np.full((header + n * (caption + th + gap), width, 3), 255, dtype=np.uint8)
    pixels = images.permute(0, 2, 3, 1).float().cpu().numpy()
    heats = [m.float().cpu().numpy() for _, m in overlays]
    limits = [float(np.abs(heat).max()) or 1.0 for heat in heats]  # per column: its one scale
    shades = [0.2 + 0.8 * m.float().cpu().numpy()[..., None] for _, m in mask_columns]
    shown = [v.permute(0, 2, 3, 1).float().clamp(0, 1).cpu().numpy() for _, v in view_columns]
    edges = None if cue_masks is None else outlines(cue_masks, scale)
    cmap = colormaps["RdBu_r"]
    for i in range(n):
        tiles = [pixels[i]]
        for heat, limit in zip(heats, limits):
            tiles.append(0.35 * pixels[i] + 0.65 * cmap(0.5 + 0.5 * np.clip(heat[i] / limit, -1, 1))[..., :3])
        tiles += [pixels[i] * shade[i] for shade in shades]
        tiles += [view[i] for view in shown]
        top = header + i * (caption + th + gap) + caption
        for col, tile in enumerate(tiles):
            big = np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)
            if edges is not None and col <= len(overlays):  # the image and the overlays
                big = np.where(edges[i][..., None], OUTLINE_COLOUR, big)
            left = col * (tw + gap)
            canvas[top : top + th, left : left + tw] = np.clip(big * 255 + 0.5, 0, 255).astype(np.uint8)
    bar = (cmap(np.linspace(0, 1, tw))[None, :, :3] * 255 + 0.5).astype(np.uint8)
    bar_top = header - COLOUR_BAR - line
    for col in range(1, len(overlays) + 1):
        canvas[bar_top : bar_top + COLOUR_BAR, col * (tw + gap) : col * (tw + gap) + tw] = bar
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for col, name in enumerate(columns):
        for row, text in enumerate(wrap(name, font, tw)):
            draw.text((col * (tw + gap) + 2, 1 + row * line), text, fill=(0, 0, 0), font=font)
    for col, limit in enumerate(limits, start=1):
        draw_bar_ends(draw, font, col * (tw + gap), bar_top + COLOUR_BAR + 1, tw, limit)
    for i, lines in enumerate(captions):
        for row, text in enumerate(lines):
            draw.text((2, header + i * (caption + th + gap) + 1 + row * line), text, fill=(0, 0, 0), font=font)
    return np.asarray(image)


def draw_bar_ends(draw: Any, font: Any, left: int, top: int, width: int, limit: float) -> None:
    """Under a colour bar ``width`` pixels wide: ``-limit`` at its blue end and ``+limit`` at its red end (the white
    middle is 0), or one centred ``±limit`` where the two would run into each other."""
    low, high = f"-{limit:.2g}", f"+{limit:.2g}"
    if font.getlength(low) + font.getlength(high) + font.getlength(" ") <= width:
        draw.text((left, top), low, fill=(0, 0, 0), font=font)
        draw.text((left + width, top), high, fill=(0, 0, 0), font=font, anchor="ra")
    else:
        draw.text((left + width // 2, top), f"±{limit:.2g}", fill=(0, 0, 0), font=font, anchor="ma")


# matplotlib's "tab10", the colours its line plots cycle through.
CURVE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                 (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def curves_image(curves: Dict[str, torch.Tensor], title: str) -> np.ndarray:
    """Mean insertion/deletion curves (target probability against the share of pixels changed), ``(H, W, 3)`` uint8.

    A line plot on [0, 1] x [0, 1] with its legend to the right, drawn with PIL as :func:`heatmap_grid` is:
    matplotlib's rendering of the same plot took a large share of a check on a CPU
    (``benchmarks/results/callback-overhead.md``).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    legend = 30 + max((font.getlength(name) for name in curves), default=0)
    left, top, side = 44, 22, 180  # the axes box: a square of `side` pixels
    right, bottom = left + side, top + side
    width, height = int(right + 12 + legend), bottom + 34
    image = Image.new("RGB", (max(width, int(font.getlength(title)) + 8), height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((image.width / 2, 4), title, fill="black", font=font, anchor="ma")

    def point(x: float, y: float) -> tuple:
        return left + x * side, bottom - y * side

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = point(tick, tick)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((x, bottom + 6), f"{tick:g}", fill="black", font=font, anchor="ma")
        draw.text((left - 6, y), f"{tick:g}", fill="black", font=font, anchor="rm")
    draw.text(((left + right) / 2, height - 4), "share of pixels inserted / deleted", fill="black", font=font, anchor="md")
    label = Image.new("RGB", (side, 14), "white")
    ImageDraw.Draw(label).text((side / 2, 7), "target probability", fill="black", font=font, anchor="mm")
    image.paste(label.rotate(90, expand=True), (2, top))
    for row, (name, curve) in enumerate(curves.items()):
        colour = CURVE_COLOURS[row % len(CURVE_COLOURS)]
        values = curve.float().cpu().clamp(0, 1).tolist()
        steps = max(len(values) - 1, 1)
        draw.line([point(i / steps, v) for i, v in enumerate(values)], fill=colour, width=2, joint="curve")
        y = top + 8 + 16 * row  # its legend entry, right of the axes
        draw.line([(right + 10, y), (right + 28, y)], fill=colour, width=2)
        draw.text((right + 32, y), name, fill="black", font=font, anchor="lm")
    draw.rectangle([left, top, right, bottom], outline="black")
    return np.asarray(image)


Destination = Literal["tensorboard", "wandb", "mlflow", "comet"]

DISPLAY_NAMES: Dict[str, str] = {"tensorboard": "TensorBoard", "wandb": "W&B", "mlflow": "MLflow", "comet": "Comet"}
IMAGE_DIR = "caap_images"  # beside the run's logs when no logger shows images; the MLflow artifact folder too

# By class name, so that both `lightning.pytorch.loggers` and `pytorch_lightning.loggers` (and
# subclasses) match without importing either package's optional loggers.
_LOGGER_CLASSES: Dict[str, Optional[str]] = {
    "TensorBoardLogger": "tensorboard",
    "WandbLogger": "wandb",
    "MLFlowLogger": "mlflow",
    "CometLogger": "comet",
    "CSVLogger": None,
    "LitLogger": None,  # known, so its cloud experiment is not started just to ask
}


def destination(logger: Any) -> Optional[Destination]:
    """Where ``logger`` shows images: its kind, or ``None`` for a logger that cannot (``CSVLogger``)."""
    for cls in type(logger).__mro__:
        if cls.__name__ in _LOGGER_CLASSES:
            return _LOGGER_CLASSES[cls.__name__]  # type: ignore[return-value]
    experiment = getattr(logger, "experiment", None)
    # Any logger whose experiment is a SummaryWriter; off rank zero the experiment is a no-op stand-in.
    if type(experiment).__name__ != "DummyExperiment" and callable(getattr(experiment, "add_image", None)):
        return "tensorboard"
    return None


def image_capable(trainer: Trainer) -> bool:
    """Whether some logger of the trainer shows images (else they are saved under :func:`image_dir`)."""
    return any(destination(logger) is not None for logger in trainer.loggers)


def image_dir(trainer: Trainer) -> Path:
    """``caap_images/`` in the run's log directory: the first logger's ``log_dir`` (or ``save_dir``), as
    ``trainer.log_dir`` finds it, without its broadcast (rank zero asks alone). Without one, a folder of this
    trainer's own under ``default_root_dir/caap_images/`` (:func:`run_folder`)."""
    for logger in trainer.loggers:
        where = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if where:
            return Path(where) / IMAGE_DIR
    return run_folder(trainer)


# Each trainer's folder without a logger, by id: a weak reference to the trainer (or the object itself, for one
# that takes none), so that a new trainer at a freed id is told apart.
_RUN_FOLDERS: Dict[int, Tuple[Callable[[], Any], Path]] = {}


def run_folder(trainer: Trainer) -> Path:
    """``default_root_dir/caap_images/version_<k>``, ``k`` the first number free when the trainer first asks: as a
    logger's versions, so that a later run in the same directory does not overwrite an earlier one's files."""
    held = _RUN_FOLDERS.get(id(trainer))
    if held is not None and held[0]() is trainer:
        return held[1]
    root = Path(trainer.default_root_dir) / IMAGE_DIR
    k = next(k for k in itertools.count() if not (root / f"version_{k}").exists())
    try:
        ref: Callable[[], Any] = weakref.ref(trainer)
    except TypeError:  # a stand-in without weak references
        ref = lambda: trainer  # noqa: E731
    _RUN_FOLDERS[id(trainer)] = (ref, root / f"version_{k}")
    return root / f"version_{k}"


def describe_destinations(trainer: Trainer) -> str:
    """Where images and texts go, for messages: ``"TensorBoard"``, ``"TensorBoard and W&B"``, or
    ``"PNG files under <dir>"`` when no logger shows images."""
    names = list(dict.fromkeys(DISPLAY_NAMES[d] for d in map(destination, trainer.loggers) if d is not None))
    if not names:
        return f"PNG files under {image_dir(trainer)}"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def file_stem(tag: str, step: int) -> str:
    """``caap/heatmaps`` at step 12 -> ``caap_heatmaps_step12``: a file name per tag and step."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', tag)}_step{step}"


def _image_to_tensorboard(logger: Any, tag: str, image: np.ndarray, step: int) -> None:
    logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")


def _image_to_wandb(logger: Any, tag: str, image: np.ndarray, step: int) -> None:
    logger.log_image(key=tag, images=[image], step=step)


def _image_to_mlflow(logger: Any, tag: str, image: np.ndarray, step: int) -> None:
    logger.experiment.log_image(logger.run_id, image, artifact_file=f"{IMAGE_DIR}/{file_stem(tag, step)}.png")


def _image_to_comet(logger: Any, tag: str, image: np.ndarray, step: int) -> None:
    logger.experiment.log_image(image, name=tag, step=step)


def _text_to_tensorboard(logger: Any, tag: str, text: str, step: int) -> None:
    logger.experiment.add_text(tag, text, global_step=step)


def _text_to_wandb(logger: Any, tag: str, text: str, step: int) -> None:
    logger.log_text(key=tag, columns=["text"], data=[[text]], step=step)


def _text_to_mlflow(logger: Any, tag: str, text: str, step: int) -> None:
    logger.experiment.log_text(logger.run_id, text, f"{IMAGE_DIR}/{file_stem(tag, step)}.md")


def _text_to_comet(logger: Any, tag: str, text: str, step: int) -> None:
    logger.experiment.log_text(text, step=step, metadata={"tag": tag})


_Writer = Callable[[Any, str, Any, int], None]
_IMAGE_WRITERS: Dict[str, _Writer] = {
    "tensorboard": _image_to_tensorboard, "wandb": _image_to_wandb, "mlflow": _image_to_mlflow,
    "comet": _image_to_comet,
}
_TEXT_WRITERS: Dict[str, _Writer] = {
    "tensorboard": _text_to_tensorboard, "wandb": _text_to_wandb, "mlflow": _text_to_mlflow,
    "comet": _text_to_comet,
}


def _send(trainer: Trainer, writers: Dict[str, _Writer], tag: str, value: Any, step: int) -> bool:
    """``value`` to every logger that shows it; ``False`` if none does."""
    sent = False
    for logger in trainer.loggers:
        kind = destination(logger)
        if kind is not None:
            writers[kind](logger, tag, value, step)
            sent = True
    return sent


def log_image(trainer: Trainer, tag: str, image: np.ndarray, step: int) -> None:
    """An ``(H, W, 3)`` uint8 image to every logger that shows images, else a PNG under :func:`image_dir`."""
    if not trainer.is_global_zero or _send(trainer, _IMAGE_WRITERS, tag, image, step):
        return
    from PIL import Image

    folder = image_dir(trainer)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(folder / f"{file_stem(tag, step)}.png")


def log_text(trainer: Trainer, tag: str, text: str, step: int) -> None:
    """Markdown text to every logger that shows images, else a ``.md`` file beside the PNGs."""
    if not trainer.is_global_zero or _send(trainer, _TEXT_WRITERS, tag, text, step):
        return
    folder = image_dir(trainer)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{file_stem(tag, step)}.md").write_text(text, encoding="utf-8")


def log_scalar_layout(trainer: Trainer, layout: Dict[str, Dict[str, list]]) -> None:
    """A layout of TensorBoard's Custom Scalars tab (``{category: {chart title: ["Multiline" or "Margin", tags]}}``,
    shown in this order) to every TensorBoard logger, from rank zero; other loggers have no such tab."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        add = getattr(logger.experiment, "add_custom_scalars", None) if destination(logger) == "tensorboard" else None
        if callable(add):
            add(layout)


def log_scalars(trainer: Trainer, scalars: Dict[str, float], step: int) -> None:
    """Scalars outside a LightningModule's ``log`` (hooks where it is not allowed), every logger."""
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=step)
