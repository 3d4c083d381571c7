"""The callbacks' error policy: a failing step of a check is reported and skipped (or raised), on every rank alike."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

OnError = Literal["warn", "raise"]
ON_ERROR = ("warn", "raise")
SKIPPED = "this check is skipped"


class CheckFailed(Exception):
    """A step of a check failed and was reported (``on_error="warn"``); the step is skipped."""


def guarded(
    trainer: L.Trainer, on_error: str, what: str, epoch: int, fn: Callable, *args: Any, skipped: str = SKIPPED
) -> Any:
    """``fn(*args)``; with ``on_error="warn"`` a failure is reported and raised as :class:`CheckFailed`.

    The warning is given on the rank where the failure happened (``rank_zero_warn`` would hide
    a failure on any other rank).
    """
    if on_error == "raise":
        return fn(*args)
    try:
        return fn(*args)
    except Exception as exc:  # a monitor must not end the training it watches
        where = f" on rank {trainer.global_rank}" if trainer.world_size > 1 else ""
        warnings.warn(
            f"{what} failed at epoch {epoch}{where} ({type(exc).__name__}: {exc}); {skipped} and training "
            "continues. Set on_error='raise' to stop on it instead.",
            stacklevel=3,
        )
        raise CheckFailed from exc


def attempt(
    trainer: L.Trainer, on_error: str, what: str, epoch: int, fn: Callable, *args: Any, skipped: str = SKIPPED
) -> Optional[Any]:
    """``fn(*args)`` under :func:`guarded`; ``None`` where it failed and was reported."""
    try:
        return guarded(trainer, on_error, what, epoch, fn, *args, skipped=skipped)
    except CheckFailed:
        return None


def agree_on_failures(
    trainer: L.Trainer, steps: Sequence[str], done: Dict[str, Any], epoch: int, titles: Dict[str, str],
    consequences: Dict[str, str], device: torch.device,
) -> Dict[str, Any]:
    """The outputs in ``done`` of the ``steps`` that succeeded on every rank; every rank learns which failed where.

    So no rank waits in a collective that the others skip, and a rank whose own step worked says
    which other rank made it skip (that rank's warning gives the cause). ``titles`` name each
    step in the message, ``consequences`` say what its failure skips.
    """
    if trainer.world_size == 1:
        return {name: done[name] for name in steps if name in done}
    failed = torch.tensor([float(name not in done) for name in steps], device=device)
    per_rank = trainer.strategy.all_gather(failed).reshape(trainer.world_size, len(steps)).cpu()
    agreed = {}
    for j, name in enumerate(steps):
        ranks: List[int] = [r for r in range(trainer.world_size) if per_rank[r, j] > 0]
        if not ranks:
            agreed[name] = done[name]
        elif name in done and trainer.is_global_zero:
            rank_zero_warn(
                f"CAAPCallback: {titles[name]} failed at epoch {epoch} on rank(s) {ranks} (their warnings say "
                f"why); {consequences[name]} on every rank."
            )
    return agreed


class CheckSteps:
    """One check's error policy: each step under ``on_error`` (:func:`attempt`), and the ranks' agreement on which
    steps failed (:func:`agree_on_failures`). ``titles`` name the steps, ``consequences`` say what a failure skips."""

    def __init__(self, trainer: L.Trainer, on_error: str, who: str, titles: Dict[str, str],
                 consequences: Dict[str, str], device: torch.device) -> None:
        self.trainer, self.on_error, self.who, self.device = trainer, on_error, who, device
        self.titles, self.consequences = titles, consequences

    def attempt(self, what: str, fn: Callable, *args: Any, step: Optional[str] = None) -> Optional[Any]:
        """``fn(*args)``; ``None`` where it failed and was reported (what a failing ``step`` skips, in the warning)."""
        skipped = SKIPPED if step is None else self.consequences[step]
        return attempt(self.trainer, self.on_error, f"{self.who}: {what}", self.trainer.current_epoch, fn, *args,
                       skipped=skipped)

    def agree(self, done: Dict[str, Any], steps: Sequence[str]) -> Dict[str, Any]:
        return agree_on_failures(self.trainer, steps, done, self.trainer.current_epoch, self.titles,
                                 self.consequences, self.device)
