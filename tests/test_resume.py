"""Resuming inside a search step: `blockpruner step` killed (kill -9) or stopped (SIGTERM) at
random points, and rerun, writes the step artifact an uninterrupted run writes; the journal's
torn last record, a journal of another model or setting, and a full disk are handled in one line.

The reference is the same command run once without interruption. `cost` and `timing` (the work
and time actually spent) are left out of the comparison; everything else -- every candidate's
NLL, status, windows and bound, the seed, the bound and the choice -- must be equal bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockpruner.data.calibration import CalibrationSpec, load_calibration, sample_calibration
from blockpruner.model_dir import write_manifest

from .conftest import ROOT
from .test_calibration import CharTokenizer
from .test_search_speed import trained_tiny

NOT_COMPARED = {"cost", "timing", "checksum"}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A 6-layer model fitted to its calibration text (its blocks differ in importance, so the
    early stop and the head bound cut candidates at different windows), and 40 windows."""
    t = tmp_path_factory.mktemp("resume")
    text = t / "t.txt"
    text.write_text("\n".join(f"row {i % 7} says {'ab' * (i % 3)} then {i % 5}" for i in range(200)))
    sample_calibration(CalibrationSpec(str(text), nsamples=200, seqlen=16, max_windows=40), CharTokenizer(), t / "calib")
    model = trained_tiny(load_calibration(t / "calib").windows[:10], layers=6)
    model.save_pretrained(t / "model")
    write_manifest(t / "model", model, source="test", dtype="fp32")
    return t


def step_command(t: Path, out: Path, *extra: str, model: str = "model") -> list[str]:
    return [sys.executable, "-m", "blockpruner.cli", "step", "--model", str(t / model), "--calib", str(t / "calib"),
            "--k", "1", "--device", "cpu", "--no-progress", *extra, "--out", str(out)]


def journal_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def run(cmd: list[str], stop_at: int | None = None, sig: int = signal.SIGKILL,
        cwd: Path | None = None) -> tuple[int, str, bool]:
    """Run a step; with `stop_at`, send `sig` once its journal holds that many records.
    -> (exit status, stderr, whether the signal was sent before the step ended)."""
    journal = Path(cwd or ".") / (cmd[-1] + ".journal")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=cwd)
    sent = False
    if stop_at is not None:
        while p.poll() is None:
            if journal_lines(journal) > stop_at:  # the key's line, then stop_at units
                p.send_signal(sig)
                sent = True
                break
            time.sleep(0.002)
    _, err = p.communicate(timeout=600)
    return p.returncode, err, sent


def units(err: str) -> tuple[int, int]:
    """(units replayed, units computed) from the step's last log line about its journal."""
    m = re.findall(r"(\d+) units of work replayed from .*?, (\d+) computed", err)
    return (int(m[-1][0]), int(m[-1][1])) if m else (0, 0)


def compared(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in NOT_COMPARED}


def uninterrupted(t: Path, name: str, *extra: str) -> tuple[dict, int]:
    out = t / f"{name}.full.json"
    code, err, _ = run(step_command(t, out, *extra))
    assert code == 0, err
    return compared(out), units(err)[1]


