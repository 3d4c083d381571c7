"""CUDA and bf16 checks: the same numbers on a GPU as on the CPU, and a bf16-mixed training run.

Skipped without a CUDA device: CI has none. Run them on a GPU machine with
``bash benchmarks/gpu_check.sh``, which also runs the speed benchmarks there; the results
are recorded in ``benchmarks/results/gpu.md``.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from scipy.stats import spearmanr

from caap_lightning import CAAP
from caap_lightning.attribution.registry import available_methods, get_method
from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.datamodules import SyntheticSpuriousDataModule
from caap_lightning.metrics.functional import insertion_deletion
from caap_lightning.models import ViTClassifier

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONSTRUCTIONS = ["parallel", "efficient", "windowed", "standard"]


@pytest.fixture(autouse=True)
def _full_fp32():
    """fp32 means fp32 here: TF32 matrix units round to 10 mantissa bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("construction", CONSTRUCTIONS)
def test_caap_on_cuda_matches_the_cpu(vit_factory, construction):
    model = vit_factory(scale=8.0, seed=0, reg_tokens=1)
    images, targets = _images(), torch.tensor([1, 3])
    cpu = CAAP(model, construction=construction).attribute(images, target=targets)
    gpu = CAAP(copy.deepcopy(model).cuda(), construction=construction).attribute(images.cuda(), target=targets.cuda())
    assert gpu.device.type == "cuda"
    assert (cpu.amax((1, 2)) - cpu.amin((1, 2))).min() > 0.02, "maps too flat to compare"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


@pytest.mark.parametrize("construction", ["parallel", "efficient", "windowed"])
def test_bf16_on_cuda_ranks_patches_as_fp32_does(vit_factory, construction):
    model = vit_factory(scale=4.0, seed=0).cuda()
    images, targets = _images(4).cuda(), torch.tensor([0, 1, 2, 3]).cuda()
    caap = CAAP(model, score="logit", construction=construction)
    fp32 = caap.attribute(images, target=targets)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        autocast = caap.attribute(images, target=targets)
    weights = CAAP(copy.deepcopy(model).to(torch.bfloat16), score="logit", construction=construction).attribute(images, target=targets)
    for bf16 in (autocast, weights):
        assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
        # bf16 keeps 8 mantissa bits: errors of a few 1e-3 relative to the logits, so compare on the
        # batch's range (as the CPU test does) and by patch ranks, which is what a heatmap shows.
        assert (bf16 - fp32).abs().max().item() < 0.1 * (fp32.max() - fp32.min()).item()
        rhos = [spearmanr(bf16[i].flatten().cpu(), fp32[i].flatten().cpu()).statistic for i in range(len(fp32))]
        assert min(rhos) > 0.9


def test_insertion_deletion_on_cuda_matches_the_cpu(vit_factory):
    model = vit_factory(scale=4.0, seed=3)
    # Pixel maps with distinct values: both devices rank the pixels identically, so what is left
    # is the forwards' and the blur's rounding (GPU kernels sum in another order).
    images = _images(3, seed=4)
    maps = torch.randperm(3 * 32 * 32, generator=torch.Generator().manual_seed(5)).view(3, 32, 32).float()
    cpu = insertion_deletion(model, images, maps, step=48, batch_size=7)
    gpu = insertion_deletion(copy.deepcopy(model).cuda(), images.cuda(), maps.cuda(), step=48, batch_size=7)
    assert torch.equal(gpu.target.cpu(), cpu.target)
    for name in ("insertion", "deletion", "insertion_curve", "deletion_curve"):
        torch.testing.assert_close(getattr(gpu, name).cpu().double(), getattr(cpu, name).double(), atol=1e-4, rtol=0)


# The random map draws from a CPU generator either way.
BASELINES = [m for m in available_methods() if m not in ("caap", "random")]


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_on_cuda_match_the_cpu(vit_factory, name):
    if name == "occlusion":
        pytest.importorskip("captum")  # the baselines extra
    model = vit_factory(scale=4.0, seed=0)
    images, targets = _images(), torch.tensor([2, 4])
    cpu = get_method(name, model).attribute(images, target=targets)
    gpu = get_method(name, copy.deepcopy(model).cuda()).attribute(images.cuda(), target=targets.cuda())
    assert (cpu.amax((1, 2)) - cpu.amin((1, 2))).min() > 1e-3, "maps too flat to compare"
    scale = (cpu.max() - cpu.min()).item()
    torch.testing.assert_close(gpu.cpu() / scale, cpu / scale, atol=1e-4, rtol=0)


def test_callback_and_monitor_under_bf16_mixed_on_the_gpu(tmp_path, monkeypatch):
    seen = []  # where CAAP's maps are computed, and whether under the Trainer's bf16 autocast
    attribute = CAAP.attribute

    def recording(self, images, *args, **kwargs):
        seen.append((images.device.type, torch.is_autocast_enabled("cuda")))
        return attribute(self, images, *args, **kwargs)

    monkeypatch.setattr(CAAP, "attribute", recording)
    half = (0.5, 0.5, 0.5)
    data = SyntheticSpuriousDataModule(num_classes=3, img_size=32, cue_size=6, num_train=64, num_val=16, num_test=8,
                                       batch_size=16, mean=half, std=half)
    L.seed_everything(0, verbose=False)
    model = ViTClassifier(num_classes=3, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, warmup_epochs=0)
    callback = CAAPCallback(num_images=8, methods=["caap", "gradcam", "rollout"], layer_cutoff="auto", on_error="raise")
    monitor = SpuriousCueMonitor(monitor="caap/cue_mass_ratio")
    trainer = L.Trainer(
        max_epochs=2, accelerator="gpu", devices=1, precision="bf16-mixed", callbacks=[callback, monitor],
        default_root_dir=tmp_path, enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    assert seen and set(seen) == {("cuda", True)}
    assert [row["epoch"] for row in callback.history] == [0, 1]
    assert [h["score"] for h in monitor.history] == [row["caap/cue_mass_ratio"] for row in callback.history]
    for row in callback.history:
        for name in ("insdel", "aupr_fg", "pointing_game", "cue_mass_ratio"):
            for tag in (f"caap/{name}", f"caap/gradcam/{name}", f"caap/rollout/{name}"):
                assert math.isfinite(row[tag]), (tag, row)
    assert [r["layer_cutoff"] for r in callback.calibration] == [0, 1, 2]  # swept in bf16 on the GPU
    assert all(math.isfinite(r["insdel"]) for r in callback.calibration)
    maps = callback.last.maps
    assert maps.shape == (8, 4, 4) and torch.isfinite(maps).all() and maps.std() > 0
