"""Every Python snippet of README.md and docs/export.md runs, as written, on a study's outputs.

The snippets' paths (results/pruned/...) are laid out in a temporary folder with a tiny
materialised model, and each snippet runs there in a fresh interpreter: `python -c '...'`
one-liners of the README's tables and the ```python blocks of docs/export.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from blockpruner.export import materialize
from blockpruner.steps import write_step

from .conftest import ROOT
from .test_export import PATTERN, prepared_tiny, step_record

README_ONE_LINERS = re.compile(r"`python -c '([^']+)'`")
PY_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
PATH = re.compile(r'"(results/pruned/[^"]*)"')


def snippets() -> list[tuple[str, str]]:
    out = [("README.md", code) for code in README_ONE_LINERS.findall((ROOT / "README.md").read_text(encoding="utf-8"))]
    out += [("docs/export.md", code) for code in PY_BLOCK.findall((ROOT / "docs" / "export.md").read_text(encoding="utf-8"))]
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A folder whose results/pruned/... paths (those the snippets name) hold a tiny pruned model."""
    root = tmp_path_factory.mktemp("readme")
    prep, model = prepared_tiny(root / "tiny", "llama")
    write_step(root / "tiny" / "step.json", step_record(model, prep, PATTERN))
    names = {m for _, code in snippets() for m in PATH.findall(code)}
    for name in names:
        materialize.materialize(prep, root / "tiny" / "step.json", root / name.replace("...", "tiny"))
    return root


def test_there_are_snippets():
    assert len(snippets()) >= 2


@pytest.mark.parametrize("where,code", snippets())
def test_snippet_runs(where, code, study):
    code = code.replace("results/pruned/...", "results/pruned/tiny")
    run = subprocess.run([sys.executable, "-c", code], cwd=study, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{where}: {code}\n{run.stderr[-1500:]}"
