"""``ViTClassifier``: a timm model (a ViT or a CNN) fine-tuned (or trained from scratch) as a LightningModule."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import IO, Any, Dict, Mapping, Optional, Tuple, Union

import lightning as L
import timm
import timm.optim
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from timm.models import load_state_dict as timm_load_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torchmetrics.classification import MulticlassAccuracy

from caap_lightning.utils import model_normalization

# A Lightning checkpoint of this module stores the timm model's weights under this prefix.
_LIGHTNING_PREFIX = "model."
# torch.save writes a zip archive; its legacy format (and plain pickles) start with pickle's PROTO opcode.
_PICKLE_PROTO = b"\x80"
# ViTClassifier arguments that reshape a timm ViT: other architectures (CNNs) take none of them.
_VIT_SHAPE = ("patch_size", "embed_dim", "depth", "num_heads")


def check_checkpoint_file(path: Union[str, Path], safetensors: bool = False) -> Path:
    """Fail, naming ``path``, unless it is a non-empty torch checkpoint (or, if allowed, safetensors) file.

    torch.load reports an empty or truncated file as a bare ``EOFError`` or ``KeyError``; a run
    killed while saving leaves one behind.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {str(path)!r} is empty or not a checkpoint: it has 0 bytes (was its saving cut short?)")
    if safetensors and path.suffix == ".safetensors":
        return path  # its header is checked when it is read
    with path.open("rb") as file:
        starts_as_pickle = file.read(1) == _PICKLE_PROTO
    if not (starts_as_pickle or zipfile.is_zipfile(path)):
        raise ValueError(
            f"checkpoint {str(path)!r} is empty or not a checkpoint: neither a torch.save zip archive (complete, "
            "with its central directory) nor a pickle; was its saving cut short, or is it another kind of file?"
        )
    return path


def load_checkpoint_weights(model: torch.nn.Module, checkpoint_path: str) -> None:
    """Load a timm/safetensors/torch state dict (or a Lightning checkpoint) into ``model``.

    A classifier head of another size is dropped and left at its fresh initialisation, as timm
    does for a pretrained model with a new ``num_classes``; every other key must match. Position
    embeddings saved at another image size are resampled (timm's ViT checkpoint filter).
    """
    path = check_checkpoint_file(checkpoint_path, safetensors=True)
    state_dict = read_state_dict(path)
    if any(k.startswith(_LIGHTNING_PREFIX) for k in state_dict):
        state_dict = {k[len(_LIGHTNING_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_LIGHTNING_PREFIX)}
    if isinstance(model, VisionTransformer):
        # Resamples position embeddings (and patch embeddings) saved at another image/patch size.
        state_dict = checkpoint_filter_fn(state_dict, model)

    own = model.state_dict()
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    head_keys = {k for k in own if k == head or k.startswith(head + ".")}
    # A head of another size (or none, for a headless backbone) stays at its fresh initialisation.
    state_dict = {k: v for k, v in state_dict.items() if k not in head_keys or v.shape == own[k].shape}
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:
        raise RuntimeError(f"checkpoint {str(path)!r} does not fit {type(model).__name__}: {error}") from error
    missing = set(result.missing_keys) - head_keys
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: "
            f"missing keys {sorted(missing)}, unexpected keys {sorted(result.unexpected_keys)}"
        )


def read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """timm's reading of a state dict, with a failure that names the file."""
    try:
        state_dict = timm_load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as error:  # torch.load, safetensors and timm's unpacking each raise their own types
        raise ValueError(
            f"cannot read a state dict from checkpoint {str(path)!r} (empty or not a checkpoint?): {error}"
        ) from error
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"checkpoint {str(path)!r} is empty or not a checkpoint: it holds a {type(state_dict).__name__}, not a state dict"
        )
    return state_dict


def _is_local_file_path(path: Any) -> bool:
    # Lightning also loads from URLs, fsspec paths and open files; those are left to it.
    return isinstance(path, (str, Path)) and "://" not in str(path) and Path(path).is_file()


