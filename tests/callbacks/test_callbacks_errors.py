"""The check's error policy without a Trainer: a failing step is reported where it failed, and the ranks agree on it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from caap_lightning.callbacks.errors import CheckSteps

TITLES = {"classifying": "classifying the probe images", "caap": "CAAP", "model tests": "the model tests"}
CONSEQUENCES = {"classifying": "this check is skipped", "caap": "its maps and their metrics are skipped at this check",
                "model tests": "the model tests are left out of this check"}


def rank(global_rank: int, failed_elsewhere: list) -> SimpleNamespace:
    """A stand-in for one of two ranks; the other rank failed the steps at ``failed_elsewhere`` (positions)."""

    def all_gather(mine: torch.Tensor) -> torch.Tensor:
        other = torch.zeros_like(mine)
        other[failed_elsewhere] = 1.0
        return torch.stack([mine, other] if global_rank == 0 else [other, mine])

    return SimpleNamespace(world_size=2, global_rank=global_rank, is_global_zero=global_rank == 0, current_epoch=3,
                           strategy=SimpleNamespace(all_gather=all_gather))


def test_rank_zero_names_the_step_that_failed_on_the_other_rank():
    steps = CheckSteps(rank(0, [0]), "warn", "CAAPCallback", TITLES, CONSEQUENCES, torch.device("cpu"))
    with pytest.warns(UserWarning, match=r"CAAPCallback: classifying the probe images failed at epoch 3 on rank\(s\) "
                      r"\[1\] \(their warnings say why\); this check is skipped on every rank"):
        assert steps.agree({"classifying": "shard"}, ["classifying"]) == {}
    # Only the step that failed is dropped, and named: here the model tests, not CAAP.
    with pytest.warns(UserWarning, match=r"CAAPCallback: the model tests failed at epoch 3 on rank\(s\) \[1\]"):
        agreed = CheckSteps(rank(0, [1]), "warn", "CAAPCallback", TITLES, CONSEQUENCES, torch.device("cpu")).agree(
            {"caap": "maps", "model tests": True}, ["caap", "model tests"])
    assert agreed == {"caap": "maps"}


def test_a_failing_step_is_reported_on_its_rank_and_skipped():
    steps = CheckSteps(rank(1, []), "warn", "CAAPCallback", TITLES, CONSEQUENCES, torch.device("cpu"))

    def boom():
        raise RuntimeError("boom")

    with pytest.warns(UserWarning, match=r"CAAPCallback: running the model tests failed at epoch 3 on rank 1 "
                      r"\(RuntimeError: boom\); the model tests are left out of this check and training continues"):
        assert steps.attempt("running the model tests", boom, step="model tests") is None
    with pytest.raises(RuntimeError, match="boom"):
        CheckSteps(rank(1, []), "raise", "CAAPCallback", TITLES, CONSEQUENCES, torch.device("cpu")).attempt("x", boom)
