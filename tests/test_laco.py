"""LaCo layer collapse: the RDSC merge by hand, the threshold, the saved checkpoint, real Gemma 3."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from blockpruner.compress import laco
from blockpruner.data.calibration import CalibrationSpec, load_calibration, sample_calibration
from blockpruner.model_dir import load_model_dir, load_tokenizer, read_manifest
from blockpruner.data.sources import prepare_model
from blockpruner.errors import UserError

from .conftest import ALPACA, require_shared, tiny_model, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = torch.tensor([[5, 9, 14, 3, 77, 21, 8, 60, 33, 12]])  # longer than the tiny sliding window (6)


def prepared(root: Path, arch: str, layers: int) -> tuple[Path, Path, torch.nn.Module]:
    """A tiny prepared model and a calibration artifact of random word tokens -> (model dir, calib dir, model)."""
    model = tiny_model(arch, num_hidden_layers=layers)
    model.save_pretrained(root / "src")
    word_tokenizer(whitespace=True).save_pretrained(root / "src")
    prepare_model(str(root / "src"), root / "prepared")
    rng = random.Random(0)
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"t{rng.randrange(4, 96)}" for _ in range(20))}) + "\n"
                            for _ in range(6)))
    spec = CalibrationSpec(str(data), nsamples=6, seqlen=16)
    sample_calibration(spec, load_tokenizer(root / "prepared"), root / "calib")
    return root / "prepared", root / "calib", model


def logits(model, ids=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_threshold_above_one_keeps_the_dense_model(tmp_path):
    model_dir, calib_dir, dense = prepared(tmp_path, "llama", 5)
    m = laco.compress(model_dir, calib_dir, tmp_path / "out", ratio=0.3,
                      settings={"merge_layers": 2, "lowest_layer": 0, "threshold": 1.5, "samples": 2})
    rec = m
    assert rec["trials"] and not rec["merges"] and rec["layers_removed"] == []
    assert rec["target_reached"] is False and rec["ratio"] == 0.0 and rec["params_pruned"] == rec["params_dense"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(logits(reloaded), logits(dense))


def test_one_merge_equals_rdsc_by_hand(tmp_path):
    """C = 3, two layers to remove: layers 3 and 4 collapse into layer 2 (l starts at H - C = 2)."""
    model_dir, calib_dir, dense = prepared(tmp_path, "llama", 5)
    m = laco.compress(model_dir, calib_dir, tmp_path / "out", ratio=0.1,
                      settings={"merge_layers": 3, "lowest_layer": 0, "threshold": -1.0, "layers": 2, "samples": 2})
    rec = m
    assert [(t["base"], t["merged"]) for t in rec["merges"]] == [(2, [3, 4])] and len(rec["trials"]) == 1
    assert rec["layers_removed"] == [3, 4] and rec["kept_layers"] == [0, 1, 2] and rec["target_reached"]
    assert -1.0 <= rec["merges"][0]["similarity"] <= 1.0

    sd = dense.state_dict()
    expected = {k: v for k, v in sd.items() if not k.startswith(("model.layers.3.", "model.layers.4."))}
    for key in [k for k in expected if k.startswith("model.layers.2.")]:
        rest = key[len("model.layers.2."):]
        if rest.startswith(("self_attn.", "mlp.")):
            expected[key] = sd[key] + (sd[f"model.layers.3.{rest}"] - sd[key]) + (sd[f"model.layers.4.{rest}"] - sd[key])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # plain: no remote code
    assert reloaded.config.num_hidden_layers == 3
    got = reloaded.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(got["model.layers.2.input_layernorm.weight"], sd["model.layers.4.input_layernorm.weight"])

    layer_params = sum(p.numel() for p in dense.model.layers[0].parameters())
    assert rec["params_dense"] - rec["params_pruned"] == 2 * layer_params
    assert rec["ratio"] == pytest.approx(2 * layer_params / rec["params_dense"])
    manifest = read_manifest(tmp_path / "out")
    assert manifest["num_layers"] == 3 and manifest["parameters"] == rec["params_pruned"]
    model, _, _ = load_model_dir(tmp_path / "out")  # the evaluations' loader
    torch.testing.assert_close(logits(model), logits(reloaded))


def test_consistency_saved_gemma3_collapse_equals_the_in_memory_one(tmp_path):
    """Gemma 3: layer_types follow the kept layers, and the reloaded checkpoint equals the
    in-memory result (a consistency check; the merge itself is checked against RDSC computed by
    hand in test_one_merge_equals_rdsc_by_hand)."""
    model_dir, calib_dir, _ = prepared(tmp_path, "gemma3_text", 6)
    m = laco.compress(model_dir, calib_dir, tmp_path / "out", ratio=0.1,
                      settings={"merge_layers": 2, "lowest_layer": 0, "threshold": -1.0, "layers": 2, "samples": 2})
    rec = m
    dense, _, _ = load_model_dir(model_dir)
    types = dense.config.layer_types
    in_memory, _, _ = load_model_dir(model_dir)
    windows = load_calibration(calib_dir).windows[:2]
    kept, _ = laco.collapse(in_memory, windows, laco.LacoSettings(merge_layers=2, lowest_layer=0, threshold=-1.0), 2)
    assert kept == rec["kept_layers"] and len(kept) == 4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.layer_types == [types[i] for i in kept]
    assert in_memory.config.layer_types == reloaded.config.layer_types
    torch.testing.assert_close(logits(reloaded), logits(in_memory))


def test_layers_for_ratio_is_the_fewest_reaching_it():
    assert laco.layers_for_ratio([10] * 8, 100, 0.2) == 2
    assert laco.layers_for_ratio([10] * 8, 100, 0.21) == 3
    assert laco.layers_for_ratio([10] * 8, 100, 0.1) == 1
    with pytest.raises(UserError, match="lower the ratio"):
        laco.layers_for_ratio([10] * 8, 100, 0.8)


@pytest.mark.parametrize("settings, message", [
    ({"merge_layer": 3}, "unknown LaCo setting"),
    ({"threshold": "high"}, "must be a number"),
    ({"merge_layers": 1}, "at least 2"),
    ({"merge_layers": 4, "lowest_layer": 3}, "no merge is ever tried"),
    ({"layers": 5}, "between 1 and 4"),
])
def test_bad_settings_refused_before_loading(tmp_path, settings, message):
    model_dir, calib_dir, _ = prepared(tmp_path, "llama", 5)
    with pytest.raises(UserError, match=message):
        laco.compress(model_dir, calib_dir, tmp_path / "out", ratio=0.2, settings=settings)
    assert not (tmp_path / "out").exists()


@pytest.mark.gemma
def test_real_gemma3_270m(gemma_dir, tmp_path):
    """Two 64-token Alpaca samples, two layers removed from the 18 of Gemma 3 270M."""
    require_shared()
    tok = load_tokenizer(gemma_dir)
    spec = CalibrationSpec(str(ALPACA), nsamples=6, seqlen=64, max_windows=2)
    sample_calibration(spec, tok, tmp_path / "calib")
    m = laco.compress(gemma_dir, tmp_path / "calib", tmp_path / "out", ratio=0.05,
                      settings={"layers": 2, "samples": 2, "threshold": 0.0})
    rec = m
    assert rec["layers"] == 16 and rec["target_reached"] and len(rec["layers_removed"]) == 2
    dense_layer = (rec["params_dense"] - rec["params_pruned"]) / 2
    assert rec["ratio"] == pytest.approx(2 * dense_layer / rec["params_dense"]) and 0.01 < rec["ratio"] < 0.05
    assert all(t["similarity"] > 0 for t in rec["merges"])

    in_memory, _, _ = load_model_dir(gemma_dir)
    windows = load_calibration(tmp_path / "calib").windows[:2]
    settings = laco.LacoSettings(layers=2, samples=2, threshold=0.0)
    kept, _ = laco.collapse(in_memory, windows, settings, 2)
    assert kept == rec["kept_layers"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = windows[0][None]
    torch.testing.assert_close(logits(reloaded, ids), logits(in_memory, ids), rtol=1e-4, atol=1e-4)