class _CheckedCheckpointIO(_WrappingCheckpointIO):
    """The Trainer's checkpoint IO, with :func:`check_checkpoint_file` before each load from a local file.

    Lightning's wrapper base (as its ``AsyncCheckpointIO``), so that every strategy accepts it.
    """

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        if _is_local_file_path(path):
            check_checkpoint_file(path)
        return super().load_checkpoint(path, *args, **kwargs)

    def teardown(self) -> None:
        self.checkpoint_io.teardown()


class ViTClassifier(L.LightningModule):
    """An image classifier around any timm model, with AdamW, warmup + cosine and accuracy logging.

    ``model_name`` is any timm architecture: a ViT (``vit_tiny_patch16_224``) or a CNN
    (``resnet18``, ``convnext_atto``, ...); the callbacks attribute it through ``.model``.
    ``pretrained`` downloads timm's weights; ``checkpoint_path`` loads local ones instead (a
    head of another size is re-initialised). ``img_size`` is given to architectures whose input
    size timm fixes (``pretrained_cfg.fixed_input_size``: ViTs); a CNN takes any size.
    ``patch_size``, ``embed_dim``, ``depth`` and ``num_heads`` override a ViT's architecture,
    for tiny models trained from scratch; ``drop_path_rate`` needs a model with stochastic depth.
    ``mean``/``std`` (the input normalisation) come from timm's ``pretrained_cfg`` unless given.
    Batches are :class:`~caap_lightning.datamodules.ProbeBatch` or ``(images, labels)`` pairs.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int = 1000,
        img_size: Optional[int] = 224,
        patch_size: Optional[int] = None,
        embed_dim: Optional[int] = None,
        depth: Optional[int] = None,
        num_heads: Optional[int] = None,
        drop_path_rate: float = 0.0,
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
        freeze_backbone: bool = False,
        mean: Optional[Tuple[float, float, float]] = None,
        std: Optional[Tuple[float, float, float]] = None,
    ):
        super().__init__()
        if pretrained and checkpoint_path is not None:
            raise ValueError("set either pretrained=True (timm's weights) or checkpoint_path (local weights), not both")
        if num_classes < 1 or lr <= 0 or weight_decay < 0 or warmup_epochs < 0:
            raise ValueError(
                f"need num_classes >= 1, lr > 0, weight_decay >= 0, warmup_epochs >= 0; got num_classes={num_classes}, "
                f"lr={lr}, weight_decay={weight_decay}, warmup_epochs={warmup_epochs}"
            )
        if not 0.0 <= label_smoothing < 1.0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1) and min_lr_ratio in [0, 1], got {label_smoothing}, {min_lr_ratio}")
        self.save_hyperparameters()

        overrides = architecture_overrides(
            model_name, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, drop_path_rate=drop_path_rate,
        )
        try:
            self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **overrides)
        except TypeError as error:
            raise ValueError(
                f"timm's {model_name!r} does not take {overrides} ({error}); {', '.join(_VIT_SHAPE)} reshape a ViT "
                "(leave them unset for other architectures) and drop_path_rate needs a model with stochastic depth"
            ) from error
        except OSError as error:
            if not pretrained:
                raise
            raise OSError(
                f"pretrained=True could not fetch timm's weights for {model_name!r} ({error}); offline, "
                "download them once elsewhere and pass the file as checkpoint_path (with pretrained=False)"
            ) from error
        if checkpoint_path is not None:
            load_checkpoint_weights(self.model, checkpoint_path)
        if freeze_backbone:
            self.model.requires_grad_(False)
            self.model.get_classifier().requires_grad_(True)

        self._mean, self._std = model_normalization(self.model, mean, std)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    @property
    def mean(self) -> Tuple[float, ...]:
        return self._mean

    @property
    def std(self) -> Tuple[float, ...]:
        return self._std

    @property
    def patch_size(self) -> Optional[int]:
        """The (square) patch side in pixels; ``None`` for a model without a patch embedding."""
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is None:
            return None
        size = patch_embed.patch_size
        return int(size[0]) if isinstance(size, (tuple, list)) else int(size)

    def get_attribution_model(self) -> torch.nn.Module:
        return self.model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Union[str, Path, IO], *args: Any, **kwargs: Any) -> "ViTClassifier":
        """Lightning's ``load_from_checkpoint``, failing first (naming the file) on an empty or foreign file."""
        if _is_local_file_path(checkpoint_path):
            check_checkpoint_file(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def setup(self, stage: str) -> None:
        self._check_checkpoint_loads()
        datamodule = self.trainer.datamodule
        data_mean, data_std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if data_mean is not None and data_std is not None:
            if not (_close(data_mean, self.mean) and _close(data_std, self.std)):
                rank_zero_warn(
                    f"the datamodule normalises with mean={tuple(data_mean)}, std={tuple(data_std)} but the model "
                    f"expects mean={self.mean}, std={self.std}; set the datamodule's mean/std (or the model's) to match"
                )

    def _check_checkpoint_loads(self) -> None:
        # Trainer.fit(ckpt_path=...) loads the file after the setup hooks, and trainer.ckpt_path is set
        # only as loading starts; checking in the Trainer's checkpoint IO is the first point that sees it.
        strategy = self.trainer.strategy
        if not isinstance(strategy.checkpoint_io, _CheckedCheckpointIO):
            strategy.checkpoint_io = _CheckedCheckpointIO(strategy.checkpoint_io)

    def teardown(self, stage: str) -> None:
        # The Trainer is left with the checkpoint IO it came with.
        strategy = self.trainer.strategy
        if isinstance(strategy.checkpoint_io, _CheckedCheckpointIO):
            strategy.checkpoint_io = strategy.checkpoint_io.checkpoint_io

    @staticmethod
    def unpack(batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        if hasattr(batch, "images") and hasattr(batch, "labels"):
            return batch.images, batch.labels
        if isinstance(batch, dict):
            return batch["images"], batch["labels"]
        return batch[0], batch[1]

    def _step(self, batch: Any, stage: str, accuracy: MulticlassAccuracy) -> torch.Tensor:
        images, labels = self.unpack(batch)
        logits = self(images)
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        accuracy(logits, labels)
        n = labels.shape[0]
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=n)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(self.unpack(batch)[0]).softmax(-1)

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # The checkpoint holds the weights: reloading it must not need timm's download or the original file.
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:
            hparams["pretrained"] = False
            hparams["checkpoint_path"] = None

    def configure_optimizers(self) -> Dict[str, Any]:
        # timm's grouping: no weight decay on biases, norms and the tokens a ViT names in no_weight_decay()
        # (a CNN has no such list); frozen parameters left out.
        no_decay = getattr(self.model, "no_weight_decay", None)
        groups = timm.optim.param_groups_weight_decay(
            self.model, self.hparams.weight_decay, no_weight_decay_list=no_decay() if callable(no_decay) else ()
        )
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.hparams.lr)
        total = self.trainer.estimated_stepping_batches  # also sets up the train loader, for the line below
        per_epoch = self.trainer.num_training_batches / self.trainer.accumulate_grad_batches
        warmup = int(self.hparams.warmup_epochs * per_epoch) if math.isfinite(per_epoch) else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total, self.hparams.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def architecture_overrides(
    model_name: str, img_size: Optional[int], drop_path_rate: float, **vit_shape: Any
) -> Dict[str, Any]:
    """The arguments of ``ViTClassifier`` that ``timm.create_model(model_name)`` is to get.

    ``img_size`` only where timm fixes the input size (a ViT's position embeddings; a CNN takes
    any size, and most do not take the argument), ``drop_path_rate`` only where set (not every
    CNN has stochastic depth), the ViT shape arguments where given: the architecture's own
    values stand for the rest.
    """
    cfg = timm.models.get_pretrained_cfg(model_name)
    fixed_size = cfg is None or cfg.fixed_input_size  # an unknown name is left for create_model to name
    overrides = {k: v for k, v in vit_shape.items() if v is not None}
    if img_size is not None and fixed_size:
        overrides["img_size"] = img_size
    if drop_path_rate:
        overrides["drop_path_rate"] = drop_path_rate
    return overrides


def warmup_cosine(warmup_steps: int, total_steps: float, min_ratio: float = 0.0):
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps`` (flat if unbounded)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not math.isfinite(total_steps) or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _close(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) < 1e-6 for x, y in zip(a, b))
