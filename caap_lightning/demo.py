"""``make demo``: fit the packaged ``demo.yaml`` through the CLI on CPU, then summarise what the model learnt.

    python -m caap_lightning.demo                       # the whole demo (2 CPU threads)
    python -m caap_lightning.demo --trainer.max_epochs=2   # extra arguments go to the CLI

A tiny ViT learns synthetic shapes whose corner marker (the spurious cue) is easier to see
than the shape. The summary gives the accuracy on cue-consistent and cue-conflicting images,
the CAAP metrics at the first and last checks, and whether and when the monitor raised its alarm.
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional

import torch

from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.cli import cli
from caap_lightning.configs import config_path
from caap_lightning.utils import eval_mode

DEFAULT_CONFIG = config_path("demo.yaml")
# Metrics shown in the summary, in this order, when logged.
SUMMARY_METRICS = (
    "caap/swap_probe_skill",
    "caap/cue_swap_follow_share",
    "caap/background_swap_follow_share",
    "caap/border_swap_follow_share",
    "caap/surround_swap_follow_share",
    "caap/background_swap_ratio",
    "caap/cue_insertion_ratio",
    "caap/background_insertion_ratio",
    "caap/border_insertion_ratio",
    "caap/cue_density_ratio",
    "caap/background_density_ratio",
    "caap/fixed_position_ratio",
    "caap/aupr_fg",
    "caap/pointing_game",
    "caap/insdel",
    "caap/seconds",
)


def cue_accuracy(model: torch.nn.Module, batch, chunk: int = 256) -> Dict[str, tuple]:
    """(count, total) of correct predictions on the cue-consistent and the cue-conflicting images of
    ``batch``, and of the cue-conflicting images predicted as the cue's class (``follows-cue``): a
    model that reads the cue scores high there, one that reads the shape near 0, a blind one
    ``1 / num_classes``."""
    device = next(model.parameters()).device
    with torch.no_grad(), eval_mode(model):
        predictions = torch.cat([model(x.to(device)).argmax(-1).cpu() for x in batch.images.split(chunk)])
    correct = predictions == batch.labels
    consistent = batch.cue_labels == batch.labels
    follows = predictions == batch.cue_labels
    return {
        "cue-consistent": (int(correct[consistent].sum()), int(consistent.sum())),
        "cue-conflicting": (int(correct[~consistent].sum()), int((~consistent).sum())),
        "follows-cue": (int(follows[~consistent].sum()), int((~consistent).sum())),
    }


def _accuracy_line(name: str, counts: Dict[str, tuple]) -> str:
    def share(group: str) -> str:
        c, n = counts[group]
        return f"{c}/{n} ({100.0 * c / max(n, 1):.0f}%)"

    follows, conflicting = counts["follows-cue"]
    return (
        f"  {name}: cue-consistent {share('cue-consistent')}, cue-conflicting {share('cue-conflicting')}, "
        f"of which {follows} ({100.0 * follows / max(conflicting, 1):.0f}%) predicted as the cue's class"
    )


def summary(run, wall_s: float) -> List[str]:
    trainer, model, data = run.trainer, run.model, run.datamodule
    caap = next(cb for cb in trainer.callbacks if isinstance(cb, CAAPCallback))
    monitor = next((cb for cb in trainer.callbacks if isinstance(cb, SpuriousCueMonitor)), None)
    lines = [f"caap-lightning demo: {trainer.current_epoch} epochs in {wall_s:.0f} s"]

    if caap.probe is not None and caap.probe.cue_labels is not None:
        lines.append("Accuracy of the final model (the cue is independent of the label outside training):")
        lines.append(_accuracy_line(f"probe images ({len(caap.probe)})", cue_accuracy(model, caap.probe)))
        validation = data.probe_batch(data.num_val)
        lines.append(_accuracy_line(f"all validation images ({len(validation)})", cue_accuracy(model, validation)))

    if caap.history:
        first, last = caap.history[0], caap.history[-1]
        lines.append(f"CAAP metrics on the probe batch, first check (epoch {first['epoch']}) -> last (epoch {last['epoch']}):")
        for name in SUMMARY_METRICS:
            if name in last:
                lines.append(f"  {name:<34} {first.get(name, float('nan')):8.3f} -> {last[name]:8.3f}")

    if monitor is not None:
        if monitor.alarms:
            alarm = monitor.alarms[0]
            lines.append(
                f"SpuriousCueMonitor: ALARM at epoch {alarm['epoch']} ({monitor.monitor_key} = {alarm['score']:.3f}, "
                f"threshold {monitor.threshold}, patience {monitor.patience}): the model relies on the {monitor.part}."
            )
        else:
            lines.append(f"SpuriousCueMonitor: no alarm ({monitor.monitor_key}, threshold {monitor.threshold}).")

    save_dir = getattr(trainer.logger, "save_dir", None)
    if save_dir is not None:
        lines.append(f"Logs: {trainer.logger.log_dir}")
        lines.append(f"See the heatmaps, metrics and alarm:  tensorboard --logdir {save_dir}")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG),
        help="LightningCLI YAML: a path or a packaged config's name (default: demo.yaml)",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default: 2)")
    args, extra = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    run = cli(["fit", "--config", args.config, *extra])
    print("\n".join(summary(run, time.perf_counter() - start)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
