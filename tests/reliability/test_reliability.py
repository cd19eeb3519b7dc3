"""What the pipeline guarantees: bad input refused early, no partial artifacts after a kill,
corruption and staleness detected, numerical faults contained, identical reruns."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blockpruner.artifacts import atomic_write, read_json, write_json
from blockpruner.data.calibration import CalibrationSpec, load_calibration, sample_calibration
from blockpruner.model_dir import write_manifest
from blockpruner.errors import UserError
from blockpruner.steps import read_step

from ..conftest import tiny_model
from ..test_calibration import CharTokenizer
from ..test_cli import forbid_model_loading, one_line_error, run


def _timing_free(obj):
    return {k: v for k, v in obj.items() if k not in ("timing", "checksum")}


@pytest.fixture
def study(tmp_path):
    model = tiny_model("qwen2", seed=7, num_hidden_layers=3)
    model.save_pretrained(tmp_path / "model")
    write_manifest(tmp_path / "model", model, source="test", dtype="fp32")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"calibration line {i}: the quick brown fox {i * 7}" for i in range(40)))
    sample_calibration(CalibrationSpec(str(text), nsamples=12, seqlen=32, max_windows=3), CharTokenizer(), tmp_path / "calib")
    return tmp_path


def step_args(t, k, out, prev=None):
    args = ["step", "--model", t / "model", "--calib", t / "calib", "--k", k, "--device", "cpu", "--no-progress", "--out", out]
    return args + (["--prev", prev] if prev else [])


# -- determinism --------------------------------------------------------------------------
def test_two_runs_give_identical_step_artifacts(study, capsys):
    t = study
    for run_dir in ("a", "b"):
        prev = None
        for k in (1, 2, 3):
            out = t / run_dir / f"step_{k}.json"
            assert run(step_args(t, k, out, prev), capsys)[0] == 0
            prev = out
    for k in (1, 2, 3):
        a, b = (json.loads((t / d / f"step_{k}.json").read_text()) for d in ("a", "b"))
        a["inputs"].pop("previous_step"), b["inputs"].pop("previous_step")  # paths differ by design
        assert _timing_free(a) == _timing_free(b)


def test_calibration_bytes_identical_across_runs(study):
    t = study
    spec = CalibrationSpec(str(t / "t.txt"), nsamples=12, seqlen=32, max_windows=3)
    m = sample_calibration(spec, CharTokenizer(), t / "again")
    assert (t / "again" / "tokens.safetensors").read_bytes() == (t / "calib" / "tokens.safetensors").read_bytes()
    assert _timing_free(m) == _timing_free(read_json(t / "calib" / "manifest.json", "blockpruner.calibration/1"))


# -- interruption ---------------------------------------------------------------------------
def _step_args(model, calib, k, out_dir, progress=False) -> list[str]:
    args = ["step", "--model", model, "--calib", calib, "--k", k, "--device", "cpu", "--out", out_dir / f"step_{k}.json"]
    args += ["--prev", out_dir / f"step_{k - 1}.json"] if k > 1 else []
    return [str(a) for a in args + ([] if progress else ["--no-progress"])]


# run each step of a chain only if its artifact is missing, as the workflow does; print the steps run
_RESUME = """
import json, sys
from pathlib import Path
from blockpruner.cli import main
ran = []
for k, args in json.loads(sys.argv[1]).items():
    if not Path(args[args.index("--out") + 1]).exists():
        assert main(args) == 0
        ran.append(int(k))
