import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import save_file

from caap_lightning.datamodules import SyntheticSpuriousDataModule
from caap_lightning.models import ViTClassifier, load_checkpoint_weights

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny(**kwargs) -> ViTClassifier:
    cfg = dict(num_classes=4, **TINY)
    cfg.update(kwargs)
    return ViTClassifier(**cfg)


def trainer(**kwargs) -> L.Trainer:
    cfg = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    cfg.update(kwargs)
    return L.Trainer(**cfg)


def test_trains_on_synthetic_set_and_logs():
    L.seed_everything(0)
    model = tiny(lr=3e-3, warmup_epochs=0.0)
    data = SyntheticSpuriousDataModule(
        num_classes=4, img_size=32, cue_size=6, cue_correlation=1.0, num_train=64, num_val=32,
        batch_size=32, mean=model.mean, std=model.std,
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))

    def loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model.eval()(batch.images), batch.labels))

    before = loss()
    model.train()
    t = trainer(max_epochs=10)
    t.fit(model, datamodule=data)
    assert loss() < 0.95 * before
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(t.callback_metrics)
    # The logged validation figures are the trained model's on the validation set.
    model.eval()
    with torch.no_grad():
        batches = list(data.val_dataloader())
        logits = torch.cat([model(b.images) for b in batches])
        labels = torch.cat([b.labels for b in batches])
    accuracy = float((logits.argmax(1) == labels).float().mean())
    assert float(t.callback_metrics["val/acc"]) == pytest.approx(accuracy, abs=1e-6)
    expected_loss = float(torch.nn.functional.cross_entropy(logits, labels))
    assert float(t.callback_metrics["val/loss"]) == pytest.approx(expected_loss, rel=1e-5)


