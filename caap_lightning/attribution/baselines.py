"""Baseline attribution methods with CAAP's call shape.

Every method is ``Method(model, ...).attribute(images, target=None, upsample=False)`` and
returns float patch maps ``(B, gh, gw)`` (higher = more important for the target class), so
the callback and the benchmarks can swap them for CAAP by name (see ``registry.py``).
``target`` is an int, a list or a tensor of classes, or ``None`` for the predicted class;
images and targets are checked as CAAP checks them (the same helpers in ``vit.py``). A ViT
built with ``num_classes=0`` takes ``head=``, the module that maps its pooled features to
logits, as CAAP does.
The model is left as it was found: training flags restored, hooks removed, no ``.grad``
written (gradients are taken with ``torch.autograd.grad`` w.r.t. activations only), and
gradient methods also work when called under ``torch.no_grad()`` or inference mode.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from caap_lightning.attribution import vit
from caap_lightning.attribution.blanks import BlankSpec, check_blank, make_blank
from caap_lightning.attribution.selection import selection_members
from caap_lightning.utils import eval_mode, model_normalization, target_score, upsample_maps

TargetLike = vit.TargetLike
SCORES = ("probability", "logit")

_INSTALL_BASELINES = 'pip install "caap-lightning[baselines]"'


class PatchAttribution:
    """Base of the baselines: input checks, targets, the head, eval mode, optional upsampling.

    Subclasses implement ``_attribute(images, targets) -> (B, gh, gw)``; ``images`` are
    already checked and on the model's device and dtype, ``targets`` are checked class
    indices (or ``None``), and the model and head are in eval mode. Logits come from
    ``self.classifier`` (the ViT, then ``head`` where given).
    """

    def __init__(self, model: nn.Module, head: Optional[nn.Module] = None) -> None:
        patch_size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if patch_size is None:
            raise ValueError(
                f"{type(self).__name__} needs a timm Vision Transformer (a model with "
                f"`patch_embed.patch_size`); got {type(model).__name__}"
            )
        self.classifier = vit.Classifier(model, head)
        self.model = model
        self.head = head

    @property
    def patch_size(self) -> Tuple[int, int]:
        return tuple(self.model.patch_embed.patch_size)

    def attribute(self, images: torch.Tensor, target: TargetLike = None, upsample: bool = False) -> torch.Tensor:
        """Maps for a batch of normalised images ``(B, 3, H, W)``.

        Args:
            target: class per image (int, list or tensor); ``None`` = the predicted class.
            upsample: return pixel maps ``(B, H, W)`` (bilinear) instead of ``(B, gh, gw)``.
        """
        vit.check_images(self.model, images)
        device, dtype = vit.model_device_dtype(self.model)
        if target is not None:
            target = vit.check_target(target, len(images), self.classifier.num_classes, device)
        vit.check_finite_weights(self.model, self.head)
        images = images.to(device=device, dtype=dtype)
        with eval_mode(self.classifier):
            maps = self._attribute(images, target).detach().float()
        if upsample:
            maps = upsample_maps(maps, tuple(images.shape[-2:]))
        return maps

    def _attribute(self, images: torch.Tensor, targets: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _targets(self, targets: Optional[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """The checked ``targets``, or the arg-max of ``logits`` when ``None``."""
        if targets is None:
            return logits.detach().argmax(-1)
        # A copy: a target tensor made in inference mode (a validation loop's) cannot be saved for
        # backward by `gather`; one copied here, inside `_gradients()`, can.
        return targets.clone()

    def _grid(self, images: torch.Tensor) -> Tuple[int, int]:
        return vit.grid_size(self.model, *images.shape[-2:])


@contextlib.contextmanager
def _gradients() -> Iterator[None]:
    """Autograd on, even inside the ``no_grad``/inference mode of a validation loop."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not one of {SCORES}")


def _check_plain_vit(model: nn.Module, method: str) -> None:
    """The attention methods run the blocks by hand, as CAAP does: the same models only."""
    try:
        vit.check_supported_vit(model)
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


