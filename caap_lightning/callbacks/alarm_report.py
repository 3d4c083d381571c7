"""SpuriousCueMonitor's alarm report: the console line, the TensorBoard text, the named images and their pictures.

The console gets one line (the region, how many probe images follow it, one next step); the
text entry ``<prefix>/alarm`` holds the details: the rule that fired, what the score measures,
each swap test's share, and the probe images that rely most on the region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from caap_lightning.callbacks import figures
from caap_lightning.callbacks.drawing import column_title
from caap_lightning.callbacks.meters import SKILL
from caap_lightning.callbacks.metric_table import LoggedScalar
from caap_lightning.callbacks.result import ProbeResult
from caap_lightning.callbacks.strategies import ALL, StrategyGroup, place_of
from caap_lightning.model_tests.table import REST_WORDS
from caap_lightning.utils import unnormalize, upsample_maps

if TYPE_CHECKING:
    from caap_lightning.callbacks.spurious_cue_monitor import SpuriousCueMonitor

# The console alarm's most characters: one line a person reads whole; the details go to the text entry.
CONSOLE_CHARACTERS = 300
# One next step per region, for the console line.
NEXT_STEPS = {
    "cue": "break the cue's tie to the class in the training data",
    "background": "train on varied backgrounds (e.g. swap or randomise them)",
    "border": "crop or randomise the image borders in training",
    "surround": "train on varied backgrounds and framings (e.g. swap backgrounds, random crops)",
    "fixed position": "vary where things sit in training (shifts, crops)",
}
FALLBACK_STEP = "look at which part the heatmaps of the named images favour"


@dataclass(frozen=True)
class FollowCount:
    """How many scored probe pairs follow the swapped region (``follows``) of how many (``pairs``)."""

    follows: int
    pairs: int

    def sentence(self, part: str) -> str:
        """``"41 of 64 probe images follow the cue, not the rest of the image"``."""
        return f"{self.follows} of {self.pairs} probe images follow the {part}, not {REST_WORDS.get(part, 'the rest')}"


def follow_count(result: ProbeResult, logged: Dict[str, LoggedScalar], named: LoggedScalar) -> Optional[FollowCount]:
    """The follow count of ``named``'s swap test at this check (``None``: not a swap test, not published, or no pair
    scored)."""
    for tag, entry in logged.items():
        if entry.model_test == named.model_test and entry.method == named.method and tag.endswith("_follow_share"):
            values = result.model_test_image_values.get(tag)
            if values is not None:
                scored = ~values.isnan()
                return FollowCount(int(values[scored].sum()), int(scored.sum())) if bool(scored.any()) else None
    return None


def carrying_entry(result: ProbeResult, logged: Dict[str, LoggedScalar], watched: LoggedScalar,
                   past: Any) -> LoggedScalar:
    """The scalar whose region carries the shortcut: the cue's swap scalar of the watched kind (ratio or follow
    share) where the watched one is another swap test's and the cue's is past the threshold too (the cue alone
    explains it: a cue in the background moves the background's as well), else the watched one.
    ``past(value)``: whether a value is past the threshold."""
    test = watched.model_test
    if test is None or test.kind != "swap" or test.part == "cue":
        return watched
    for tag, entry in logged.items():
        cue = entry.model_test
        if cue is not None and cue.kind == "swap" and cue.part == "cue" and entry.detail == watched.detail:
            value = result.metrics.get(tag)
            if value is not None and math.isfinite(value) and past(value):
                return entry
    return watched


def console_line(head: str, finding: str, part: str, details: str) -> str:
    """One line of at most :data:`CONSOLE_CHARACTERS`: ``head``, the ``finding``, one next step for ``part`` and,
    where it fits, where the ``details`` are."""
    line = f"{head}; {finding}. Next: {NEXT_STEPS.get(part, FALLBACK_STEP)}."
    with_details = f"{line} Details: {details}."
    if details and len(with_details) <= CONSOLE_CHARACTERS:
        return with_details
    return line if len(line) <= CONSOLE_CHARACTERS else line[: CONSOLE_CHARACTERS - 1] + "…"


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


def report_alarm(monitor: "SpuriousCueMonitor", trainer: L.Trainer, result: ProbeResult, score: float) -> None:
    """The alarm's console line (every rank warns as Lightning's ``rank_zero_warn`` does), and on rank zero the text
    entry ``<prefix>/alarm`` with its images ``<prefix>/alarm_images``."""
    watched, source = monitor.watched, monitor.source
    named = watched
    if watched is not None and source is not None:
        named = carrying_entry(result, source.logged, watched, monitor.past)
    part = monitor.part if named is None else (named.part or monitor.part)
    count = None if named is None or source is None else follow_count(result, source.logged, named)
    past = "" if monitor.threshold is None else f" > {monitor.threshold}"
    head = (f"SpuriousCueMonitor: alarm at epoch {result.epoch} (step {result.step}): "
            f"{monitor.monitor_key} = {score:.3f}{past}")
    finding = count.sentence(part) if count is not None else f"the model relies on the {part}"
    if named is not watched:
        finding += f" ({named.tag} = {result.metrics[named.tag]:.3f} too)"
    where = figures.describe_destinations(trainer)
    rank_zero_warn(console_line(head, finding, part, f"'{monitor.prefix}/alarm' in {where}" if where else ""))
    if trainer.is_global_zero and monitor.num_images > 0:
        log_details(monitor, trainer, result, score, part, f"{head}; {finding}.")


def log_details(monitor: "SpuriousCueMonitor", trainer: L.Trainer, result: ProbeResult, score: float, part: str,
                headline: str) -> None:
    """The text entry: the headline, the rule that fired, what the score means, each swap test's follow count, and
    the probe images that rely most on the watched part, drawn with what the test showed the model."""
    watched = monitor.watched
    threshold = "" if monitor.threshold is None else f", past the threshold {monitor.threshold}"
    meaning = "" if watched is None else watched.meaning
    per_image = monitor.image_scores(result)
    rows = top_images(per_image, len(result.targets), monitor.num_images, monitor.alarm_on == "high")
    hot = monitor.method in result.method_maps and monitor.part == "fixed position"
    lines = [
        f"**{headline}**", "",
        f"`{monitor.monitor_key}` = {score:.3f} (best {monitor.best:.3f}; {monitor.patience} checks in a row without "
        f"improving on it by more than {monitor.min_delta}{threshold}).",
        *(["", f"The score is {meaning}."] if meaning else []),
        *follow_lines(result, monitor.source.logged if monitor.source is not None else {}),
        *(["", *hot_region_lines(result, monitor.method, monitor.last_strategies.get(ALL), monitor.prefix,
                                 monitor.strategy_examples)] if hot else []),
        "", f"Next step: {NEXT_STEPS.get(part, FALLBACK_STEP)}.",
        "", f"Probe images that rely most on the {monitor.part}:", "",
        f"| probe image | label | explained class | p | {monitor.part} score |", "|---|---|---|---|---|",
        *image_rows(result, rows, per_image),
    ]
    test = None if watched is None else watched.model_test
    extra = " with each image's hot region" if hot else ""
    if test is not None:
        shown = (f"the image with another probe image's {monitor.part}" if test.kind == "swap"
                 else f"the {monitor.part} alone and the image without it")
        extra = f", and what the test showed the model: {shown}"
    lines += ["", f"Their heatmaps{extra}: image `{monitor.prefix}/alarm_images` at this step."]
    figures.log_text(trainer, f"{monitor.prefix}/alarm", "\n".join(lines), result.step)
    if rows:
        image = draw_hot_regions(result, monitor.method, rows) if hot else result.draw_rows(
            rows, None if test is None else result.model_test_views(test, rows))
        figures.log_image(trainer, f"{monitor.prefix}/alarm_images", image, result.step)


def top_images(per_image: Optional[torch.Tensor], n: int, count: int, high: bool) -> List[int]:
    """The ``count`` probe indices of ``n`` that score worst on the watched part (most reliance first: the highest
    where ``high``), NaN last; the first ones where there are no values per image."""
    if per_image is None:
        return list(range(min(count, n)))
    worst = per_image.nan_to_num(-math.inf if high else math.inf)
    return torch.argsort(worst, descending=high, stable=True)[:count].tolist()


def follow_lines(result: ProbeResult, logged: Dict[str, LoggedScalar]) -> List[str]:
    """One line per swap test with a follow count at this check: its ratio and how many pairs follow its region."""
    lines = []
    for tag, entry in logged.items():
        test = entry.model_test
        if test is None or test.kind != "swap" or not tag.endswith(f"/{test.name}"):
            continue
        count = follow_count(result, logged, entry)
        if count is not None and tag in result.metrics:
            lines.append(f"- `{tag}` = {result.metrics[tag]:.3f}: {count.sentence(test.part)}.")
    intro = ("Each swap test at this check (the images counted are those whose partner the model gives another "
             "class; a pair of one class tells nothing):")
    return ["", intro, "", *lines] if lines else []


def scalar_layout(monitors: List["SpuriousCueMonitor"], sources: List[Any]) -> Dict[str, Dict[str, list]]:
    """TensorBoard's Custom Scalars layout: each monitor's alarm and score first, then each callback's swap ratios
    and follow shares. The alarm and the score are margin charts (the value, and the same as its band), which
    TensorBoard draws unsmoothed: its scalar charts smooth a 0/1 series into a ramp."""
    layout: Dict[str, Dict[str, list]] = {}
    for monitor in monitors:
        score = f"{monitor.prefix}/score"
        layout.setdefault(monitor.prefix, {}).update({
            "alarm (1: on), unsmoothed": ["Margin", [f"{monitor.prefix}/alarm"] * 3],
            f"score ({monitor.monitor_key or 'the watched scalar'}), unsmoothed": ["Margin", [score] * 3],
        })
        if monitor.judges_skill:
            layout[monitor.prefix]["check judged (1: counted; 0: the model cannot tell the swap images apart yet)"] = [
                "Margin", [f"{monitor.prefix}/judged"] * 3]
    for source in sources:
        swaps = [tag for tag, entry in source.logged.items()
                 if entry.model_test is not None and entry.model_test.kind == "swap"]
        charts = {
            "swap ratios": ["Multiline", [tag for tag in swaps if tag.endswith("_swap_ratio")]],
            "share of probe images that follow the swapped region": [
                "Multiline", [tag for tag in swaps if tag.endswith("_follow_share")]],
            "swap probe skill (0: chance, 1: certain)": [
                "Multiline", [tag for tag in source.logged_metrics if tag.endswith(f"/{SKILL}")]],
        }
        layout.setdefault(source.prefix, {}).update({title: chart for title, chart in charts.items() if chart[1]})
    return {category: charts for category, charts in layout.items() if charts}
