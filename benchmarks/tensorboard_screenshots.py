"""Screenshots of the demo's TensorBoard, as a person sees it: the pictures in ``docs/`` and on the README.

Runs ``make demo``'s fit (``python -m caap_lightning.demo``) into a fresh log folder, serves it with
TensorBoard and photographs three pages with headless Chromium at TensorBoard's default card size:
the Custom Scalars tab (the monitor's alarm and score first), the alarm's text entry and its images.

    python benchmarks/tensorboard_screenshots.py                    # writes docs/images/tensorboard-*.png
    python benchmarks/tensorboard_screenshots.py --logdir runs      # photographs logs that exist already

Needs ``tensorboard`` (in the ``dev`` extra) and a Chromium binary (``--chromium``).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, Optional

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
# Each picture: its file name, the TensorBoard page (hash route and tag filter) and the window size.
PAGES: Dict[str, tuple] = {
    "tensorboard-custom-scalars.png": ("#custom_scalars", (1400, 1100)),
    "tensorboard-alarm-text.png": ("#text&tagFilter=spurious%2Falarm", (1400, 1000)),
    "tensorboard-alarm-images.png": ("#images&tagFilter=spurious%2Falarm", (1400, 1000)),
}
# How long Chromium lets the page's scripts run before it photographs it (TensorBoard loads its data lazily).
RENDER_MS = 20000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_demo(logdir: Path) -> None:
    """The demo's fit, its TensorBoard logs under ``logdir``."""
    subprocess.run([sys.executable, "-m", "caap_lightning.demo", "--trainer.logger.init_args.save_dir", str(logdir)],
                   cwd=ROOT, check=True)


def serve(logdir: Path, port: int) -> subprocess.Popen:
    """TensorBoard on ``port``, once it answers."""
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port),
                               "--bind_all"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=1)
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"TensorBoard did not answer on port {port} within a minute")


def photograph(chromium: str, url: str, size: tuple, out: Path) -> None:
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={RENDER_MS}",
                    f"--screenshot={out}", url], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", type=Path, default=None, help="photograph these logs (default: run the demo)")
    parser.add_argument("--output-dir", type=Path, default=IMAGES)
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        logdir = args.logdir
        if logdir is None:
            logdir = Path(scratch) / "runs"
            run_demo(logdir)
        port = free_port()
        server = serve(logdir, port)
        try:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            for name, (route, size) in PAGES.items():
                photograph(args.chromium, f"http://127.0.0.1:{port}/{route}", size, args.output_dir / name)
                print(f"wrote {args.output_dir / name}", file=sys.stderr)
        finally:
            server.kill()


if __name__ == "__main__":
    main()
