"""What CAAPCallback adds to a training epoch of the demo, with its default settings; one JSON line.

Runs the packaged ``demo.yaml`` through the CLI (CPU, 2 threads, its 4 epochs) and times, in the
same run, each epoch (training + validation + the check) and each ``CAAPCallback`` check, in
wall-clock and process CPU seconds. The overhead is check / (epoch - check): the share the check
adds to an epoch without it. The summary is the median over the epochs: on a shared machine a
single check can take several times its usual time. The first epoch also draws the synthetic
images (cached afterwards) and the first check pays one-off costs (imports).

Then, on the trained model, it alternates ``--rounds`` times four training steps (one batch of
the demo, forward + backward + AdamW) with one check (run through ``trainer.validate``, only the
check timed): ``overhead_interleaved`` = median check / (training steps per epoch x median
step), which contention on a shared machine biases least (both are timed in the same minute).
With ``--paired``, it then alternates checks with each named CAAP construction on that model
and reports their check and ``attribute`` times side by side.

    python benchmarks/callback_overhead.py
    python benchmarks/callback_overhead.py --epochs 2
    python benchmarks/callback_overhead.py --epochs 2 --rounds 0 --paired parallel windowed
    python benchmarks/callback_overhead.py --swap-images 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List

import torch

from caap_lightning import CAAP
from caap_lightning.callbacks import CAAPCallback
from caap_lightning.cli import cli
from caap_lightning.configs import config_path

from harness import EpochClock

CONFIG = config_path("demo.yaml")


def interleave(run: Any, clock: EpochClock, rounds: int) -> Dict[str, Any]:
    """Median check and training-step times, measured alternately on the trained model."""
    trainer, model, data = run.trainer, run.model, run.datamodule
    batch = next(iter(data.train_dataloader()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    steps, checks = [], []
    for _ in range(rounds):
        model.train()
        start = time.perf_counter()
        for _ in range(4):
            loss = torch.nn.functional.cross_entropy(model(batch.images), batch.labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        steps.append((time.perf_counter() - start) / 4)
        trainer.validate(model, datamodule=data, verbose=False)
        checks.append(clock._check[0])
    steps_per_epoch = len(data.train_dataloader())
    check, step = statistics.median(checks), statistics.median(steps)
    return {
        "interleaved": {"check_wall_s": [round(c, 2) for c in checks], "step_wall_s": [round(s, 3) for s in steps]},
        "steps_per_epoch": steps_per_epoch,
        "overhead_interleaved": round(check / (steps_per_epoch * step), 4),
    }


def paired(run: Any, clock: EpochClock, constructions: List[str], rounds: int) -> Dict[str, Any]:
    """Check and CAAP ``attribute`` times of each construction in ``constructions`` on the trained model,
    alternated ``rounds`` times: the same model, data and minute for all, so the ratio is the
    least biased comparison on a shared machine."""
    trainer, model, data = run.trainer, run.model, run.datamodule
    caap = next(cb for cb in trainer.callbacks if isinstance(cb, CAAPCallback))
    times: Dict[str, Dict[str, List[float]]] = {c: {"check_wall_s": [], "attribute_wall_s": []} for c in constructions}
    fitted_with = caap.construction
    attribute = CAAP.attribute
    try:
        for _ in range(rounds):
            for construction in constructions:
                caap.construction = construction  # the callback rebuilds CAAP at the next check's setup
                spent: List[float] = []
                CAAP.attribute = timed(attribute, spent)
                trainer.validate(model, datamodule=data, verbose=False)
                times[construction]["check_wall_s"].append(round(clock._check[0], 3))
                times[construction]["attribute_wall_s"].append(round(sum(spent), 3))
    finally:
        CAAP.attribute = attribute
        caap.construction = fitted_with  # the JSON's "callback" describes the fit
    medians = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    first = constructions[0]
    return {
        "paired": times,
        "paired_median": medians,
        "paired_check_ratio": {m: round(medians[m]["check_wall_s"] / medians[first]["check_wall_s"], 3) for m in constructions},
        "paired_attribute_ratio": {
            m: round(medians[m]["attribute_wall_s"] / medians[first]["attribute_wall_s"], 3) for m in constructions
        },
    }


def timed(fn: Callable, spent: List[float]) -> Callable:
    """``fn``, appending the wall seconds of each call to ``spent``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    return wrapper


def with_swap_images(run: Any, swap_images: int) -> None:
    """Build the config's ``CAAPCallback`` again from its own arguments, with ``swap_images`` swap images."""
    index = next(i for i, cb in enumerate(run.trainer.callbacks) if isinstance(cb, CAAPCallback))
    spec = next(spec for spec in run.config["trainer"]["callbacks"] if spec.class_path.endswith(".CAAPCallback"))
    run.trainer.callbacks[index] = CAAPCallback(**{**spec.init_args.as_dict(), "swap_images": swap_images})


def main() -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds after the fit (0: none)")
    parser.add_argument("--paired", nargs="+", default=[], metavar="CONSTRUCTION",
                        help="after the fit, alternate checks with these CAAP constructions (e.g. parallel windowed)")
    parser.add_argument("--paired-rounds", type=int, default=8)
    parser.add_argument("--swap-images", type=int, default=None,
                        help="the CAAPCallback's swap probe (default: the callback's own default)")
    args, extra = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    clock = EpochClock()
    with tempfile.TemporaryDirectory() as tmp:
        run = cli(
            [
                "--config", str(CONFIG),
                f"--trainer.max_epochs={args.epochs}",
                f"--trainer.logger.init_args.save_dir={tmp}",
                f"--trainer.default_root_dir={tmp}",
                *extra,
            ],
            run=False,
        )
        if args.swap_images is not None:
            with_swap_images(run, args.swap_images)
        run.trainer.callbacks.insert(0, clock)
        run.trainer.fit(run.model, datamodule=run.datamodule)
        interleaved = interleave(run, clock, args.rounds) if args.rounds else {}
        comparison = paired(run, clock, args.paired, args.paired_rounds) if args.paired else {}
    caap = next(cb for cb in run.trainer.callbacks if isinstance(cb, CAAPCallback))
    result = {
        "benchmark": "callback_overhead",
        "config": "caap_lightning/configs/demo.yaml",
        "callback": {k: getattr(caap, k) for k in ("num_images", "swap_images", "methods", "construction", "window", "selection", "insertion_deletion_steps")},
        "metrics": caap.active_metrics,
        "epochs": clock.rows,
        "overhead_wall_median": statistics.median(r["overhead_wall"] for r in clock.rows),
        "overhead_cpu_median": statistics.median(r["overhead_cpu"] for r in clock.rows),
        "overhead_wall_total": round(
            sum(r["check_wall_s"] for r in clock.rows) / sum(r["epoch_wall_s"] - r["check_wall_s"] for r in clock.rows), 4
        ),
        **interleaved,
        **comparison,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
