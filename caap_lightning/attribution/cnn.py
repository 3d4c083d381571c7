"""CAAP for convolutional networks: activation patching on the feature maps at a stage cut.

A CNN is read as ``stem -> stages -> head``. For each patch ``p`` of a patch grid, the
source image's feature-map cells under the selection ``S(p)`` replace the blank image's
cells at the cut, and the rest of the network runs on that hybrid map (``standard``); or,
in the ``frozen`` construction, every later stage boundary resets the cells outside
``S(p)``'s region to the blank's activations there. ``docs/cnn.md`` defines both exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from caap_lightning.attribution.base import AttributionMethod
from caap_lightning.attribution.blanks import BlankSpec, choose_blank, make_blank, warn_saturated_blank
from caap_lightning.attribution.caap import check_settings, sweep_cutoffs
from caap_lightning.attribution.selection import selection_members
from caap_lightning.attribution.stages import (  # the stage table's names, also read from here
    SUPPORTED,
    ConvStages,
    CutLike,
    GridLike,
    check_classifier,
    check_grid,
    conv_stages,
    in_channels,
    is_supported,
    stage_macs,
)
from caap_lightning.attribution.twins import unwrap_compiled
from caap_lightning.checks import TargetLike, check_target, check_target_range
from caap_lightning.utils import eval_mode, model_normalization, target_score

__all__ = [
    "CONSTRUCTIONS", "SUPPORTED", "ConvCAAP", "ConvStages", "CutLike", "GridLike", "cell_patches", "check_classifier",
    "check_grid", "conv_stages", "is_supported", "region_masks", "stage_macs",
]

CONSTRUCTIONS = ("standard", "frozen")

# Bytes the patched maps of one chunk may take when chunk_size=None (CAAP's budget).
_CHUNK_BUDGET_BYTES = 256 * 2**20
# Live copies of a stage's largest map while it runs (input, branches, concatenations).
_LIVE_COPIES = 6


# ---------------------------------------------------------------------- patch regions
def _cell_patch(cells: int, patches: int, device) -> Tensor:
    """For each of ``cells`` feature cells along one axis, the patch holding its centre."""
    i = torch.arange(cells, device=device)
    return ((2 * i + 1) * patches) // (2 * cells)


def cell_patches(grid: Tuple[int, int], size: Tuple[int, int], device=None) -> Tensor:
    """``(H, W)`` long: the patch (row-major on ``grid``) holding the centre of each cell of an
    ``H x W`` map. For pixels of an image that divides into the grid, that is the patch they lie in."""
    gh, gw = grid
    h, w = size
    return _cell_patch(h, gh, device)[:, None] * gw + _cell_patch(w, gw, device)[None, :]


def _overlap(cells: int, cut_cells: int, device) -> Tensor:
    """``(cells, cut_cells)``: whether a cell of a later map overlaps a cut cell (same image span)."""
    r = torch.arange(cells, device=device)[:, None]
    i = torch.arange(cut_cells, device=device)[None, :]
    return (r * cut_cells < (i + 1) * cells) & (i * cells < (r + 1) * cut_cells)


def region_masks(
    grid: Tuple[int, int],
    selection: str,
    cut_size: Tuple[int, int],
    later_sizes: Sequence[Tuple[int, int]] = (),
    device=None,
) -> List[Tensor]:
    """``S(p)``'s cells on the cut's map and on each later map, for every patch ``p``.

    Returns boolean masks ``(N, H, W)``: first the cut's (a cut cell belongs to the patch
    whose area holds its centre; the mask is the union of the cells of ``S(p)``'s
    patches), then one per ``later_sizes`` (a later cell is in the region when the image
    span it covers overlaps that of a cut cell in the mask).
    """
    gh, gw = grid
    n = gh * gw
    index, _ = selection_members(selection, grid, device)
    # Padding slots repeat p, itself a member, so scattering True over them is exact.
    in_s = torch.zeros(n, n, dtype=torch.bool, device=device).scatter_(1, index, True)
    h, w = cut_size
    cut = in_s[:, cell_patches(grid, cut_size, device)]  # (N, H, W)
    masks = [cut]
    for hj, wj in later_sizes:
        rows = _overlap(hj, h, device).float()
        cols = _overlap(wj, w, device).float()
        masks.append(torch.einsum("rh,nhw,cw->nrc", rows, cut.float(), cols) > 0)
    return masks


def _paste(inside: Tensor, outside: Tensor, masks: Tensor) -> Tensor:
    """``inside`` (B[, c], C, H, W) on each mask of ``masks`` (c, H, W), ``outside`` (1, C, H, W)
    elsewhere; returns the batch ``(B * c, C, H, W)`` ordered image-major."""
    if inside.dim() == 4:
        inside = inside[:, None]
    return torch.where(masks[None, :, None], inside, outside[:, None]).flatten(0, 1)


# ---------------------------------------------------------------------- the method
@dataclass
class _BlankMaps:
    """The blank's activations of one call: recomputed each call, so they always follow the current weights."""

    maps: List[Tensor]  # the blank's feature map at every cut 0..S, (1, C_j, H_j, W_j)
    logits: Tensor  # (1, num_classes)


