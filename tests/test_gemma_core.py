"""Real model: Gemma 3 270M (GGUF from PyPI -> safetensors) with the shared Alpaca and WikiText-2.

Sized for a 2-core CPU: one 64-token calibration window scores all 36 candidates in about a
minute, dominated by the 262k-entry LM head.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from blockpruner.blocks import PrunableModel
from blockpruner.data.calibration import CalibrationSpec, load_calibration, sample_calibration
from blockpruner.model_dir import load_model_dir, read_manifest
from blockpruner.eval.wikitext import perplexity
from blockpruner.search.greedy import StepSettings, search_step

from .conftest import ALPACA, DATA, require_shared

pytestmark = pytest.mark.gemma


def test_prepared_gemma_manifest(gemma_dir):
    m = read_manifest(gemma_dir)
    assert m["model_type"] == "gemma3_text" and m["num_layers"] == 18 and m["num_blocks"] == 36
    assert 260e6 < m["parameters"] < 275e6
    assert set(m["files"]) == {"model.safetensors"} and len(m["content_hash"]) == 64


def test_dense_wikitext_perplexity_is_plausible(gemma_dir):
    require_shared()
    model, tok, _ = load_model_dir(gemma_dir)
    rows = [json.loads(line)["text"] for line in (DATA / "wikitext2" / "test.rows.jsonl").open()][:60]
    ids = tok("\n\n".join(rows), return_tensors="pt").input_ids[0]
    windows = [ids[i * 128:(i + 1) * 128] for i in range(2)]
    pm = PrunableModel.wrap(model)
    res = perplexity(pm, windows, progress=False)
    assert res["tokens"] == 2 * 127
    assert 5 < res["ppl"] < 300, res  # a working 270M model, not a broken one (vocab-size ppl ~ 262k)
    with torch.no_grad():  # our chunked head agrees with the model's own loss
        own = sum(model(w[None], labels=w[None]).loss.item() * 127 for w in windows)
    assert math.isclose(res["nll_sum"], own, rel_tol=1e-4)


def test_one_search_step_on_alpaca(gemma_dir, tmp_path):
    require_shared()
    model, tok, manifest = load_model_dir(gemma_dir)
    spec = CalibrationSpec(str(ALPACA), nsamples=4, seqlen=64, max_windows=1)
    m = sample_calibration(spec, tok, tmp_path / "calib")
    assert m["windows"] == 1 and m["sampled_indices"] == sample_calibration(spec, tok, tmp_path / "again")["sampled_indices"]
    calib = load_calibration(tmp_path / "calib")
    pm = PrunableModel.wrap(model)
    inputs = {"model_hash": manifest["content_hash"]}
    rec = search_step(pm, calib.windows, 1, [], StepSettings(head_bound_columns=0), inputs, progress=False)
    assert len(rec["scores"]) == 36
    assert all(s["status"] == "done" for s in rec["scores"])  # one window: every candidate finishes
    dense = perplexity(pm, calib.windows, progress=False)["ppl"]
    assert math.isfinite(rec["ppl"]) and rec["ppl"] < 10 * dense  # removing the best block costs little
    worst = rec["scores"][-1]["ppl"]
    assert worst > rec["ppl"]  # some blocks matter far more than others
    # the default step (LM-head bound on) cuts losers but chooses the same block at the same NLL
    bounded = search_step(pm, calib.windows, 1, [], StepSettings(), inputs, progress=False)
    assert (bounded["removed_block"], bounded["nll_sum"]) == (rec["removed_block"], rec["nll_sum"])
    assert {s["status"] for s in bounded["scores"]} <= {"done", "bounded"}
    assert bounded["cost"]["head_tokens"] < rec["cost"]["head_tokens"]
    assert 0 < rec["params"]["ratio"] < 0.05
