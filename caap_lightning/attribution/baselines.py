"""Baseline attribution methods with CAAP's call shape, for timm ViTs and supported CNNs.

Every method is ``Method(model, ...).attribute(images, target=None, upsample=False)`` and
returns float patch maps ``(B, gh, gw)`` (higher = more important for the target class), so
the callback and the benchmarks can swap them for CAAP by name (see ``registry.py``).
``target`` is an int, a list or a tensor of classes, or ``None`` for the predicted class;
images and targets are checked as CAAP (``vit.py``) or ConvCAAP (``cnn.py``) checks them.

A ViT's patches are its own; a ViT built with ``num_classes=0`` takes ``head=``, the module
that maps its pooled features to logits, as CAAP does. A CNN (``cnn.SUPPORTED``) has no
patches of its own: the pixel methods take ``grid=`` (``None``: the grid of the last stage's
feature map at the images' size) and a pixel belongs to the patch holding its centre, the
rule ConvCAAP maps cells by. Grad-CAM reads the last stage's map, on that map's grid.

The model is left as it was found: training flags restored, hooks removed, no ``.grad``
written (gradients are taken with ``torch.autograd.grad`` w.r.t. activations only), and
gradient methods also work when called under ``torch.no_grad()`` or inference mode.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from caap_lightning.attribution import cnn, vit
from caap_lightning.attribution.base import AttributionMethod, GridLike, family_of
from caap_lightning.attribution.blanks import BlankSpec, check_blank, choose_blank, make_blank
from caap_lightning.attribution.caap import SCORES
from caap_lightning.attribution.selection import selection_members
from caap_lightning.attribution.twins import as_timm_vit
from caap_lightning.checks import TargetLike, check_choice, check_finite_weights, check_images, model_device_dtype
from caap_lightning.utils import eval_mode, model_normalization, target_score

_INSTALL_BASELINES = 'pip install "caap-lightning[baselines]"'


def _patch_sums(per_pixel: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)`` pixel values summed over each patch of ``grid`` (a pixel counts where its centre lies)."""
    index = cnn.cell_patches(grid, tuple(per_pixel.shape[-2:]), per_pixel.device).flatten()
    sums = per_pixel.new_zeros(len(per_pixel), grid[0] * grid[1])
    return sums.index_add_(1, index, per_pixel.flatten(1)).unflatten(1, grid)


@contextlib.contextmanager
def _gradients() -> Iterator[None]:
    """Autograd on, even inside the ``no_grad``/inference mode of a validation loop."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _check_plain_vit(model: nn.Module, method: str) -> None:
    """The attention methods run the blocks by hand, as CAAP does: the same models only."""
    if family_of(model) == "cnn":
        raise ValueError(
            f"{method} reads attention, which {type(model).__name__} (a CNN) does not have; "
            "registry.available_methods('cnn') lists the methods for CNNs"
        )
    try:
        as_timm_vit(model)
    except ValueError as err:
        raise ValueError(f"{method} reads attention from timm's plain ViT blocks: {err}") from None


def _read_patches(model: nn.Module, relevance: torch.Tensor) -> torch.Tensor:
    """Patch columns of a token-to-token matrix ``(B, T, T)`` as the model pools them.

    ``token`` pooling reads the class token's row; ``avg`` pooling the mean of the patch rows.
    """
    P = model.num_prefix_tokens
    if model.global_pool == "token":
        return relevance[:, 0, P:]
    return relevance[:, P:, P:].mean(1)


def _attention_forward(
    classifier: vit.Classifier, images: torch.Tensor
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Logits and every block's attention probabilities, heads first ``(heads, B, T, T)``
    as :func:`vit.qkv` lays them out."""
    model = classifier.vit
    x = vit.embed(model, images)
    attentions = []
    for block in model.blocks:
        q, k, v = vit.qkv(block, x)
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        attentions.append(attn)
        x = vit.finish_block(block, x, attn @ v)
    return classifier.pooled_logits(vit.pool_final(model, x)), attentions