class ConvCAAP(AttributionMethod):
    """CAAP for a torchvision or timm ResNet, VGG, DenseNet or ConvNeXt.

    Args:
        model: a supported CNN (``conv_stages`` lists its cuts), or one ``torch.compile`` wrapped.
        layer_cutoff: the cut: a stage index ``k`` in ``0..S`` (the output of the ``k``-th
            stage after the stem, ``0`` = the stem's output), a stage name
            (``ConvCAAP(model).cut_names``), ``None`` for the middle boundary ``S // 2``,
            or ``"auto"``: picked by :meth:`calibrate` on a probe set (required before
            :meth:`attribute`).
        grid: the patch grid ``(gh, gw)`` (or an int for a square one); ``None`` = the
            cut's feature map itself, one patch per cell. A coarser grid maps patches to
            cells by area.
        selection: ``S(p)`` on the patch grid: ``"point"``, ``"box1"`` (3x3, default),
            ``"box2"`` (5x5) or ``"cross1"``; border patches have fewer members.
        blank: the context image, as for :class:`~caap_lightning.attribution.caap.CAAP`.
        construction: ``"standard"`` (textbook patching at the cut) or ``"frozen"`` (every
            later stage boundary resets the cells outside ``S(p)``'s region to the blank's).
        score: ``"probability"`` (softmax of the target) or ``"logit"``.
        mean, std: the input normalisation (default: ``pretrained_cfg``, else ImageNet's).
        chunk_size: patches per batched pass; ``None`` picks one that bounds memory.
        blank_seed: seed of the ``noise`` and ``blur_noise`` blanks.
        relative: maps of ``A - A_blank`` (the evidence relative to the blank) by default;
            :meth:`attribute`'s ``relative`` overrides it per call.

    Example::

        caap = ConvCAAP(torchvision.models.resnet50(weights="DEFAULT"), layer_cutoff="layer3")
        maps = caap.attribute(images, target=labels)   # (B, 14, 14) at 224 px
    """

    def __init__(
        self,
        model: nn.Module,
        layer_cutoff: CutLike = None,
        grid: GridLike = None,
        selection: str = "box1",
        blank: BlankSpec = "white",
        construction: Literal["standard", "frozen"] = "standard",
        score: Literal["probability", "logit"] = "probability",
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        chunk_size: Optional[int] = None,
        blank_seed: int = 0,
        relative: bool = False,
    ) -> None:
        conv_stages(unwrap_compiled(model))  # refuses another model, naming the supported ones
        super().__init__(model)  # self.model: the CNN itself, unwrapped from torch.compile's wrapper
        self.table = self.adapter.table
        self.relative = relative
        self.layer_cutoff = self._resolve_cut(layer_cutoff)
        self.grid = check_grid(grid)
        check_settings(selection, blank, construction, CONSTRUCTIONS, score, chunk_size)
        self.selection = selection
        self.blank = blank
        self.construction = construction
        self.score = score
        self.mean, self.std = model_normalization(self.model, mean, std, self.adapter.channels)
        self.chunk_size = chunk_size
        self.blank_seed = blank_seed
        self._last_size: Optional[Tuple[int, int]] = None
        self._warned_classes: set = set()
        # The blank of the last call: ``blank`` itself, or the kind ``"auto"`` chose then.
        self.last_blank: BlankSpec = blank

    @property
    def depth(self) -> int:
        """The deepest cut, ``S`` (cuts are ``0..S``), as :attr:`CAAP.depth` is a ViT's deepest cutoff."""
        return self.table.depth

    @property
    def cut_names(self) -> Tuple[str, ...]:
        """The names of the cuts ``0..S``, in order."""
        return self.table.names

    @property
    def cut_name(self) -> str:
        return self.table.names[self._cut()]

    # ------------------------------------------------------------------ public API
    def attribute(
        self,
        images: Tensor,
        target: TargetLike = None,
        upsample: bool = False,
        relative: Optional[bool] = None,
    ) -> Tensor:
        """Maps ``(B, gh, gw)`` for a batch of normalised images ``(B, C, H, W)``.

        Args:
            target: class per image (int, list or tensor); ``None`` = the predicted class.
            upsample: return pixel maps ``(B, H, W)`` (bilinear) instead.
            relative: return ``A - A_blank``, the evidence for the class relative to the blank;
                ``None`` = the constructor's ``relative``.
        """
        self._cut()  # an uncalibrated "auto" cut fails before any work
        return super().attribute(images, target, upsample, relative=relative)

    @torch.no_grad()
    def _attribute(self, images: Tensor, targets: Optional[Tensor], relative: Optional[bool] = None) -> Tensor:
        k = self._cut()
        size, device, dtype = tuple(images.shape[-2:]), images.device, images.dtype
        blank = self._blank_maps(size, device, dtype)
        cut_size = tuple(blank.maps[k].shape[-2:])
        grid = self._grid_for(cut_size, size)
        if targets is not None and self.table.num_classes is None:  # a head without a Linear: its logits say
            check_target_range(targets, blank.logits.shape[-1])
        source, logits = self._source(images, k, full=targets is None)
        targets = logits.argmax(-1) if targets is None else targets
        self._warn_saturated(blank, targets)
        later = [tuple(m.shape[-2:]) for m in blank.maps[k + 1:]] if self.construction == "frozen" else []
        masks = region_masks(grid, self.selection, cut_size, later, device)
        scores = self._patched_scores(source, blank, masks, k, targets)
        maps = scores.float().unflatten(1, grid)
        if self.relative if relative is None else relative:
            maps = maps - self._score(blank.logits.expand(len(targets), -1), targets)[:, None, None]
        return maps

    @torch.no_grad()
    def blank_score(self, target: TargetLike, image_size: Optional[Tuple[int, int]] = None) -> Tensor:
        """``A_blank``: the blank image's own score for each target, ``(B,)``.

        ``image_size`` defaults to the size last attributed, else the model's
        ``pretrained_cfg`` input size, else 224x224.
        """
        p = next(self.model.parameters())
        cfg_size = (getattr(self.model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[1:]
        size = tuple(image_size or self._last_size or cfg_size)
        with eval_mode(self.model):
            blank = self._blank_maps(size, p.device, p.dtype)
        targets = self._targets(target, None, blank, p.device)
        return self._score(blank.logits.expand(len(targets), -1), targets)

    def calibrate(
        self,
        probe,
        target: TargetLike = None,
        masks: Optional[Tensor] = None,
        layer_cutoffs: Optional[Sequence[Union[int, str]]] = None,
        progress: bool = False,
        step: Optional[int] = None,
    ) -> List[dict]:
        """Pick the cut on a probe set by Insertion minus Deletion, and set it.

        As :meth:`CAAP.calibrate <caap_lightning.attribution.caap.CAAP.calibrate>`: each
        cut (default: all, ``0..S``) is scored with the RISE protocol (and AUPR1 where
        object masks are given); the cut with the best mean InsDel wins.

        Args:
            probe: normalised images ``(B, 3, H, W)``, or a ``ProbeBatch`` (its labels and
                masks are used unless ``target``/``masks`` are given).
            target: classes (default: the probe's labels, else the predicted class).
            masks: object masks ``(B, H, W)`` for AUPR1 (optional).
            layer_cutoffs: the cuts to try, as indices or names.
            progress: show a progress bar over the cuts.
            step: pixels per Insertion/Deletion step; default the image width (RISE's
                choice for its CNNs: 224 steps at 224 px).

        Returns:
            One row per cut: ``{"layer_cutoff", "cut", "insertion", "deletion", "insdel"
            [, "aupr_fg"]}`` (means over the probe images).
        """
        images = getattr(probe, "images", probe)
        target = getattr(probe, "labels", None) if target is None else target
        masks = getattr(probe, "masks", None) if masks is None else masks
        choices = range(self.table.depth + 1) if layer_cutoffs is None else layer_cutoffs
        cuts = [self._resolve_cut(c, allow_auto=False) for c in choices]
        if not cuts:
            raise ValueError("layer_cutoffs is empty; pass the cuts to try, or None for all")
        step = images.shape[-1] if step is None else step
        if target is not None:
            target = check_target(target, len(images), self.table.num_classes, images.device)
        return sweep_cutoffs(self, self.model, cuts, images, target, masks, step, progress, name=self.table.names.__getitem__)

    def cost(self, image_size: Tuple[int, int] = (224, 224)) -> Dict[str, Union[int, float, str]]:
        """Analytic multiply-adds of one attribution per image, against a plain forward.

        One source forward, then per patch the stages after the cut and the head. The
        blank's forward (one per call, whatever the batch size) is left out, so this is the
        cost per image of a large batch. ``frozen`` costs what ``standard`` costs: both run
        the full later maps. Conv and linear layers only.

        Returns ``{"cut", "patches", "forward_macs", "per_patch_macs", "caap_macs", "ratio"}``
        (``ratio``: CAAP over a plain forward).
        """
        k = self._cut()
        per_stage = stage_macs(self.model, image_size)
        p = next(self.model.parameters())
        with torch.no_grad(), eval_mode(self.model):
            x = torch.zeros(1, in_channels(self.table), *image_size, device=p.device, dtype=p.dtype)
            for stage in self.table.stages[:k + 1]:
                x = stage(x)
        grid = self._grid_for(tuple(x.shape[-2:]), image_size)
        patches = grid[0] * grid[1]
        forward = sum(per_stage)
        per_patch = sum(per_stage[k + 1:])
        total = forward + patches * per_patch
        return {
            "cut": self.table.names[k],
            "patches": patches,
            "forward_macs": forward,
            "per_patch_macs": per_patch,
            "caap_macs": total,
            "ratio": total / forward,
        }

    # ------------------------------------------------------------------ set-up pieces
    def _resolve_cut(self, cut: CutLike, allow_auto: bool = True) -> Union[int, str]:
        names, depth = self.table.names, self.table.depth
        where = f"{type(self.model).__name__} ({self.table.family}) has cuts 0..{depth}: {list(names)}"
        if cut is None:
            return depth // 2
        if cut == "auto" and allow_auto:
            return "auto"
        if isinstance(cut, str):
            if cut not in names:
                auto = ", or 'auto'" if allow_auto else ""
                raise ValueError(f"layer_cutoff={cut!r} is not a stage of the model; {where}{auto}")
            return names.index(cut)
        if isinstance(cut, bool) or not isinstance(cut, int) or not 0 <= cut <= depth:
            raise ValueError(f"layer_cutoff={cut!r} must be an int in 0..{depth}, a stage name or 'auto'; {where}")
        return cut

    def _cut(self) -> int:
        if self.layer_cutoff == "auto":
            raise RuntimeError(
                "layer_cutoff='auto' picks the cut on a probe set: call calibrate(probe_images) "
                "before attribute(), or pass a cut (index or name) to ConvCAAP"
            )
        return self.layer_cutoff

    def _grid_for(self, cut_size: Tuple[int, int], image_size) -> Tuple[int, int]:
        if self.grid is None:
            return cut_size
        if self.grid[0] > cut_size[0] or self.grid[1] > cut_size[1]:
            raise ValueError(
                f"grid={self.grid} is finer than the cut {self.cut_name!r}'s feature map {cut_size} "
                f"at image size {tuple(image_size)}; pick a grid of at most {cut_size}, an earlier cut "
                "or larger images"
            )
        return self.grid

    def _targets(self, target: TargetLike, batch: Optional[int], blank: _BlankMaps, device) -> Tensor:
        return check_target(target, batch, blank.logits.shape[-1], device)

    def _score(self, logits: Tensor, targets: Tensor) -> Tensor:
        return target_score(logits.float(), targets, self.score)

    def _blank_maps(self, size, device, dtype) -> _BlankMaps:
        # No cache across calls: fused optimisers and writes through p.data change weights without a trace.
        self._last_size = size
        self.last_blank = choose_blank(self.blank, self.model, size, self.mean, self.std, self.blank_seed, device, dtype)
        x = make_blank(self.last_blank, size, self.mean, self.std, self.blank_seed).to(device, dtype)
        maps = []
        for stage in self.table.stages:
            x = stage(x)
            maps.append(x)
        return _BlankMaps(maps, self.table.head(x))

    def _source(self, images: Tensor, k: int, full: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """The source's map at the cut and, when ``full``, its logits."""
        x = images
        for stage in self.table.stages[:k + 1]:
            x = stage(x)
        if not full:
            return x, None
        y = x
        for stage in self.table.stages[k + 1:]:
            y = stage(y)
        return x, self.table.head(y)

    def _warn_saturated(self, blank: _BlankMaps, targets: Tensor) -> None:
        warn_saturated_blank("ConvCAAP", self.last_blank, blank.logits, targets, self._warned_classes)

    def _chunk(self, batch: int, blank: _BlankMaps, k: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        largest = max(m[0].numel() for m in blank.maps[k:])
        per_patch = _LIVE_COPIES * batch * largest * blank.maps[k].element_size()
        return max(1, _CHUNK_BUDGET_BYTES // per_patch)

    def _patched_scores(
        self, source: Tensor, blank: _BlankMaps, masks: List[Tensor], k: int, targets: Tensor
    ) -> Tensor:
        """Scores ``(B, N)``: the cut's map patched per patch, the later stages run batched."""
        batch, n = len(source), masks[0].shape[0]
        chunk = self._chunk(batch, blank, k)
        frozen = self.construction == "frozen"
        out = []
        for start in range(0, n, chunk):
            c = min(chunk, n - start)
            x = _paste(source, blank.maps[k], masks[0][start:start + c])
            for j in range(k + 1, len(self.table.stages)):
                x = self.table.stages[j](x)
                if frozen:
                    x = _paste(x.unflatten(0, (batch, c)), blank.maps[j], masks[j - k][start:start + c])
            logits = self.table.head(x)
            out.append(self._score(logits, targets.repeat_interleave(c)).view(batch, c))
        return torch.cat(out, dim=1)

