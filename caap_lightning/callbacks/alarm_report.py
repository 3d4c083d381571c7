"""The pieces of SpuriousCueMonitor's alarm report: the table of named images, and the fixed position's hot regions."""

from __future__ import annotations

from typing import Any, List, Optional

import torch

from caap_lightning.callbacks import figures
from caap_lightning.callbacks.drawing import column_title
from caap_lightning.callbacks.result import ProbeResult
from caap_lightning.callbacks.strategies import StrategyGroup, place_of
from caap_lightning.utils import unnormalize, upsample_maps


def image_rows(result: ProbeResult, rows: List[int], per_image: Optional[torch.Tensor]) -> List[str]:
    """One Markdown table row per named probe image: label (and cue), explained class, its probability, its score."""
    probe, out = result.probe, []
    for i in rows:
        value = "n/a" if per_image is None else f"{float(per_image[i]):.3f}"
        cue = "" if probe.cue_labels is None else f" (cue: {result.class_name(int(probe.cue_labels[i]))})"
        out.append(f"| #{i} | {result.class_name(int(probe.labels[i]))}{cue} | "
                   f"{result.class_name(int(result.targets[i]))} | {float(result.scores[i]):.2f} | {value} |")
    return out


def hot_region_lines(result: ProbeResult, method: str, group: Optional[StrategyGroup], prefix: str,
                     examples: int) -> List[str]:
    """Where the hot region of ``method``'s maps sits, and the strategy of ``group`` (all classes, if discovered)
    that puts most evidence there."""
    found = result.hot_regions(method)
    lines = [
        f"The hot region of all the probe's maps together sits at the {place_of(found.hot_region.float())} "
        f"({float(found.area[0]):.0%} of the image); each image's own hot region is chosen from the other images' maps."
    ]
    if group is not None and group.strategies:
        means = upsample_maps(torch.stack([s.mean_map for s in group.strategies]), tuple(found.hot_region.shape))
        shares = ((means * found.hot_region).sum((1, 2)) / means.sum((1, 2))).tolist()
        j = max(range(len(shares)), key=shares.__getitem__)
        strategy = group.strategies[j]
        members = ", ".join(f"#{i}" for i in strategy.members[:examples].tolist())
        lines.append(
            f"Of the {len(group.strategies)} strategies among all classes (`{prefix}/strategies/all`), "
            f"strategy {j + 1} ({len(strategy.members)} images, e.g. {members}) puts the most evidence there: "
            f"{shares[j]:.0%} of its mean map, at the {strategy.place}."
        )
    return lines


def draw_hot_regions(result: ProbeResult, method: str, rows: List[int]) -> Any:
    """The alarm's images for the fixed position: image | ``method``'s maps | each image's hot region."""
    index = torch.as_tensor(rows, dtype=torch.long)
    overlays = {
        column_title(method): result.pixel_maps(method)[index],
        "hot region": result.hot_regions(method).regions[index].float(),
    }
    return figures.heatmap_grid(unnormalize(result.probe.images[index], result.mean, result.std), overlays,
                                [result.row_title(i) for i in rows])