CASES = {
    "head bound": ("--head-bound-columns", "8"),
    "head bound, 3 windows a batch": ("--head-bound-columns", "8", "--window-batch", "3"),
    "early stop only": ("--head-bound-columns", "0"),
    "official-bf16": ("--numerics", "official-bf16"),
    "shard 1 of 2": ("--head-bound-columns", "8", "--shard", "1/2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_killed_at_random_points_resumes_to_the_uninterrupted_artifact(study, case):
    """kill -9 three times at random points of one step, resuming in between, then let it
    finish: the artifact is the uninterrupted run's, the journal is gone, and no unit the journal
    recorded is computed again (a kill loses only the unit in flight: one candidate over one
    batch of windows)."""
    extra = CASES[case]
    reference, total = uninterrupted(study, case, *extra)
    out = study / f"{case}.json"
    rng = random.Random(case)
    points = sorted(rng.sample(range(1, int(total * 0.8)), 3))
    for point in points:
        code, err, sent = run(step_command(study, out, *extra), stop_at=point)
        assert sent and code == -signal.SIGKILL and not out.exists(), (point, total, err[-2000:])
    code, err, _ = run(step_command(study, out, *extra))
    assert code == 0, err
    replayed, last = units(err)
    recorded = int(re.findall(r"(\d+) units of work recorded", err)[-1])
    assert replayed == recorded > 0
    assert compared(out) == reference
    assert not Path(f"{out}.journal").exists()
    # no recorded unit is computed again: only the one in flight at each kill (never written,
    # or torn and dropped) was lost
    assert recorded + last == total, (recorded, last, total)


def test_torn_record_is_dropped_and_the_step_resumes(study):
    extra = CASES["head bound"]
    reference, total = uninterrupted(study, "torn", *extra)
    out = study / "torn.json"
    code, _, sent = run(step_command(study, out, *extra), stop_at=total // 2)
    assert sent and code == -signal.SIGKILL
    journal = Path(f"{out}.journal")
    whole = journal.read_bytes()
    with open(journal, "ab") as f:
        f.write(b'0123456789abcdef {"unit":"exact/bounded/pass2/7/attn.3","state":{"sco')  # a write cut short
    code, err, _ = run(step_command(study, out, *extra))
    assert code == 0, err
    assert "last record is torn" in err and compared(out) == reference
    assert units(err)[0] == whole.count(b'{"state":')  # every unit recorded before the torn line


def test_journal_of_another_model_or_setting_is_refused(study, tmp_path):
    extra = CASES["head bound"]
    out = tmp_path / "s.json"
    code, _, sent = run(step_command(study, out, *extra), stop_at=20)
    assert sent
    journal = Path(f"{out}.journal")
    before = journal.read_bytes()
    other = study / "other-model"
    if not other.exists():
        model = trained_tiny(load_calibration(study / "calib").windows[:10], layers=6, seed=1)
        model.save_pretrained(other)
        write_manifest(other, model, source="test", dtype="fp32")
    for change, model, differ in [(("--head-bound-columns", "16"), "model", "settings"),
                                  (("--head-bound-columns", "8", "--candidates", "attn"), "model", "settings"),
                                  (extra, "other-model", "inputs")]:
        code, err, _ = run(step_command(study, out, *change, model=model))
        lines = [line for line in err.splitlines() if line.startswith("blockpruner:")]
        assert code == 2 and len(lines) == 1, err
        assert f"journal of another run of this step ({differ} differ)" in lines[0] and "--fresh" in lines[0]
        assert journal.read_bytes() == before  # refused, never rewritten
    code, err, _ = run(step_command(study, out, "--head-bound-columns", "16", "--fresh"))
    assert code == 0 and units(err)[0] == 0 and not journal.exists()  # started afresh


def test_sigterm_stops_with_status_75_and_resumes(study):
    extra = CASES["head bound"]
    reference, total = uninterrupted(study, "term", *extra)
    out = study / "term.json"
    code, err, sent = run(step_command(study, out, *extra), stop_at=total // 3, sig=signal.SIGTERM)
    assert sent and code == 75, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("blockpruner: stopped: step 1 was asked to stop") and "rerun the same command" in last
    assert "Traceback" not in err and not out.exists()
    code, err, _ = run(step_command(study, out, *extra))
    assert code == 0 and compared(out) == reference
    recorded = int(re.findall(r"(\d+) units of work recorded", err)[-1])
    assert recorded > 0 and units(err)[0] == recorded and sum(units(err)) == total  # a clean stop loses no unit


def test_full_disk_keeps_the_journal_and_the_earlier_artifact(study, tmp_path, monkeypatch, capsys):
    """ENOSPC while journaling, then while writing the artifact: one line each, the journal's
    records and an earlier artifact at --out intact, and the rerun finishes from the journal."""
    import blockpruner.search.journal as journal_module
    from blockpruner.cli import main

    extra = CASES["head bound"]
    reference, _ = uninterrupted(study, "full", *extra)
    out = tmp_path / "step_1.json"
    out.write_text("an earlier artifact\n")
    real_write, calls = os.write, {"n": 0}

    def write_until_full(fd, data):
        calls["n"] += 1
        if calls["n"] > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(journal_module.os, "write", write_until_full)
    args = step_command(study, out, *extra)[3:]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("blockpruner:")]
    assert len(err) == 1 and "no space left on the device" in err[0] and "resumes from them" in err[0]
    journal = Path(f"{out}.journal")
    assert journal_lines(journal) == 30 and out.read_text() == "an earlier artifact\n"  # the writes that succeeded
    monkeypatch.setattr(journal_module.os, "write", real_write)

    import pathlib

    real_write_text = pathlib.Path.write_text

    def full_for_the_artifact(self, *a, **k):
        if self.name.startswith(f".{out.name}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", full_for_the_artifact)
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("blockpruner:")]
    assert len(err) == 1 and f"{out}: no space left on the device" in err[0]
    assert out.read_text() == "an earlier artifact\n" and journal.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left
    monkeypatch.setattr(pathlib.Path, "write_text", real_write_text)
    assert main(args) == 0
    assert compared(out) == reference and not journal.exists()


def test_sigterm_under_snakemake_retries_the_step_from_its_journal(tmp_path):
    """SIGTERM to a running search_step job (as SLURM sends before a time limit): the job exits
    75 with its one line, Snakemake runs it again (search.retries), and the retry resumes from the
    journal and writes the step an uninterrupted `blockpruner step` writes."""
    from .test_workflow import run_snakemake, tiny_study

    words = "the actor starred in a play on television in 2006 and had a guest role".split()
    rng = random.Random(1)
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=40))}) + "\n"
                                                  for _ in range(120)))
    main, cfg = tiny_study(tmp_path, "term", lambda c: c["calibration"]["c"].update(nsamples=120))
    target = "results/search/tiny/c/blockpruner/step_1.json"
    journal = main / f"{target}.journal"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEMAKE")}
    p = subprocess.Popen([sys.executable, "-m", "snakemake", target, "--cores", "2", "--resources", "gpu=0",
                          "--configfile", cfg], cwd=main, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env)
    try:
        while journal_lines(journal) < 100 and p.poll() is None:
            time.sleep(0.005)
        pids = subprocess.run(["pgrep", "-f", f"^\\S*python\\S* -m blockpruner.cli step .*--out {target}"],
                              capture_output=True, text=True).stdout.split()  # the step itself, not its shell
        pids = [pid for pid in pids if Path(os.readlink(f"/proc/{pid}/cwd")) == main.resolve()]  # this study's
        assert len(pids) == 1, pids
        os.kill(int(pids[0]), signal.SIGTERM)
        out, _ = p.communicate(timeout=600)
    finally:
        p.kill()
    assert p.returncode == 0, out[-4000:]
    assert "returned non-zero exit status 75" in out and "Trying to restart job" in out, out[-4000:]
    log = (main / "logs/search_step/tiny/c/blockpruner/step_1.log").read_text()  # the retry's
    recorded = int(re.findall(r"resuming from .*: (\d+) units of work recorded \(earlier runs were stopped by "
                              r"SIGTERM\)", log)[-1])
    assert recorded > 0 and not journal.exists()
    reference = tmp_path / "reference.json"
    code, err, _ = run([sys.executable, "-m", "blockpruner.cli", "step", "--model", "results/models/tiny",  # as the job
                        "--calib", "results/calib/tiny/c", "--k", "1", "--device", "cpu", "--no-progress",
                        "--out", str(reference)], cwd=main)
    assert code == 0, err
    assert compared(main / target) == compared(reference)
    assert "Nothing to be done" in run_snakemake(main, target, "-n", "--configfile", cfg).stdout


