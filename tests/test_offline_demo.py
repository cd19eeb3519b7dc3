"""A fresh clone runs the demo with no network and no ../shared: the demo study (config.yaml)
reads only the data bundle in the repository (workflow/resources/demo), whose files match the
checksums its READMEs record, and its summary says that its numbers are a demo slice's."""

from __future__ import annotations

import hashlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import BUNDLE, FULL_DATA, ROOT, SHARED
from .test_workflow import copy_workflow, fake_study, run_snakemake

# every data file the bundle must hold (the layout the offline tasks and the demo read)
BUNDLE_FILES = {
    "alpaca/alpaca_demo.json", "wikitext2/test.rows.jsonl", "evals/piqa/valid.jsonl", "evals/piqa/valid-labels.lst",
    "evals/winogrande/dev.jsonl", "evals/arc/ARC-Easy-Test.jsonl", "evals/arc/ARC-Challenge-Test.jsonl",
    "evals/openbookqa/test.jsonl", "evals/hellaswag/hellaswag_val_full.txt",
}
# options of the blockpruner commands that name data or a model source
PATH_OPTIONS = {"--data", "--local-data", "--model", "--calib", "--prev"}


def readme_checksums() -> dict[str, str]:
    """bundle path -> sha256, from the table of each folder's README.md."""
    sums = {}
    for readme in BUNDLE.rglob("README.md"):
        if readme.parent == BUNDLE:
            continue
        for m in re.finditer(r"^\| (\S+) \|.*\| `([0-9a-f]{64})` \|$", readme.read_text(encoding="utf-8"), re.M):
            sums[str((readme.parent / m.group(1)).relative_to(BUNDLE))] = m.group(2)
    return sums


def test_bundle_files_match_their_readmes():
    """Each data file is listed, with the sha256 of its bytes, in the README beside it; the
    whole bundle stays well under 2 MB."""
    sums = readme_checksums()
    assert set(sums) == BUNDLE_FILES
    for rel, digest in sums.items():
        assert hashlib.sha256((BUNDLE / rel).read_bytes()).hexdigest() == digest, rel
    data = [p for p in BUNDLE.rglob("*") if p.is_file()]
    assert {str(p.relative_to(BUNDLE)) for p in data if p.name != "README.md"} == BUNDLE_FILES
    assert sum(p.stat().st_size for p in data) < 1_000_000
    labels = (BUNDLE / "evals/piqa/valid-labels.lst").read_text().split()
    assert len(labels) == len((BUNDLE / "evals/piqa/valid.jsonl").read_text().splitlines()) == 50


@pytest.mark.skipif(not FULL_DATA, reason=f"{SHARED / 'data'} not found: the bundle is regenerated from it")
def test_bundle_is_what_the_script_makes():
    """make_demo_bundle.py rebuilds the same bytes from ../shared/data (it is reproducible)."""
    p = subprocess.run([sys.executable, str(ROOT / "workflow/scripts/make_demo_bundle.py"), "--check",
                        "--shared", str(SHARED / "data"), "--out", str(BUNDLE)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_demo_plan_reads_only_the_repository(tmp_path):
    """The demo's dry run, offline and with no ../shared beside the copy: every input file and
    every data path of every command lies inside the copy and exists; no hub id is used."""
    main = copy_workflow(tmp_path, messages=False)
    assert not (tmp_path / "shared").exists()
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "BLOCKPRUNER_SHARED": str(tmp_path / "no-shared")}
    p = run_snakemake(main, "-n", "--printshellcmds", env=env)
    out = p.stdout + p.stderr
    inputs = [f for line in re.findall(r"^\s+input: (.*)$", out, re.M) for f in line.split(", ")]
    commands = re.findall(r"^Shell command: (.*)$", out, re.M)
    assert inputs and len(commands) > 20, out[-3000:]

    cfg = yaml.safe_load((main / "config.yaml").read_text())
    made = {f for line in re.findall(r"^\s+output: (.*)$", out, re.M) for f in line.split(", ")}
    data_paths = []
    for cmd in commands:
        words = shlex.split(cmd.split(" > ")[0])
        data_paths += [words[i + 1] for i, w in enumerate(words[:-1]) if w in PATH_OPTIONS]
        if "prepare-model" in words:
            assert words[words.index("prepare-model") + 1] == cfg["models"]["gemma3-270m"]["source"]
            assert cfg["models"]["gemma3-270m"]["source"].startswith("pypi:")  # a package, not a hub id
    assert any("--local-data" in c for c in commands) and any("sample-calibration" in c for c in commands)
    for path in set(inputs) | set(data_paths):
        resolved = (main / path).resolve()
        assert resolved.is_relative_to(main.resolve()), path
        if not path.startswith("results/"):  # data, not an output of another job
            assert resolved.exists(), path
            assert resolved.is_relative_to((main / "workflow/resources/demo").resolve()), path
    assert any(f.startswith("results/") for f in inputs) and made
    for hub in (cfg["calibration"]["alpaca"]["hub"], cfg["evaluate"]["perplexity"]["hub_config"]):
        assert hub not in out, hub
    summarize = next(c for c in commands if "blockpruner.cli summarize" in c)
    assert "--note" in summarize and "demo slice" in summarize


def test_summary_prints_the_note(tmp_path):
    """The config's `note` is a line under the Markdown summary's table; without one, no note line."""
    from blockpruner.cli import main

    files = [str(f) for f in fake_study(tmp_path / "results")]
    note = "Demo study: the data is a demo slice,\n  so these numbers are not the paper's."
    assert main(["summarize", "--csv", str(tmp_path / "s.csv"), "--markdown", str(tmp_path / "s.md"),
                 "--note", note, *files]) == 0
    md = (tmp_path / "s.md").read_text()
    assert "\nNote: Demo study: the data is a demo slice, so these numbers are not the paper's.\n" in md
    assert main(["summarize", "--csv", str(tmp_path / "t.csv"), "--markdown", str(tmp_path / "t.md"), "--note", "",
                 *files]) == 0
    assert "Note:" not in (tmp_path / "t.md").read_text()