class GradCAM(PatchAttribution):
    """Grad-CAM on the patch tokens entering the last block, as pytorch-grad-cam adapts it to ViTs.

    The activations are the output of ``blocks[-1].norm1`` at the patch tokens; each channel
    is weighted by its gradient (of the target's logit) averaged over the patches, and the
    map is the positive part of the weighted sum over channels.
    """

    def __init__(self, model: nn.Module, head: Optional[nn.Module] = None) -> None:
        super().__init__(model, head)
        blocks = getattr(model, "blocks", None)
        if not blocks or not hasattr(blocks[-1], "norm1"):
            raise ValueError(f"GradCAM needs a timm ViT whose last block has `norm1`; got {type(model).__name__}")

    def _attribute(self, images, target):
        captured = []
        hook = self.model.blocks[-1].norm1.register_forward_hook(lambda m, args, out: captured.append(out))
        try:
            with _gradients():
                logits = self.classifier(images.clone().requires_grad_())
                targets = self._targets(target, logits)
                (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), captured[-1])
        finally:
            hook.remove()
        P = self.model.num_prefix_tokens
        activations, grads = captured[-1][:, P:].detach(), grads[:, P:]
        cam = (activations * grads.mean(1, keepdim=True)).sum(-1).clamp_min(0)
        return cam.unflatten(1, self._grid(images))


class AttentionRollout(PatchAttribution):
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
        vit.check_images(self.model, images)
        vit.check_finite_weights(self.model)
        device, dtype = vit.model_device_dtype(self.model)
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


class TransformerAttribution(PatchAttribution):
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


class InputXGradient(PatchAttribution):
    """Input x gradient of the target's logit, ``|x * dx|`` summed over each patch's pixels and channels."""

    def _attribute(self, images, target):
        with _gradients():
            inputs = images.clone().requires_grad_()
            logits = self.classifier(inputs)
            targets = self._targets(target, logits)
            (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), inputs)
        (gh, gw), (ph, pw) = self._grid(images), self.patch_size
        per_pixel = (images * grads).abs().sum(1)
        return per_pixel.view(len(images), gh, ph, gw, pw).sum((2, 4))


class _InputPatching(PatchAttribution):
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
        head: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(model, head)
        selection_members(selection, (1, 1))  # validates the name
        check_blank(blank)
        _check_score(score)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.selection = selection
        self.blank = blank
        self.score = score
        self.batch_size = batch_size
        self.mean, self.std = model_normalization(model, mean, std)
        self.blank_seed = blank_seed

    def _pixel_selections(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, H, W)`` bool: the pixels of the patches in ``S(p)``, for every patch ``p``."""
        grid, (ph, pw) = self._grid(images), self.patch_size
        n = grid[0] * grid[1]
        index, _ = selection_members(self.selection, grid, images.device)
        # Padding slots repeat p, itself a member, so scattering True everywhere is exact.
        members = torch.zeros(n, n, dtype=torch.bool, device=images.device).scatter_(1, index, True)
        return members.view(n, *grid).repeat_interleave(ph, 1).repeat_interleave(pw, 2)

    def _patched_scores(self, images: torch.Tensor, target: TargetLike, insert: bool):
        """Scores of every image with ``S(p)`` inserted into the blank (``insert``) or
        replaced by it, ``(B, N)``, and the clean images' scores ``(B,)``."""
        blank = make_blank(self.blank, tuple(images.shape[-2:]), self.mean, self.std, self.blank_seed)
        blank = blank.to(images.device, images.dtype)[0]
        selections = self._pixel_selections(images)[:, None]  # (N, 1, H, W)
        B, n = len(images), selections.shape[0]
        with torch.no_grad():
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
    """

    def _attribute(self, images, target):
        scores, clean = self._patched_scores(images, target, insert=False)
        return (clean[:, None] - scores).unflatten(1, self._grid(images))


class PatchOcclusion(PatchAttribution):
    """captum's ``Occlusion`` with one patch as window and stride: the drop in score when a
    patch is set to ``baseline`` (the normalised zero, i.e. the dataset mean, by default).

    Needs the optional ``baselines`` extra (``pip install "caap-lightning[baselines]"``).
    """

    def __init__(
        self,
        model: nn.Module,
        baseline: float = 0.0,
        score: str = "probability",
        batch_size: int = 64,
        head: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(model, head)
        try:
            from captum.attr import Occlusion
        except ImportError as err:
            raise ImportError(f"the occlusion baseline uses captum, which is not installed: {_INSTALL_BASELINES}") from err
        _check_score(score)
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
        (gh, gw), (ph, pw) = self._grid(images), self.patch_size
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


class RandomMap(PatchAttribution):
    """Uniform random maps from a seeded generator: the reference row of the benchmarks."""

    def __init__(self, model: nn.Module, seed: int = 0, head: Optional[nn.Module] = None) -> None:
        super().__init__(model, head)
        self.generator = torch.Generator().manual_seed(seed)

    def _attribute(self, images, target):
        # A random map ignores the class: the target was only checked, as every method checks it.
        return torch.rand(len(images), *self._grid(images), generator=self.generator).to(images.device)
