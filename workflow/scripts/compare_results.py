"""Compare two runs of a study, value by value: are their artifacts the same, timings aside?

    python workflow/scripts/compare_results.py RUN_A RUN_B

RUN_A and RUN_B are folders holding a study's results/ (e.g. a checkout before and after a
change, run with the same config and thread count). Every artifact under results/ is
compared: JSON artifacts key by key (every search step's scores and choice, calibration
samples, manifests and weight hashes, every evaluation value), CSV tables cell by cell,
weights and token files by sha256, other text files byte by byte. Wall-clock figures (job
timings, generation speed, peak memory) and the checksums derived from them are left out:
they differ between any two runs. Exit status 1 when anything else differs or is missing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path

# Keys and CSV columns that hold measured time or memory, never a computed result.
TIMING = {"timing", "elapsed_s", "select_s", "pruning_s", "step_jobs_s", "shards_elapsed_s", "prefill_s", "gen_mean_s",
          "gen_median_s", "gen_min_s", "gen_s", "tokens_per_s", "peak_mem_bytes", "peak_mem_kind", "speedup", "checksum"}
SKIP_SUFFIXES = {".png", ".md", ".log"}  # pictures, and tables rendered from the CSVs compared here


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def differences(a, b, where: str = "") -> list[str]:
    """Paths at which two JSON values differ (floats compared exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}/{k}: only in {'A' if k in a else 'B'}" for k in sorted(a.keys() ^ b.keys())]
        for k in sorted(a.keys() & b.keys()):
            out += differences(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"[:300]]


def count_values(obj) -> int:
    if isinstance(obj, dict):
        return sum(count_values(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(count_values(v) for v in obj)
    return 1


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def compare(run_a: Path, run_b: Path) -> tuple[int, int, list[str]]:
    """(files compared, values compared, problems)."""
    files_a = {p.relative_to(run_a) for p in (run_a / "results").rglob("*") if p.is_file()}
    files_b = {p.relative_to(run_b) for p in (run_b / "results").rglob("*") if p.is_file()}
    problems = [f"{p}: only in {run_a if p in files_a else run_b}" for p in sorted(files_a ^ files_b)
                if p.suffix not in SKIP_SUFFIXES]
    files = values = 0
    for rel in sorted(files_a & files_b):
        a, b = run_a / rel, run_b / rel
        if rel.suffix in SKIP_SUFFIXES:
            continue
        if rel.suffix == ".json":
            ja, jb = strip(json.loads(a.read_text())), strip(json.loads(b.read_text()))
            diff, n = differences(ja, jb), count_values(ja)
        elif rel.suffix == ".csv":
            ra, rb = read_csv(a), read_csv(b)
            diff, n = differences(ra, rb), sum(len(r) for r in ra)
        elif rel.suffix == ".safetensors":
            diff, n = ([] if sha256(a) == sha256(b) else ["tensors differ (sha256)"]), 1
        else:
            diff, n = ([] if a.read_bytes() == b.read_bytes() else ["bytes differ"]), 1
        files += 1
        values += n
        problems += [f"{rel}{d}" if d.startswith(("/", "[")) else f"{rel}: {d}" for d in diff]
    return files, values, problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    run_a, run_b = map(Path, argv)
    for run in (run_a, run_b):
        if not (run / "results").is_dir():
            print(f"error: {run}/results not found", file=sys.stderr)
            return 2
    files, values, problems = compare(run_a, run_b)
    steps = sorted((run_a / "results").glob("search/*/*/*/step_*.json"))
    for p in steps:
        s = json.loads(p.read_text())
        print(f"{p.relative_to(run_a)}: removed {s['removed_block']} (ppl {s['ppl']:.6f}), {len(s['scores'])} scores")
    print(f"compared {values} values in {files} files of {run_a} and {run_b}: "
          + ("all equal (timings aside)" if not problems else f"{len(problems)} difference(s)"))
    for line in problems[:200]:
        print("  " + line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
