"""The ``caap-lightning`` command (a LightningCLI arrives with the callbacks)."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    print("usage: caap-lightning {fit,validate,test,predict} --config CONFIG.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