def test_progress_lines_say_candidates_windows_best_and_time_left(study):
    """The log a cluster user reads: candidates finished of all, candidate-windows done (and how
    many came from the journal on a resume), the best finished candidate so far, the time left."""
    extra = CASES["early stop only"]
    out = study / "progress.json"
    code, err, sent = run(step_command(study, out, *extra, "--log-every", "0"), stop_at=100)
    assert sent
    code, err, _ = run(step_command(study, out, *extra, "--log-every", "0"))
    assert code == 0, err
    lines = [line.split(" INFO ")[1] for line in err.splitlines() if "candidates finished" in line]
    pattern = re.compile(r"step 1: (\d+)/12 candidates finished, (\d+)/480 candidate-windows \((\d+) from the journal\), "
                         r"best so far (-|\w+\.\d+ \(ppl \d+\.\d{4}\)), at most (\?|\d+m\d\ds) left$")
    parsed = [pattern.match(line) for line in lines]
    assert lines and all(parsed), lines[:3]
    done = [int(m[2]) for m in parsed]
    assert done == sorted(done) and int(parsed[0][3]) > 0  # the replayed units counted first
    record = json.loads(out.read_text())
    best = min((s for s in record["scores"] if s["status"] == "done"), key=lambda s: s["nll_sum"])
    assert lines[-1].startswith("step 1: 12/12 candidates finished") and f"best so far {best['block']}" in lines[-1]
