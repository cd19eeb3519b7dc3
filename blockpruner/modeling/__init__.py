"""The package's own model classes for the directories it writes, below every stage:
`pruned` (materialised directories) and `sliced` (SliceGPT), each a loader beside the
self-contained modeling file it ships (`pruned_modeling.py`, `sliced_modeling.py`). Those
directories are always loaded with these classes, never with the directory's Python."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def read_config(directory: str | Path, fix: str = "prepare the model again") -> dict:
    """A model directory's config.json, parsed; a one-line error naming `fix` where there is none."""
    f = Path(directory) / "config.json"
    if not f.exists():
        raise UserError(f"{directory}: no config.json; {fix}")
    return json.loads(f.read_text(encoding="utf-8"))