def test_normalisation_patch_size_and_attribution_model():
    model = tiny()
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.5, 0.5, 0.5)  # vit_tiny's pretrained_cfg
    assert model.patch_size == 8 and model.get_attribution_model() is model.model
    custom = tiny(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert custom.mean == (0.1, 0.2, 0.3) and custom.std == (0.4, 0.5, 0.6)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_warns_when_datamodule_normalises_differently():
    model = tiny()
    data = SyntheticSpuriousDataModule(num_classes=4, img_size=32, cue_size=4, num_train=32, num_val=32, batch_size=32)
    with pytest.warns(UserWarning, match="normalises with mean"):
        trainer(max_steps=1, limit_val_batches=0).fit(model, datamodule=data)


def test_freeze_backbone_trains_only_the_head():
    model = tiny(freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.head.weight", "model.head.bias"}


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "lightning"])
def test_loads_checkpoint_formats(tmp_path, fmt):
    source = tiny()
    if fmt == "pth":
        path = tmp_path / "weights.pth"
        torch.save(source.model.state_dict(), path)
    elif fmt == "safetensors":
        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    else:
        path = tmp_path / "run.ckpt"
        save_lightning_checkpoint(source, path)
    loaded = tiny(checkpoint_path=str(path))
    for (name, a), b in zip(source.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name


def save_lightning_checkpoint(model: ViTClassifier, path) -> None:
    t = trainer(max_steps=0)
    t.strategy.connect(model)
    t.save_checkpoint(path, weights_only=True)


def test_lightning_checkpoint_reloads_without_the_original_weights(tmp_path):
    weights = tmp_path / "weights.pth"
    torch.save(tiny().model.state_dict(), weights)
    model = tiny(checkpoint_path=str(weights))
    save_lightning_checkpoint(model, tmp_path / "run.ckpt")
    weights.unlink()
    reloaded = ViTClassifier.load_from_checkpoint(tmp_path / "run.ckpt")
    assert reloaded.hparams.checkpoint_path is None and reloaded.patch_size == 8
    assert torch.equal(reloaded.model.pos_embed, model.model.pos_embed)


def test_head_of_another_size_is_reinitialised(tmp_path):
    source = tiny(num_classes=10)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": source.model.state_dict()}, path)
    torch.manual_seed(1)
    loaded = tiny(num_classes=3, checkpoint_path=str(path))
    assert loaded.model.head.weight.shape == (3, 32)
    assert torch.equal(loaded.model.blocks[1].mlp.fc1.weight, source.model.blocks[1].mlp.fc1.weight)
    assert torch.equal(loaded.model.pos_embed, source.model.pos_embed)
    headless = {k: v for k, v in source.model.state_dict().items() if not k.startswith("head.")}
    torch.save(headless, path)
    assert torch.equal(tiny(checkpoint_path=str(path)).model.cls_token, source.model.cls_token)


def test_position_embeddings_are_resampled_for_another_image_size(tmp_path):
    source = tiny()
    path = tmp_path / "weights.pth"
    torch.save(source.model.state_dict(), path)
    loaded = tiny(img_size=48, checkpoint_path=str(path))
    assert loaded.model.pos_embed.shape == (1, 1 + 36, 32)
    assert torch.equal(loaded.model.cls_token, source.model.cls_token)
    from timm.layers import resample_abs_pos_embed

    expected = resample_abs_pos_embed(source.model.pos_embed, (6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(loaded.model.pos_embed, expected)


def test_checkpoint_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tiny(checkpoint_path=str(missing))
    path = tmp_path / "deeper.pth"
    torch.save(tiny(depth=3).model.state_dict(), path)
    with pytest.raises(RuntimeError, match="blocks.2"):
        tiny(checkpoint_path=str(path))
    torch.save(tiny(embed_dim=64).model.state_dict(), path)
    with pytest.raises(RuntimeError, match=r"(?s)deeper.pth.*size mismatch"):
        tiny(checkpoint_path=str(path))
    with pytest.raises(ValueError, match="not both"):
        tiny(pretrained=True, checkpoint_path=str(path))


def test_warmup_then_cosine_schedule():
    model = tiny(lr=1e-3, warmup_epochs=1.0, min_lr_ratio=0.1)
    data = SyntheticSpuriousDataModule(num_classes=4, img_size=32, cue_size=4, num_train=40, num_val=8, batch_size=10,
                                       mean=model.mean, std=model.std)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer(max_epochs=3, limit_val_batches=0, callbacks=[Record()]).fit(model, datamodule=data)
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 1e-4


def test_lightning_cli_exposes_every_argument(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["caap-lightning"])  # the arguments come from args=, not pytest's

    cli = LightningCLI(
        ViTClassifier,
        SyntheticSpuriousDataModule,
        run=False,
        args=[
            "--model.num_classes=3", "--model.img_size=32", "--model.patch_size=8", "--model.embed_dim=32",
            "--model.depth=1", "--model.num_heads=2", "--model.mean=[0.5,0.5,0.5]", "--data.num_classes=3",
            "--data.img_size=32", "--data.cue_correlation=null", "--data.mean=[0.5,0.5,0.5]",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    assert cli.model.patch_size == 8 and cli.model.mean == (0.5, 0.5, 0.5)
    assert cli.datamodule.cue_correlation is None and cli.datamodule.mean == (0.5, 0.5, 0.5)


def test_pretrained_without_network_says_to_use_checkpoint_path(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no download attempts
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # and nothing cached
    with pytest.raises(OSError, match="checkpoint_path"):
        tiny(pretrained=True)


@pytest.mark.parametrize("freeze_backbone", [False, True])
def test_weight_decay_spares_biases_norms_and_tokens_and_frozen_weights_stay_out(freeze_backbone):
    model = tiny(weight_decay=0.05, freeze_backbone=freeze_backbone)
    data = SyntheticSpuriousDataModule(num_classes=4, img_size=32, cue_size=4, num_train=8, num_val=4, batch_size=4,
                                       mean=model.mean, std=model.std)
    fit = trainer(max_steps=1, limit_val_batches=0)
    fit.fit(model, datamodule=data)
    names = {id(p): n for n, p in model.model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in fit.optimizers[0].param_groups}
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert set().union(*groups.values()) == trainable
    expected_decay = {n for n in trainable if n.endswith(".weight") and "norm" not in n}
    assert groups[0.05] == expected_decay
    if not freeze_backbone:
        assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= groups[0.0]


def broken_checkpoints(tmp_path):
    """A 0-byte file, a text file and a checkpoint cut short as a killed save leaves it."""
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    cut = tmp_path / "cut.pth"
    torch.save(tiny().model.state_dict(), cut)
    cut.write_bytes(cut.read_bytes()[:1000])
    return [empty, text, cut]


def test_empty_or_foreign_checkpoint_path_is_named(tmp_path):
    (tmp_path / "empty.safetensors").touch()
    for path in broken_checkpoints(tmp_path) + [tmp_path / "empty.safetensors"]:
        with pytest.raises(ValueError, match=rf"{path.name}.*empty or not a checkpoint"):
            tiny(checkpoint_path=str(path))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x08" + bytes(15))
    with pytest.raises(ValueError, match=r"garbage\.safetensors.*empty or not a checkpoint"):
        load_checkpoint_weights(tiny().model, str(garbage))
    listed = tmp_path / "list.pth"
    torch.save([1, 2], listed)
    with pytest.raises(ValueError, match=r"list\.pth.*empty or not a checkpoint"):
        load_checkpoint_weights(tiny().model, str(listed))


def test_load_from_checkpoint_names_an_empty_or_foreign_file(tmp_path):
    for path in broken_checkpoints(tmp_path):
        with pytest.raises(ValueError, match=rf"{path.name}.*empty or not a checkpoint"):
            ViTClassifier.load_from_checkpoint(path)


def test_fit_with_an_empty_ckpt_path_names_it_and_a_sound_one_resumes(tmp_path):
    data = SyntheticSpuriousDataModule(num_classes=4, img_size=32, cue_size=4, num_train=8, num_val=4, batch_size=4)
    empty = broken_checkpoints(tmp_path)[0]
    model = tiny(mean=data.mean, std=data.std)
    with pytest.raises(ValueError, match=r"empty\.ckpt.*empty or not a checkpoint"):
        trainer(max_epochs=1, limit_val_batches=0).fit(model, datamodule=data, ckpt_path=empty)
    fit = trainer(max_epochs=1, limit_val_batches=0)
    fit.fit(model, datamodule=data)
    fit.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = trainer(max_epochs=2, limit_val_batches=0)
    resumed.fit(tiny(mean=data.mean, std=data.std), datamodule=data, ckpt_path=tmp_path / "epoch1.ckpt")
    assert resumed.global_step == 4  # 2 batches an epoch, 2 epochs
    assert type(resumed.strategy.checkpoint_io) is TorchCheckpointIO  # the Trainer's own IO is back after the fit


def resnet(**kwargs) -> ViTClassifier:
    cfg = dict(model_name="resnet18", num_classes=4, img_size=32, warmup_epochs=0.0)
    cfg.update(kwargs)
    return ViTClassifier(**cfg)


def test_a_timm_cnn_takes_any_image_size_and_is_the_attribution_model():
    model = resnet()  # img_size is the CLI's link from the data: a CNN has no fixed size to set
    assert type(model.model).__name__ == "ResNet" and model.get_attribution_model() is model.model
    assert model.patch_size is None
    assert model.mean == (0.485, 0.456, 0.406) and model.std == (0.229, 0.224, 0.225)  # resnet18's pretrained_cfg
    assert model.eval()(torch.zeros(2, 3, 48, 40)).shape == (2, 4)


@pytest.mark.parametrize("override", [{"patch_size": 8}, {"embed_dim": 32}])
def test_vit_shape_arguments_on_a_cnn_are_refused_by_name(override):
    (name,) = override
    with pytest.raises(ValueError, match=rf"'resnet18' does not take \{{'{name}'.*reshape a ViT"):
        resnet(**override)


@pytest.mark.parametrize("freeze_backbone", [False, True])
def test_a_cnn_trains_with_weight_decay_on_its_conv_and_linear_weights_only(freeze_backbone):
    model = resnet(weight_decay=0.05, freeze_backbone=freeze_backbone)
    data = SyntheticSpuriousDataModule(num_classes=4, img_size=32, cue_size=4, num_train=8, num_val=4, batch_size=4,
                                       mean=model.mean, std=model.std)
    before = model.model.fc.weight.detach().clone()
    fit = trainer(max_steps=1, limit_val_batches=0)
    fit.fit(model, datamodule=data)
    assert not torch.equal(model.model.fc.weight, before)
    names = {id(p): n for n, p in model.model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in fit.optimizers[0].param_groups}
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    if freeze_backbone:
        assert trainable == {"fc.weight", "fc.bias"}
    assert set().union(*groups.values()) == trainable
    assert groups[0.05] == {n for n in trainable if n.endswith(".weight") and "bn" not in n and "downsample.1" not in n}


def test_a_cnn_checkpoint_with_another_head_loads_its_backbone(tmp_path):
    source = resnet(num_classes=10)
    path = tmp_path / "run.ckpt"
    save_lightning_checkpoint(source, path)
    loaded = resnet(num_classes=3, checkpoint_path=str(path))
    assert loaded.model.fc.weight.shape == (3, 512)
    assert torch.equal(loaded.model.layer3[0].conv1.weight, source.model.layer3[0].conv1.weight)


def test_the_cli_fits_a_cnn_by_name(tmp_path):
    from caap_lightning.callbacks import CAAPCallback
    from caap_lightning.cli import cli

    run = cli([
        "fit", "--model.model_name=resnet18", "--model.warmup_epochs=0",
        "--data=caap_lightning.datamodules.SyntheticSpuriousDataModule", "--data.img_size=64", "--data.num_train=8",
        "--data.num_val=4", "--data.batch_size=4", "--trainer.accelerator=cpu", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=caap_lightning.callbacks.CAAPCallback", "--trainer.callbacks.num_images=2",
        "--trainer.callbacks.metrics=[pointing_game]", "--trainer.callbacks.log_images=false",
        "--trainer.callbacks.on_error=raise",
    ])
    (callback,) = [cb for cb in run.trainer.callbacks if isinstance(cb, CAAPCallback)]
    assert type(run.model.model).__name__ == "ResNet" and run.model.hparams.img_size == 64
    assert callback._model is run.model.model and callback.construction == "standard"
    assert len(callback.history) == 1 and 0.0 <= callback.history[0]["caap/pointing_game"] <= 1.0