class GradCAM(AttributionMethod):
    """Grad-CAM (Selvaraju et al., 2017) at pytorch-grad-cam's default layer for each family.

    A CNN's activations are the last stage's feature map (``conv_stages(model).stages[-1]``,
    e.g. ResNet's ``layer4``), on that map's grid; a ViT's are the output of
    ``blocks[-1].norm1`` at the patch tokens, as pytorch-grad-cam adapts it to ViTs. Each
    channel is weighted by its gradient (of the target's logit) averaged over the cells, and
    the map is the positive part of the weighted sum over channels.
    """

    def __init__(self, model: nn.Module, head: Optional[nn.Module] = None) -> None:
        super().__init__(model, head)
        blocks = getattr(self.model, "blocks", None)
        if self.family == "vit" and (not blocks or not hasattr(blocks[-1], "norm1")):
            raise ValueError(f"GradCAM needs a timm ViT whose last block has `norm1`; got {type(model).__name__}")

    def _attribute(self, images, target):
        with _gradients():
            # An input that requires grad keeps the graph when every weight is frozen.
            logits, activations, as_maps = self.adapter.cam_forward(images.clone().requires_grad_())
            targets = self._targets(target, logits)
            (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), activations)
        activations, grads = as_maps(activations.detach()), as_maps(grads)
        return (activations * grads.mean((2, 3), keepdim=True)).sum(1).clamp_min(0)


class AttentionRollout(AttributionMethod):
    """Attention rollout (Abnar & Zuidema, 2020): head-mean attention with the residual identity.

    Each block's ``0.5 * mean_heads(A) + 0.5 * I`` (rows sum to one) is multiplied from the
    first block to the last; the map is the pooled token's row at the patch columns. It does
    not depend on the target class (``target`` is accepted for the common call shape).
    """

    def __init__(self, model: nn.Module, head: Optional[nn.Module] = None) -> None:
        super().__init__(model, head)
        _check_plain_vit(model, "AttentionRollout")

    def joint_attention(self, images: torch.Tensor) -> torch.Tensor:
        """The rolled-out token-to-token matrix ``(B, T, T)`` before pooling (rows sum to one)."""
        check_images(self.model, images)
        check_finite_weights(self.model)
        device, dtype = model_device_dtype(self.model)
        with eval_mode(self.classifier):
            return self._rollout(images.to(device=device, dtype=dtype))

    @torch.no_grad()
    def _rollout(self, images: torch.Tensor) -> torch.Tensor:
        _, attentions = _attention_forward(self.classifier, images)
        rollout = None
        for attn in attentions:
            mixed = 0.5 * attn.float().mean(0) + 0.5 * torch.eye(attn.shape[-1], device=attn.device)
            rollout = mixed if rollout is None else mixed @ rollout
        return rollout

    def _attribute(self, images, target):
        # Class-agnostic: the target was only checked, as every method checks it.
        return _read_patches(self.model, self._rollout(images)).unflatten(1, self._grid(images))


class TransformerAttribution(AttributionMethod):
    """T-Attr, gradient-only (Chefer et al., 2021, "Generic Attention-model Explainability").

    Relevance starts at the identity and every block adds ``mean_heads((dA * A)^+) @ R``, with
    ``dA`` the gradient of the target's logit w.r.t. that block's attention probabilities
    ``A``; the map is the pooled token's row at the patch columns. No LRP rules are needed.
    """

    def __init__(self, model: nn.Module, head: Optional[nn.Module] = None) -> None:
        super().__init__(model, head)
        _check_plain_vit(model, "TransformerAttribution")

    def _attribute(self, images, target):
        with _gradients():
            logits, attentions = _attention_forward(self.classifier, images.clone().requires_grad_())
            targets = self._targets(target, logits)
            grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), attentions)
        n_tokens = attentions[0].shape[-1]
        relevance = torch.eye(n_tokens, device=images.device).expand(len(images), -1, -1)
        for attn, grad in zip(attentions, grads):
            cam = (grad * attn.detach()).float().clamp_min(0).mean(0)
            relevance = relevance + cam @ relevance
        return _read_patches(self.model, relevance).unflatten(1, self._grid(images))