print(json.dumps(ran))
"""


def _comparable(path: Path, run_dir: Path) -> dict:
    """A step artifact without its timing (and the checksum over it), run directory factored out."""
    rec = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("timing", "checksum")}
    prev = rec["inputs"]["previous_step"]
    rec["inputs"]["previous_step"] = prev and str(Path(prev).relative_to(run_dir))
    return rec


def test_sigkill_during_step_2_then_rerun_resumes_there_and_equals_uninterrupted_run(study, capsys):
    """A 3-step search whose step-2 process is killed with SIGKILL mid-search: nothing of step 2
    is left, step 1 is untouched, and a rerun in a fresh process starts at step 2 and ends with
    the artifacts of a run that was never interrupted."""
    t = study
    # big enough that one step takes a second or two, so the kill lands inside the search
    big = tiny_model("llama", seed=1, num_hidden_layers=4, hidden_size=256, intermediate_size=1024)
    big.save_pretrained(t / "big")
    write_manifest(t / "big", big, source="test", dtype="fp32")
    text = t / "long.txt"
    text.write_text("\n".join(f"line {i} " * 20 for i in range(200)))
    sample_calibration(CalibrationSpec(str(text), nsamples=100, seqlen=256, max_windows=4), CharTokenizer(), t / "bigcal")
    model, calib, d = t / "big", t / "bigcal", t / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1"}

    # the uninterrupted run, and step 1 of the interrupted one, here on one thread like the subprocesses
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k in (1, 2, 3):
            assert run(_step_args(model, calib, k, t / "ref"), capsys)[0] == 0
        assert run(_step_args(model, calib, 1, d), capsys)[0] == 0
    finally:
        torch.set_num_threads(threads)
    step1 = (d / "step_1.json").read_bytes(), (d / "step_1.json").stat().st_mtime_ns

    cmd = [sys.executable, "-m", "blockpruner.cli", *_step_args(model, calib, 2, d, progress=True)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    buf, progress = "", None
    while progress is None and proc.poll() is None:  # until its progress bar shows some candidates scored
        buf += proc.stderr.read(1)
        progress = re.search(r"step 2: .*?\| *([1-9]\d*)/(\d+) ", buf)
    assert proc.poll() is None, "step 2 finished before it could be killed; make the model slower"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert int(progress[1]) < int(progress[2])  # killed mid-search
    # no step_2.json and no temp file; step 2's finished work is in its journal
    assert sorted(p.name for p in d.iterdir()) == ["step_1.json", "step_2.json.journal"]
    assert ((d / "step_1.json").read_bytes(), (d / "step_1.json").stat().st_mtime_ns) == step1

    steps = json.dumps({k: _step_args(model, calib, k, d) for k in (1, 2, 3)})
    r = subprocess.run([sys.executable, "-c", _RESUME, steps], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [2, 3]  # resumed at the killed step
    assert ((d / "step_1.json").read_bytes(), (d / "step_1.json").stat().st_mtime_ns) == step1
    assert sorted(p.name for p in d.iterdir()) == ["step_1.json", "step_2.json", "step_3.json"]  # journal gone
    for k in (1, 2, 3):
        assert read_step(d / f"step_{k}.json")["k"] == k  # checksums hold
        a, b = _comparable(d / f"step_{k}.json", d), _comparable(t / "ref" / f"step_{k}.json", t / "ref")
        if k == 2:  # the work the resumed step did: its own and what the killed run had journaled
            a.pop("cost"), b.pop("cost")
        assert a == b, k


def test_atomic_write_keeps_old_file_when_writer_dies(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"x": 1}, "t/1")

    def dies(tmp):
        Path(tmp).write_text("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies)
    assert read_json(path, "t/1")["x"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


def test_prepare_model_that_dies_leaves_the_previous_directory_whole(tmp_path, monkeypatch):
    """prepare-model writes through atomic_dir: a failure while writing leaves the old directory
    (files and manifest) exactly as it was, and no half-written directory or temp folder."""
    import transformers

    from blockpruner.data import sources

    from ..test_evaluate import tiny_tokenizer

    tiny_model("llama", num_hidden_layers=2).save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    out = tmp_path / "prepared"
    sources.prepare_model(str(tmp_path / "src"), out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def dies(*a, **k):
        raise KeyboardInterrupt

    tiny_model("llama", seed=1, num_hidden_layers=2).save_pretrained(tmp_path / "src2")  # other weights
    tiny_tokenizer().save_pretrained(tmp_path / "src2")
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", dies)  # after the weights
    with pytest.raises(KeyboardInterrupt):
        sources.prepare_model(str(tmp_path / "src2"), out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "src", "src2"]


# -- corruption and staleness ------------------------------------------------------------------
def test_corrupt_or_edited_step_is_detected(study, capsys, monkeypatch):
    t = study
    assert run(step_args(t, 1, t / "s1.json"), capsys)[0] == 0
    good = (t / "s1.json").read_text()
    forbid_model_loading(monkeypatch)
    edited = json.loads(good)
    edited["removed"] = ["mlp.2"]
    (t / "s1.json").write_text(json.dumps(edited))
    one_line_error(*run(step_args(t, 2, t / "s2.json", t / "s1.json"), capsys), "checksum mismatch")
    (t / "s1.json").write_text(good[: len(good) // 2])
    one_line_error(*run(step_args(t, 2, t / "s2.json", t / "s1.json"), capsys), "corrupt artifact")
    (t / "calib" / "manifest.json").write_text(good)  # a step where a calibration manifest should be
    one_line_error(*run(step_args(t, 2, t / "s2.json"), capsys), "not a blockpruner.calibration/1 artifact")


def test_step_for_another_model_is_refused(study, capsys, monkeypatch):
    t = study
    assert run(step_args(t, 1, t / "s1.json"), capsys)[0] == 0
    other = tiny_model("qwen2", seed=8, num_hidden_layers=3)
    other.save_pretrained(t / "model")  # same path, new weights
    write_manifest(t / "model", other, source="test", dtype="fp32")
    forbid_model_loading(monkeypatch)
    one_line_error(*run(step_args(t, 2, t / "s2.json", t / "s1.json"), capsys), "stale, made for another model")


def test_weights_that_do_not_match_their_manifest_are_refused(study, capsys, monkeypatch):
    t = study
    w = t / "model" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    forbid_model_loading(monkeypatch)
    one_line_error(*run(step_args(t, 1, t / "s1.json"), capsys), "not the size its manifest records")


# -- bad input before any work -----------------------------------------------------------------------
@pytest.mark.parametrize("k,pattern", [(0, "step k must be >= 1"), (-2, "step k must be >= 1")])
def test_bad_k(study, capsys, monkeypatch, k, pattern):
    forbid_model_loading(monkeypatch)
    one_line_error(*run(step_args(study, k, study / "x.json"), capsys), pattern)


def test_unknown_candidate_set(study, capsys, monkeypatch):
    forbid_model_loading(monkeypatch)
    code, err = run(step_args(study, 1, study / "x.json") + ["--candidates", "heads"], capsys)
    one_line_error(code, err, "unknown candidate set 'heads'; use one of: all, attn, mlp")


def test_unreachable_hub_id_says_how_to_use_a_local_copy(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "blockpruner.cli", "prepare-model", "some-org/some-model", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("blockpruner: error: cannot load 'some-org/some-model' from the Hugging Face Hub")
    assert "pass DIR as the model source" in last


def test_unreachable_hub_dataset_names_the_local_key(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = ("from blockpruner.data.calibration import CalibrationSpec, draw_samples\n"
            "draw_samples(CalibrationSpec('tatsu-lab/alpaca', nsamples=4))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "UserError" in r.stderr and "calibration.<name>.path" in r.stderr and "--data PATH" in r.stderr


# -- input edge cases -------------------------------------------------------------------------
def _wordlevel_tokenizer(with_specials: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for i in range(40) for w in f"calibration line {i}: the quick brown fox {i * 7}".split()})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"bos_token": "[UNK]", "pad_token": "[UNK]"} if with_specials else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)
    assert (tok.bos_token is None and tok.pad_token is None) != with_specials
    return tok


@pytest.mark.parametrize("mode", ["concat", "per-sample"])
def test_tokenizer_without_bos_or_pad(study, mode):
    tok = _wordlevel_tokenizer(with_specials=False)
    m = sample_calibration(CalibrationSpec(str(study / "t.txt"), nsamples=20, seqlen=6, mode=mode), tok, study / mode)
    cal = load_calibration(study / mode)
    assert m["windows"] == len(cal.windows) > 0
    assert all(2 <= len(w) <= 6 for w in cal.windows)


def test_empty_and_whitespace_records_are_dropped_before_sampling(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = ["", "  ", "\n", "real text one", "\t", "real text two"]
    path.write_text("\n".join(json.dumps({"text": r}) for r in rows))
    m = sample_calibration(CalibrationSpec(str(path), nsamples=2, seqlen=4, mode="per-sample"), CharTokenizer(), tmp_path / "o")
    assert sorted(m["sampled_indices"]) == [3, 5] and m["nonempty_records"] == 2
    with pytest.raises(UserError, match="only 2 non-empty records"):
        sample_calibration(CalibrationSpec(str(path), nsamples=3, seqlen=4), CharTokenizer(), tmp_path / "o2")


def test_nan_logits_in_fp16_style_overflow_are_not_chosen():
    from blockpruner.blocks import PrunableModel
    from blockpruner.search.greedy import StepSettings, search_step

    pm = PrunableModel.wrap(tiny_model("mistral", seed=4))
    with torch.no_grad():  # an overflowing branch, like fp16 activations past 65504
        pm.layers[2].self_attn.o_proj.weight.mul_(1e38)
        pm.layers[2].self_attn.o_proj.weight.mul_(1e38)
    wins = [torch.randint(3, 90, (10,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rec = search_step(pm, wins, 1, [], StepSettings(), inputs={}, progress=False)
    assert rec["removed_block"] == "attn.2"
    assert all(s["status"] == "nonfinite" for s in rec["scores"] if s["block"] != "attn.2")
