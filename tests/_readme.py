"""The README's example blocks, as the tests that run them read them."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(name: str) -> str:
    """The code of the README's ```python block marked ``<!-- readme-example: name -->``."""
    text = README.read_text()
    match = re.search(rf"<!-- readme-example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README has no example block {name!r}"
    return match.group(1)
