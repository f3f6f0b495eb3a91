"""The last step of every benchmark: its result as JSON, printed and written to ``--out``."""
from __future__ import annotations

import json
from pathlib import Path


def save(result: dict, out: Path | None, name: str) -> None:
    """Write ``result`` to ``OUT/NAME`` as indented JSON (nothing without ``--out``)."""
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(result, indent=2) + "\n")


def report(result: dict, out: Path | None, name: str) -> dict:
    """Print ``result`` as indented JSON, :func:`save` it, and return it."""
    print(json.dumps(result, indent=2))
    save(result, out, name)
    return result
