"""The README's copy-paste example runs as printed and logs what it says."""

from __future__ import annotations

import pytest

from _readme import README, readme_block


def test_the_own_module_example_runs_and_logs_heatmaps(tmp_path, monkeypatch, events_reader):
    monkeypatch.chdir(tmp_path)  # Lightning's default logger writes lightning_logs/ here
    namespace: dict = {}
    exec(compile(readme_block("own-module"), str(README), "exec"), namespace)
    caap = namespace["caap"]
    assert len(caap.history) == 2 and "caap/insdel" in caap.last.metrics
    events = events_reader(tmp_path / "lightning_logs")
    assert len(events["images"]["caap/heatmaps"]) == 2
    last = events["scalars"]["caap/insdel"][max(events["scalars"]["caap/insdel"])]
    assert last == pytest.approx(caap.last.metrics["caap/insdel"], rel=1e-6)  # float32 in the event file
