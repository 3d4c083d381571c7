"""``python -m caap_lightning.configs``: the packaged configs and their paths; with a name, that config's path.

    python -m caap_lightning.configs                   # every packaged config, one per line
    cp "$(python -m caap_lightning.configs demo.yaml)" my_run.yaml
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from caap_lightning.configs import config_path, packaged_configs


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="a packaged config's file name, e.g. demo.yaml")
    args = parser.parse_args(argv)
    if args.name is not None:
        try:
            print(config_path(args.name))
        except ValueError as error:
            parser.error(str(error))
        return 0
    for name in packaged_configs():
        print(f"{name:<24} {config_path(name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