class InputXGradient(AttributionMethod):
    """Input x gradient of the target's logit, ``|x * dx|`` summed over each patch's pixels and channels.

    Args:
        grid: a CNN's patch grid (an int or ``(gh, gw)``); ``None`` = its last feature map's grid.
        head: a headless ViT's head, as for :class:`~caap_lightning.CAAP`.
    """

    def __init__(self, model: nn.Module, grid: GridLike = None, head: Optional[nn.Module] = None) -> None:
        super().__init__(model, head, grid)

    def _attribute(self, images, target):
        with _gradients():
            inputs = images.clone().requires_grad_()
            logits = self.classifier(inputs)
            targets = self._targets(target, logits)
            (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), inputs)
        return _patch_sums((images * grads).abs().sum(1), self._grid(images))


class _InputPatching(AttributionMethod):
    """Input-space patching with CAAP's selection operator and blank (paper appendix B.2)."""

    def __init__(
        self,
        model: nn.Module,
        selection: str = "box1",
        blank: BlankSpec = "white",
        score: str = "probability",
        batch_size: int = 64,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        blank_seed: int = 0,
        grid: GridLike = None,
        head: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(model, head, grid)
        selection_members(selection, (1, 1))  # validates the name
        check_blank(blank)
        check_choice("score", score, SCORES)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.selection = selection
        self.blank = blank
        self.last_blank: BlankSpec = blank  # as CAAP's: the kind "auto" chose at the last call
        self.score = score
        self.batch_size = batch_size
        self.mean, self.std = model_normalization(self.model, mean, std, self.adapter.channels)
        self.blank_seed = blank_seed

    def _pixel_selections(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, H, W)`` bool: the pixels of the patches in ``S(p)``, for every patch ``p``."""
        # ConvCAAP's cells-to-patches rule, with pixels as the cells.
        size = tuple(images.shape[-2:])
        return cnn.region_masks(self._grid(images), self.selection, size, device=images.device)[0]

    def _patched_scores(self, images: torch.Tensor, target: TargetLike, insert: bool):
        """Scores of every image with ``S(p)`` inserted into the blank (``insert``) or
        replaced by it, ``(B, N)``, and the clean images' scores ``(B,)``."""
        size = tuple(images.shape[-2:])
        selections = self._pixel_selections(images)[:, None]  # (N, 1, H, W)
        B, n = len(images), selections.shape[0]
        with torch.no_grad():
            self.last_blank = choose_blank(self.blank, self.classifier, size, self.mean, self.std, self.blank_seed,
                                           images.device, images.dtype)
            blank = make_blank(self.last_blank, size, self.mean, self.std, self.blank_seed)
            blank = blank.to(images.device, images.dtype)[0]
            clean_logits = self.classifier(images)
            targets = self._targets(target, clean_logits)
            flat = torch.arange(B * n, device=images.device)
            scores = []
            for chunk in flat.split(self.batch_size):
                image, patch = images[chunk // n], selections[chunk % n]
                patched = torch.where(patch, image, blank) if insert else torch.where(patch, blank, image)
                scores.append(target_score(self.classifier(patched), targets[chunk // n], self.score).float())
        return torch.cat(scores).view(B, n), target_score(clean_logits, targets, self.score).float()


class SimpleInsertion(_InputPatching):
    """Simple Insertion (paper, appendix B.2): the score of the blank image with ``S(p)``'s
    pixels copied in from the image. ``N`` forwards per image.

    Args:
        selection, blank, score, mean, std, blank_seed, head: as for :class:`~caap_lightning.CAAP`.
        batch_size: patched images per forward pass.
        grid: a CNN's patch grid (an int or ``(gh, gw)``); ``None`` = its last feature map's grid.
    """

    def _attribute(self, images, target):
        scores, _ = self._patched_scores(images, target, insert=True)
        return scores.unflatten(1, self._grid(images))


class SimpleDeletion(_InputPatching):
    """Simple Deletion (paper, appendix B.2): the drop in score when ``S(p)``'s pixels are
    replaced by the blank's, ``score(x) - score(x without S(p))``. ``N`` forwards per image.

    Args:
        selection, blank, score, mean, std, blank_seed, head: as for :class:`~caap_lightning.CAAP`.
        batch_size: patched images per forward pass.
        grid: a CNN's patch grid (an int or ``(gh, gw)``); ``None`` = its last feature map's grid.
    """

    def _attribute(self, images, target):
        scores, clean = self._patched_scores(images, target, insert=False)
        return (clean[:, None] - scores).unflatten(1, self._grid(images))


class PatchOcclusion(AttributionMethod):
    """captum's ``Occlusion`` with one patch as window and stride: the drop in score when a
    patch is set to ``baseline`` (the normalised zero, i.e. the dataset mean, by default).

    A CNN's ``grid`` (``None``: its last feature map's grid) must divide the image size, so
    that every window is one whole patch. Needs the optional ``baselines`` extra
    (``pip install "caap-lightning[baselines]"``).
    """

    def __init__(
        self,
        model: nn.Module,
        baseline: float = 0.0,
        score: str = "probability",
        batch_size: int = 64,
        grid: GridLike = None,
        head: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(model, head, grid)
        try:
            from captum.attr import Occlusion
        except ImportError as err:
            raise ImportError(f"the occlusion baseline uses captum, which is not installed: {_INSTALL_BASELINES}") from err
        check_choice("score", score, SCORES)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self._occlusion = Occlusion
        self.baseline = float(baseline)
        self.score = score
        self.batch_size = batch_size

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(images)
        return logits.float().softmax(-1) if self.score == "probability" else logits

    def _attribute(self, images, target):
        (gh, gw) = grid = self._grid(images)
        ph, pw = _window(images, grid)
        channels = images.shape[1]
        with torch.no_grad():
            targets = self._targets(target, self.classifier(images))
            attributions = self._occlusion(self._forward).attribute(
                images,
                sliding_window_shapes=(channels, ph, pw),
                strides=(channels, ph, pw),
                baselines=self.baseline,
                target=targets,
                perturbations_per_eval=self.batch_size,
            )
        # Every pixel and channel of a patch holds that patch's score drop.
        return attributions.mean(1).view(len(images), gh, ph, gw, pw).mean((2, 4))


def _window(images: torch.Tensor, grid: Tuple[int, int]) -> Tuple[int, int]:
    """One patch's pixels ``(ph, pw)``; a ``ValueError`` naming a grid that fits when the size does not divide."""
    (h, w), (gh, gw) = images.shape[-2:], grid
    if h % gh or w % gw:
        fits = (max(d for d in range(1, gh + 1) if h % d == 0), max(d for d in range(1, gw + 1) if w % d == 0))
        raise ValueError(
            f"occlusion slides one patch as its window, so the image size {h}x{w} must divide into the grid "
            f"{gh}x{gw}; pass grid={fits} (the finest grid of at most {gh}x{gw} that divides it) or resize the images"
        )
    return h // gh, w // gw


class RandomMap(AttributionMethod):
    """Uniform random maps from a seeded generator: the reference row of the benchmarks.

    ``grid``: a CNN's patch grid (an int or ``(gh, gw)``); ``None`` = its last feature map's grid.
    """

    def __init__(
        self, model: nn.Module, seed: int = 0, grid: GridLike = None, head: Optional[nn.Module] = None
    ) -> None:
        super().__init__(model, head, grid)
        self.generator = torch.Generator().manual_seed(seed)

    def _attribute(self, images, target):
        # A random map ignores the class: the target was only checked, as every method checks it.
        return torch.rand(len(images), *self._grid(images), generator=self.generator).to(images.device)
