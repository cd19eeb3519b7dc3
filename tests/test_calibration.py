"""Calibration sampling, templates, windows and the artifact's integrity checks."""

from __future__ import annotations

import json
import random

import pytest
import torch

from blockpruner.data.calibration import ALPACA_NO_INPUT, CalibrationSpec, load_calibration, render, sample_calibration
from blockpruner.errors import UserError

from .conftest import ALPACA, RECORDS, require_shared


class CharTokenizer:
    """Deterministic stand-in tokenizer: one token per character, BOS first."""

    name_or_path = "char"

    def __call__(self, text, return_tensors=None, truncation=False, max_length=None):
        ids = [1] + [3 + (ord(c) % 90) for c in text]
        if truncation and max_length:
            ids = ids[:max_length]

        class Out:
            input_ids = torch.tensor([ids])

        return Out()

    def __len__(self):
        return 93

    def get_vocab(self):
        return {str(i): i for i in range(93)}


@pytest.fixture
def alpaca_file(tmp_path):
    recs = [{"instruction": f"Say {i}.", "input": "" if i % 2 else f"ctx {i}", "output": f"{i}!" * 5} for i in range(20)]
    recs.append({"instruction": "   ", "input": "", "output": ""})  # renders to non-empty text: kept
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(recs))
    return path


def test_alpaca_template_matches_hub_text_column():
    rec = {"instruction": "Give three tips for staying healthy.", "input": "",
           "output": "1.Eat a balanced diet."}
    hub_text = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n1.Eat a balanced diet.")
    assert render(rec) == hub_text
    with_input = render({"instruction": "I", "input": "X", "output": "O"})
    assert "paired with an input" in with_input and "### Input:\nX\n\n### Response:\nO" in with_input
    assert render({"text": "already rendered", "instruction": "i", "output": "o"}) == "already rendered"


def test_concat_windows_follow_reference_recipe(alpaca_file, tmp_path):
    spec = CalibrationSpec(str(alpaca_file), nsamples=6, seed=42, seqlen=50)
    m = sample_calibration(spec, CharTokenizer(), tmp_path / "c")
    recs = json.loads(alpaca_file.read_text())
    picks = random.Random(42).sample(range(len(recs)), 6)
    assert m["sampled_indices"] == picks
    ids = CharTokenizer()("\n\n".join(render(recs[i]) for i in picks)).input_ids[0]
    n = len(ids) // 50
    cal = load_calibration(tmp_path / "c")
    assert len(cal.windows) == n == m["windows"]
    assert torch.equal(torch.stack(cal.windows), ids[: n * 50].view(n, 50))
    assert m["tokens"] == n * 50 and m["predicted_tokens"] == n * 49


def test_per_sample_mode_truncates_and_keeps_lengths(alpaca_file, tmp_path):
    m = sample_calibration(CalibrationSpec(str(alpaca_file), nsamples=8, seqlen=170, mode="per-sample"), CharTokenizer(), tmp_path / "p")
    cal = load_calibration(tmp_path / "p")
    recs = json.loads(alpaca_file.read_text())
    want = [CharTokenizer()(render(recs[i])).input_ids[0][:170] for i in m["sampled_indices"]]
    assert [w.tolist() for w in cal.windows] == [w.tolist() for w in want]  # unpadded, truncated
    assert {len(w) < 170 for w in cal.windows} == {True, False}  # both cases occur
    assert m["tokens"] == sum(len(w) for w in cal.windows)


def test_sampling_is_deterministic(alpaca_file, tmp_path):
    a = sample_calibration(CalibrationSpec(str(alpaca_file), nsamples=7, seqlen=30), CharTokenizer(), tmp_path / "a")
    b = sample_calibration(CalibrationSpec(str(alpaca_file), nsamples=7, seqlen=30), CharTokenizer(), tmp_path / "b")
    assert a["tokens_sha256"] == b["tokens_sha256"] and a["sampled_indices"] == b["sampled_indices"]
    c = sample_calibration(CalibrationSpec(str(alpaca_file), nsamples=7, seed=1, seqlen=30), CharTokenizer(), tmp_path / "c")
    assert c["sampled_indices"] != a["sampled_indices"]


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".parquet"])
def test_local_formats(tmp_path, suffix):
    rows = [f"row number {i} with some text" for i in range(10)] + ["", "   "]
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"text": r}) for r in rows))
    elif suffix == ".txt":
        path.write_text("\n".join(rows))
    else:
        import pandas as pd

        pd.DataFrame({"text": rows}).to_parquet(path)
    m = sample_calibration(CalibrationSpec(str(path), nsamples=10, seqlen=20), CharTokenizer(), tmp_path / "o")
    assert m["nonempty_records"] == 10 and m["windows"] >= 1
    with pytest.raises(UserError, match="only 10 non-empty records"):
        sample_calibration(CalibrationSpec(str(path), nsamples=11, seqlen=20), CharTokenizer(), tmp_path / "o2")


