"""Insertion / Deletion AUC (RISE protocol) accumulated over images."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn
from torchmetrics.utilities import dim_zero_cat

from caap_lightning.metrics._checks import TargetLike, check_protocol
from caap_lightning.metrics._detailed_metric import DetailedMetric
from caap_lightning.metrics.functional import default_step, insertion_deletion


class InsertionDeletion(DetailedMetric):
    """Mean insertion and deletion AUCs of maps for ``model`` (RISE protocol).

    ``compute()`` returns the mean InsDel (insertion - deletion AUC), a 0-dim tensor.
    ``compute_details()`` returns ``insertion``, ``deletion``, ``insdel`` (the same as
    ``compute()``) and ``count`` (images scored); ``insertion_informative``,
    ``deletion_informative`` and ``insdel_informative`` are the means over the images
    whose deletion substrate (the all-zero input) is *not* classified as the target,
    since for those that are the deletion curve cannot fall whatever the map;
    ``left_out`` counts the others. With ``per_image``, also ``insertion_per_image``,
    ``deletion_per_image`` and ``substrate_is_target``; with ``curves``, the mean curves
    ``insertion_curve`` and ``deletion_curve`` ``(n + 1,)`` (images of one size only).
    Under DDP the per-image values come gathered rank by rank.

    The model is held by reference, not registered as a submodule: the metric neither
    moves it nor saves its weights. See
    :func:`~caap_lightning.metrics.functional.insertion_deletion` for the protocol.

    Args:
        model: classifier returning logits for model-space (normalised) images.
        step: pixels per step; default one patch of a timm ViT (``patch_size ** 2``).
        blur_kernel, blur_sigma: RISE's blur for the insertion substrate.
        batch_size: perturbed images per forward pass.
        per_image: keep per-image AUCs for ``compute_details()``.
        curves: keep the curves and report their means.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    main_key = "insdel"

    def __init__(
        self,
        model: nn.Module,
        step: Optional[int] = None,
        blur_kernel: int = 11,
        blur_sigma: float = 5.0,
        batch_size: int = 64,
        per_image: bool = False,
        curves: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.step = default_step(model) if step is None else step
        check_protocol(self.step, blur_kernel, blur_sigma, batch_size)
        # Bypass nn.Module registration so the model stays out of the metric's state_dict.
        object.__setattr__(self, "model", model)
        self.blur_kernel = blur_kernel
        self.blur_sigma = blur_sigma
        self.batch_size = batch_size
        self.per_image = per_image
        self.curves = curves

        for name in ("insertion", "deletion", "insertion_informative", "deletion_informative"):
            self.add_state(f"{name}_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("left_out", torch.tensor(0), dist_reduce_fx="sum")
        if per_image:
            for name in ("insertion_per_image", "deletion_per_image", "substrate_is_target"):
                self.add_state(name, [], dist_reduce_fx="cat")
        if curves:
            self.add_state("insertion_curves", [], dist_reduce_fx="cat")
            self.add_state("deletion_curves", [], dist_reduce_fx="cat")

    def update(self, images: Tensor, maps: Tensor, target: TargetLike = None) -> None:
        """Score a batch; arguments as :func:`~caap_lightning.metrics.functional.insertion_deletion` takes them."""
        result = insertion_deletion(
            self.model,
            images,
            maps,
            target=target,
            step=self.step,
            blur_kernel=self.blur_kernel,
            blur_sigma=self.blur_sigma,
            batch_size=self.batch_size,
        )
        insertion, deletion = result.insertion.to(self.device), result.deletion.to(self.device)
        informative = ~result.substrate_is_target.to(self.device)
        self.insertion_sum += insertion.sum()
        self.deletion_sum += deletion.sum()
        self.insertion_informative_sum += insertion[informative].sum()
        self.deletion_informative_sum += deletion[informative].sum()
        self.count += insertion.numel()
        self.left_out += int((~informative).sum())
        if self.per_image:
            self.insertion_per_image.append(insertion)
            self.deletion_per_image.append(deletion)
            self.substrate_is_target.append(~informative)
        if self.curves:
            if self.insertion_curves and self.insertion_curves[0].shape[1] != result.insertion_curve.shape[1]:
                raise ValueError("mean curves need images of one size and one step: the number of steps changed")
            self.insertion_curves.append(result.insertion_curve.to(self.device))
            self.deletion_curves.append(result.deletion_curve.to(self.device))

    def _details(self) -> Dict[str, Tensor]:
        insertion = self.insertion_sum / self.count
        deletion = self.deletion_sum / self.count
        informative = self.count - self.left_out
        insertion_informative = self.insertion_informative_sum / informative
        deletion_informative = self.deletion_informative_sum / informative
        out = {
            "insertion": insertion,
            "deletion": deletion,
            "insdel": insertion - deletion,
            "insertion_informative": insertion_informative,
            "deletion_informative": deletion_informative,
            "insdel_informative": insertion_informative - deletion_informative,
            "count": self.count,
            "left_out": self.left_out,
        }
        if self.per_image:
            out["insertion_per_image"] = dim_zero_cat(self.insertion_per_image)
            out["deletion_per_image"] = dim_zero_cat(self.deletion_per_image)
            out["substrate_is_target"] = dim_zero_cat(self.substrate_is_target)
        if self.curves:
            out["insertion_curve"] = dim_zero_cat(self.insertion_curves).mean(0)
            out["deletion_curve"] = dim_zero_cat(self.deletion_curves).mean(0)
        return out
