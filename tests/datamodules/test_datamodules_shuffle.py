"""The training order is a function of (seed, epoch): a resumed run sees what an uninterrupted one sees."""

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from caap_lightning.datamodules import SyntheticSpuriousDataModule
from caap_lightning.datamodules.base import EpochShuffleSampler


class RecordOrder(L.LightningModule):
    """Records, per epoch, a fingerprint of each training image in the order it came."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = {}

    def training_step(self, batch, batch_idx):
        # The pixel sum identifies a synthetic image and is blind to the random flip.
        fingerprints = batch.images.flatten(1).sum(1).round(decimals=2).tolist()
        self.seen.setdefault(self.current_epoch, []).extend(fingerprints)
        return self.weight * batch.images.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def data() -> SyntheticSpuriousDataModule:
    return SyntheticSpuriousDataModule(num_classes=2, img_size=16, cue_size=4, num_train=12, num_val=4, num_test=4, batch_size=4)


def fit(epochs: int, reload: int, ckpt_path=None, save_to=None) -> RecordOrder:
    model = RecordOrder()
    trainer = L.Trainer(
        max_epochs=epochs, reload_dataloaders_every_n_epochs=reload, limit_val_batches=0, accelerator="cpu",
        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data(), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return model


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
@pytest.mark.parametrize("reload", [0, 1], ids=["loader kept", "loader reloaded every epoch"])
def test_resumed_run_sees_the_uninterrupted_order(tmp_path, reload):
    whole = fit(4, reload).seen
    fit(2, reload, save_to=tmp_path / "epoch2.ckpt")
    resumed = fit(4, reload, ckpt_path=tmp_path / "epoch2.ckpt").seen
    assert sorted(resumed) == [2, 3]
    assert resumed[2] == whole[2] and resumed[3] == whole[3]
    assert all(sorted(whole[e]) == sorted(whole[0]) and len(set(whole[e])) == 12 for e in whole)  # each a permutation
    assert all(whole[e] != whole[e + 1] for e in range(3))  # and a new one every epoch


def test_sampler_order_depends_on_seed_and_epoch_only():
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    assert list(a) == list(a) == list(b) and sorted(a) == list(range(50)) and len(a) == 50
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and list(EpochShuffleSampler(50, seed=4)) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    with pytest.raises(ValueError, match="seed >= 0"):
        EpochShuffleSampler(5, seed=-1)


def test_sampler_under_lightnings_distributed_wrapper():
    """Under DDP Lightning wraps the sampler: the ranks share each epoch's order and set_epoch reaches it."""
    sampler = EpochShuffleSampler(10, seed=0)
    ranks = [DistributedSamplerWrapper(sampler, num_replicas=2, rank=r, shuffle=False) for r in range(2)]

    def epoch(e):
        for rank in ranks:
            rank.set_epoch(e)
        return [list(rank) for rank in ranks]

    zero, one = epoch(0), epoch(1)
    assert sampler.epoch == 1
    assert sorted(zero[0] + zero[1]) == sorted(one[0] + one[1]) == list(range(10))
    assert zero != one and epoch(0) == zero