def test_bad_input_is_refused(alpaca_file, tmp_path):
    tok = CharTokenizer()
    with pytest.raises(UserError, match="nsamples must be a positive integer"):
        sample_calibration(CalibrationSpec(str(alpaca_file), nsamples=0), tok, tmp_path / "x")
    with pytest.raises(UserError, match="seqlen must be a positive integer"):
        sample_calibration(CalibrationSpec(str(alpaca_file), seqlen=-3), tok, tmp_path / "x")
    with pytest.raises(UserError, match="fewer than one window of seqlen=100000"):
        sample_calibration(CalibrationSpec(str(alpaca_file), nsamples=2, seqlen=100000), tok, tmp_path / "x")
    with pytest.raises(UserError, match="calibration file not found"):
        sample_calibration(CalibrationSpec(str(tmp_path / "nope.json")), tok, tmp_path / "x")
    with pytest.raises(UserError, match="unknown calibration mode"):
        sample_calibration(CalibrationSpec(str(alpaca_file), mode="shuffled"), tok, tmp_path / "x")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(UserError, match="not valid UTF-8.*iconv"):
        sample_calibration(CalibrationSpec(str(bad), nsamples=1, seqlen=2), tok, tmp_path / "x")


def test_corrupt_or_edited_artifact_is_detected(alpaca_file, tmp_path):
    sample_calibration(CalibrationSpec(str(alpaca_file), nsamples=6, seqlen=30), CharTokenizer(), tmp_path / "c")
    tokens = tmp_path / "c" / "tokens.safetensors"
    data = bytearray(tokens.read_bytes())
    data[-1] ^= 0xFF
    tokens.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its manifest"):
        load_calibration(tmp_path / "c")
    manifest = tmp_path / "c" / "manifest.json"
    obj = json.loads(manifest.read_text())
    obj["seed"] = 7
    manifest.write_text(json.dumps(obj))
    with pytest.raises(UserError, match="checksum mismatch"):
        load_calibration(tmp_path / "c")
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(UserError, match="corrupt artifact"):
        load_calibration(tmp_path / "c")


def test_shared_alpaca_renders_and_samples(tmp_path):
    require_shared()
    recs = json.loads(ALPACA.read_text())
    assert len(recs) == RECORDS["alpaca"]
    text = render(recs[0])
    assert text.startswith("Below is an instruction") and recs[0]["output"] in text
    if not recs[0]["input"]:
        assert text == ALPACA_NO_INPUT.format(**recs[0])


def _rows_file(tmp_path, n):
    path = tmp_path / "alpaca_full.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(n)))
    return path


def test_official_split_draws_what_the_official_code_draws(tmp_path):
    """The slice and draw equal the official code's: `datasets`' own train_test_split twice
    (seed 42), then `transformers.set_seed(42); random.sample(range(len(test)), n)`."""
    import datasets
    import transformers

    from blockpruner.data.calibration import ALPACA_ROWS, draw_samples

    path = _rows_file(tmp_path, ALPACA_ROWS)
    texts = [f"record {i}" for i in range(ALPACA_ROWS)]
    ds = datasets.Dataset.from_dict({"text": texts}).train_test_split(test_size=0.2, seed=42)
    test = ds.pop("test").train_test_split(test_size=0.5, seed=42)["train"]
    assert len(test) == 5200
    transformers.set_seed(42)
    expected = [test[i]["text"] for i in random.sample(range(len(test)), 16)]

    sample = draw_samples(CalibrationSpec(str(path), nsamples=16, sampling="official-split"))
    assert sample.texts == expected
    assert [f"record {i}" for i in sample.indices] == expected
    assert sample.info["slice_rows"] == 5200
    # the whole-set draw is a different one
    assert draw_samples(CalibrationSpec(str(path), nsamples=16)).texts != expected


def test_official_split_is_recorded_and_refuses_a_subset(tmp_path):
    from blockpruner.data.calibration import ALPACA_ROWS

    m = sample_calibration(CalibrationSpec(str(_rows_file(tmp_path, ALPACA_ROWS)), nsamples=4, seqlen=8,
                                           sampling="official-split"), CharTokenizer(), tmp_path / "calib")
    assert m["sampling"] == "official-split" and m["slice_rows"] == 5200
    (tmp_path / "sub").mkdir()
    subset = _rows_file(tmp_path / "sub", 5000)
    with pytest.raises(UserError, match="52,002-row .* 5,000 records"):
        sample_calibration(CalibrationSpec(str(subset), nsamples=4, sampling="official-split"), CharTokenizer(), tmp_path / "c2")
    with pytest.raises(UserError, match="official-split"):
        CalibrationSpec(str(subset), sampling="official").validate()
