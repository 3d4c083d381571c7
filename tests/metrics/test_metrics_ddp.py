"""Two gloo processes with half the data each report what one process with all of it does."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn


def test_ddp_two_processes_match_one(tmp_path, monkeypatch):
    # Spawned processes import the worker by name, so its folder goes on sys.path.
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    worker = importlib.import_module("_metrics_ddp_worker")

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    masks = torch.rand(8, 12, 12, generator=generator) < 0.3
    masks[1] = False  # skipped by AUPR1, the pointing game
    masks[6] = True  # skipped by AUPR0 and the outside mass
    data = {
        "images": torch.randn(8, 3, 12, 12, generator=generator),
        "maps": torch.randn(8, 3, 3, generator=generator),
        "masks": masks,
        # Varied targets: the zero substrate is classified as some of them, not all.
        "target": torch.arange(8) % 3,
    }
    out_path = tmp_path / "ddp.pt"
    mp.spawn(worker.run, args=(2, worker.free_port(), model, data, str(out_path)), nprocs=2, join=True)

    distributed = torch.load(out_path)
    single = worker.compute_all(model, data)
    assert int(single["aupr1"]["skipped"]) == 1 and int(single["aupr0"]["skipped"]) == 1
    assert int(single["insdel"]["count"]) == 8 and 0 < int(single["insdel"]["left_out"]) < 8
    main = {"insdel": "insdel", "aupr1": "aupr", "aupr0": "aupr", "pointing_game": "pointing_game",
            "mass": "attribution_mass"}
    for name, values in single.items():
        assert values["compute"].dim() == 0 and torch.equal(values["compute"], values[main[name]])
        assert distributed[name].keys() == values.keys()
        for key, value in values.items():
            torch.testing.assert_close(distributed[name][key], value, msg=f"{name}/{key}")
