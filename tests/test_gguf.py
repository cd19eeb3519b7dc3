"""GGUF export run in llama.cpp itself (llama-cpp-python, built by envs/llama-cpp.sh): the file
computes the pruned model's logits, generates its greedy tokens and tokenizes as it does."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from blockpruner.cli import main
from blockpruner.data.sources import prepare_model
from blockpruner.errors import UserError
from blockpruner.export import decilm, llamacpp, materialize
from blockpruner.export.decilm import DeciLayer, pack_layers
from blockpruner.export.llamacpp import export_gguf, gguf_logits, open_gguf

from .conftest import llama2_style_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# five block patterns llama.cpp's deci graph handles differently, on a 6-layer model: (a) attention only, (b) an MLP whose attention
# stays, (c) the last layer's MLP, (d) layer 0's attention, (e) a whole layer
CASES = {"attn_only": ["attn.2", "attn.4"], "mlp_kept_attn": ["mlp.2"], "last_mlp": ["mlp.5"],
         "layer0_attn": ["attn.0"], "whole_layer": ["attn.3", "mlp.3"]}
F16_KV_ATOL = 5e-2  # llama.cpp's default KV cache is f16: ~1e-2 on these logits
TEXT = "Pruning removes whole blocks. The model that is left runs faster, and it still writes text like this."


@pytest.fixture(scope="session")
def converter() -> Path:
    try:
        return llamacpp.find_converter()
    except UserError as e:
        pytest.fail(f"{e}")


def reference_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    model = materialize.load_pruned(model_dir, dtype="float32")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def reference_greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from full forwards without a cache (no end-of-sequence handling)."""
    model = materialize.load_pruned(model_dir, dtype="float32")
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(ids):].tolist()


def llama_cpp_greedy(path: Path, ids: list[int], n: int, f32_kv: bool = False) -> list[int]:
    """Greedy tokens from llama.cpp, one token at a time through its KV cache (f16 by default)."""
    llm = open_gguf(path, n_ctx=256, f32_kv=f32_kv)
    try:
        llm.eval(ids)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        return out
    finally:
        llm.close()


def tiny_llama_dir(root: Path, vocab: str, smollm_dir: Path, **over) -> Path:
    """A 6-layer random Llama with a real vocabulary, prepared like any source: SmolLM2's BPE (with
    its pre-tokenizer) or a SentencePiece BPE with byte fallback laid out as Llama 2's."""
    if vocab == "bpe":
        tok = AutoTokenizer.from_pretrained(smollm_dir)
        tok.save_pretrained(root / "src")
    else:
        tok = llama2_style_tokenizer(root / "src")
    model = tiny_model("llama", num_hidden_layers=6, vocab_size=len(tok), hidden_size=64, intermediate_size=256,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                       pad_token_id=None, bos_token_id=1, eos_token_id=2, **over)
    model.save_pretrained(root / "src")
    prepare_model(str(root / "src"), root / "prepared")
    return root / "prepared"


def pruned(prepared: Path, root: Path, removed: list[str]) -> Path:
    materialize.materialize(prepared, None, root / "pruned", removed=removed)
    return root / "pruned"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, smollm_dir):
    return {vocab: tiny_llama_dir(tmp_path_factory.mktemp(vocab), vocab, smollm_dir) for vocab in ("bpe", "spm")}


def test_pack_layers_by_hand():
    keep = lambda attn, mlp: {"source_layer": 0, "attn": attn, "mlp": mlp}  # noqa: E731
    # A0 M0 | A1 - | - M2  ->  (A0,M0) (A1,M2): an attention-less layer joins the attention before it
    assert pack_layers([keep(True, True), keep(True, False), keep(False, True)]) == [
        DeciLayer(0, 0), DeciLayer(1, 2)]
    # A0 - | A1 M1  ->  (A0, zero FFN) (A1,M1): two attentions in a row need a placeholder between them
    assert pack_layers([keep(True, False), keep(True, True)]) == [
        DeciLayer(0, None, placeholder_ffn=True), DeciLayer(1, 1)]
    # - M0 | A1 -  ->  (zero linear attention, M0) (A1, zero FFN)
    assert pack_layers([keep(False, True), keep(True, False)]) == [
        DeciLayer(None, 0, placeholder_attn=True), DeciLayer(1, None, placeholder_ffn=True)]
    # - M0 | - M1  ->  (zero linear attention, M0) (-, M1)
    assert pack_layers([keep(False, True), keep(False, True)]) == [
        DeciLayer(None, 0, placeholder_attn=True), DeciLayer(None, 1)]


@pytest.mark.parametrize("vocab", ["bpe", "spm"])
@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_computes_the_pruned_model(case, vocab, tiny_dirs, converter, tmp_path):
    pruned_dir = pruned(tiny_dirs[vocab], tmp_path, CASES[case])
    out = tmp_path / "model.gguf"
    meta = export_gguf(pruned_dir, out, "f32", converter=converter)
    assert meta["removed"] == CASES[case]
    ids = AutoTokenizer.from_pretrained(pruned_dir)(TEXT)["input_ids"]
    ref = reference_logits(pruned_dir, ids)
    exact = gguf_logits(out, ids, f32_kv=True)
    default = gguf_logits(out, ids, f32_kv=False)
    assert np.abs(exact - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(default - ref).max() < F16_KV_ATOL
    assert (default.argmax(-1) == ref.argmax(-1)).all()
    # an f16 cache can flip a near-tie of these random logits a few tokens in; the real model below
    # generates with the default cache
    assert llama_cpp_greedy(out, ids, 32, f32_kv=True) == reference_greedy(pruned_dir, ids, 32)


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_converter_reads_the_nemotron_nas_export(case, tiny_dirs, converter, tmp_path):
    """llama.cpp's own convert_hf_to_gguf.py on the Nemotron-NAS directory (no auto_map, so no
    question about remote code; a SentencePiece vocabulary, which its DeciLM reader knows) gives a
    file that computes the pruned model."""
    pruned_dir = pruned(tiny_dirs["spm"], tmp_path, CASES[case])
    decilm.to_decilm(pruned_dir, tmp_path / "nas")
    out = tmp_path / "nas.gguf"
    run = subprocess.run([sys.executable, str(converter), "--outtype", "f32", "--outfile", str(out), str(tmp_path / "nas")],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-1500:]
    ids = AutoTokenizer.from_pretrained(pruned_dir)(TEXT)["input_ids"]
    ref = reference_logits(pruned_dir, ids)
    got = gguf_logits(out, ids, f32_kv=True)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_llama3_rope_scaling(smollm_dir, converter, tmp_path, monkeypatch):
    """Llama 3.1/3.2's RoPE (frequencies scaled by wavelength) travels as llama.cpp's rope_freqs."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    prepared = tiny_llama_dir(tmp_path / "m", "bpe", smollm_dir, rope_parameters=rope)
    pruned_dir = pruned(prepared, tmp_path, CASES["mlp_kept_attn"])
    out = tmp_path / "model.gguf"
    export_gguf(pruned_dir, out, "f32", converter=converter)
    ids = AutoTokenizer.from_pretrained(pruned_dir)(TEXT)["input_ids"]
    ref = reference_logits(pruned_dir, ids)
    assert np.abs(gguf_logits(out, ids, f32_kv=True) - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    # the same weights without the scaling compute something else: the factors are not a no-op here
    monkeypatch.setattr(llamacpp, "rope_factors", lambda d: None)
    export_gguf(pruned_dir, tmp_path / "plain.gguf", "f32", converter=converter)
    assert np.abs(gguf_logits(tmp_path / "plain.gguf", ids, f32_kv=True) - ref).max() > 1e-3


def test_tokenizers_agree(tiny_dirs, converter, tmp_path):
    """llama.cpp tokenizes text as the directory's tokenizer does, for both vocabulary types."""
    texts = [TEXT, "Hello world, 3.14159 and naïve café.", "Résumé: ünïcode bytes ☃ fall back."]
    for vocab, prepared in tiny_dirs.items():
        out = tmp_path / f"{vocab}.gguf"
        export_gguf(prepared, out, "f32", converter=converter)
        tok = AutoTokenizer.from_pretrained(prepared)
        llm = open_gguf(out)
        try:
            for text in texts:
                add_bos = tok("x")["input_ids"][0] == tok.bos_token_id
                assert llm.tokenize(text.encode(), add_bos=add_bos, special=False) == tok(text)["input_ids"], (vocab, text)
        finally:
            llm.close()


# SmolLM2-135M: every pattern of CASES in one pruning of the real model
SMOL_REMOVED = ["attn.0", "attn.12", "attn.14", "mlp.20", "attn.21", "mlp.21", "mlp.29"]


# a milder pruning for the quantisation figures (attention only, an MLP whose attention stays, a whole
# layer): WikiText-2 perplexity 45.1 dense, 90.7 pruned, against thousands with SMOL_REMOVED
SMOL_MILD = ["attn.12", "attn.14", "mlp.20", "attn.21", "mlp.21"]


@pytest.fixture(scope="module")
def smol_pruned(smollm_dir, tmp_path_factory):
    return pruned(smollm_dir, tmp_path_factory.mktemp("smol"), SMOL_REMOVED)


@pytest.fixture(scope="module")
def smol_mild(smollm_dir, tmp_path_factory):
    return pruned(smollm_dir, tmp_path_factory.mktemp("smol-mild"), SMOL_MILD)


def test_real_model_in_llama_cpp(smol_pruned, converter, tmp_path):
    out = tmp_path / "smol.gguf"
    meta = export_gguf(smol_pruned, out, "f32", converter=converter, check_tokens=16)
    assert meta["check"]["argmax_agree"] == 16
    ids = AutoTokenizer.from_pretrained(smol_pruned)(TEXT)["input_ids"]
    ref = reference_logits(smol_pruned, ids)
    got = gguf_logits(out, ids, f32_kv=False)
    assert np.abs(got - ref).max() < F16_KV_ATOL * max(1.0, np.abs(ref).max() / 10)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert llama_cpp_greedy(out, ids, 32) == reference_greedy(smol_pruned, ids, 32)


def windows_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Mean next-token NLL from a window's logits (float64 log-softmax)."""
    x = logits[:-1].astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    return float((lse - x[np.arange(len(ids) - 1), ids[1:]]).mean())


def test_quantised_files_load_generate_and_keep_perplexity(smol_mild, converter, tmp_path, capsys):
    """llama.cpp's own quantiser: each file loads and generates; its perplexity on WikiText-2 text
    sits next to the f32 file's, which equals the pruned model's own (torch)."""
    from blockpruner.eval.wikitext import load_wikitext_rows, wikitext_windows

    from .conftest import DATA

    tok = AutoTokenizer.from_pretrained(smol_mild)
    rows, _ = load_wikitext_rows(str(DATA / "wikitext2" / "test.rows.jsonl"))
    windows = [w.flatten().tolist() for w in wikitext_windows(tok, rows, 128, max_windows=4)[0]]
    torch_ppl = math.exp(np.mean([windows_nll(reference_logits(smol_mild, w), w) for w in windows]))
    ppl, sizes = {}, {}
    for outtype in ("f32", "f16", "bf16", "q8_0", "q4_k_m"):
        out = tmp_path / f"smol-{outtype}.gguf"
        export_gguf(smol_mild, out, outtype, converter=converter)
        sizes[outtype] = out.stat().st_size
        ppl[outtype] = math.exp(np.mean([windows_nll(gguf_logits(out, w, f32_kv=False), w) for w in windows]))
        gen = llama_cpp_greedy(out, windows[0][:16], 16)
        assert len(gen) == 16 and all(0 <= t < len(tok) for t in gen)
    with capsys.disabled():
        print(f"\nSmolLM2-135M minus {len(SMOL_MILD)} blocks, 4 x 128 WikiText-2 tokens: torch ppl {torch_ppl:.3f}; "
              + ", ".join(f"{k} {ppl[k]:.3f} ({sizes[k] / 1e6:.0f} MB)" for k in ppl))
    assert abs(ppl["f32"] / torch_ppl - 1) < 2e-3  # f32 weights, f16 KV cache
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"]
    for outtype, rel in (("f16", 0.01), ("bf16", 0.03), ("q8_0", 0.03), ("q4_k_m", 0.25)):
        assert abs(ppl[outtype] / ppl["f32"] - 1) < rel, (outtype, ppl)


def test_llama_cpp_check_catches_a_wrong_layout(tiny_dirs, converter, tmp_path, monkeypatch):
    """Without the RoPE row permutation llama.cpp computes another model; the export's check refuses it."""
    pruned_dir = pruned(tiny_dirs["bpe"], tmp_path, CASES["attn_only"])
    monkeypatch.setattr(llamacpp, "permute_rows", lambda w, n: w)
    with pytest.raises(UserError, match="differently"):
        export_gguf(pruned_dir, tmp_path / "wrong.gguf", "f32", converter=converter, check_tokens=16)
    assert not (tmp_path / "wrong.gguf").exists()


def test_cli_export_gguf_and_refusals(tiny_dirs, converter, tmp_path, capsys):
    pruned_dir = pruned(tiny_dirs["spm"], tmp_path, CASES["layer0_attn"])
    assert main(["export-gguf", str(pruned_dir), str(tmp_path / "m.gguf"), "--outtype", "q8_0",
                 "--converter", str(converter), "--check-tokens", "8"]) in (0, None)
    assert (tmp_path / "m.gguf").stat().st_size > 0
    capsys.readouterr()
    assert main(["export-gguf", str(pruned_dir), str(tmp_path / "x.gguf"), "--outtype", "q3"]) == 2
    assert "--outtype 'q3' is not one of" in capsys.readouterr().err
    assert main(["export-gguf", str(pruned_dir), str(tmp_path / "x.gguf"), "--converter", str(tmp_path / "none.py")]) == 2
    err = capsys.readouterr().err
    assert "converter not found" in err and "envs/llama-cpp.sh" in err and len(err.strip().splitlines()) == 1


def test_other_architectures_refused_before_work(tmp_path, capsys):
    from .test_export import prepared_tiny

    prepared, _ = prepared_tiny(tmp_path, "qwen3", layers=2)
    assert main(["export-gguf", str(prepared), str(tmp_path / "q.gguf")]) == 2
    err = capsys.readouterr().err
    assert "Llama-family" in err and "'qwen3'" in err
    assert not (tmp_path / "q.gguf").exists()


def test_speed_gguf_times_both_files_and_reads_llama_cpps_kv_cache(tiny_dirs, converter, tmp_path):
    """speed-gguf: both files timed in one run; the KV cache llama.cpp reports with flash attention
    equals f16 K and V rows for the remaining attention blocks only (counted from the config)."""
    import json

    pruned_dir = pruned(tiny_dirs["spm"], tmp_path, CASES["attn_only"])
    export_gguf(tiny_dirs["spm"], tmp_path / "dense.gguf", "f32", converter=converter)
    export_gguf(pruned_dir, tmp_path / "pruned.gguf", "f32", converter=converter)
    assert main(["speed-gguf", "--model", str(tmp_path / "pruned.gguf"), "--baseline", str(tmp_path / "dense.gguf"),
                 "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "2", "--warmup", "0",
                 "--out", str(tmp_path / "speed.json")]) in (0, None)
    r = json.loads((tmp_path / "speed.json").read_text())
    cfg = json.loads((pruned_dir / "config.json").read_text())
    kv_row = 2 * cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"])  # f16 bytes
    attention = sum(k["attn"] for k in cfg["pruned_layers"])
    assert r["model"]["kv_bytes_per_token_flash"] == 2 * kv_row * attention == 2 * kv_row * 4
    assert r["baseline"]["kv_bytes_per_token_flash"] == 2 * kv_row * 6
    assert r["kv_cache_reduction_flash"] == pytest.approx(2 / 6)
    for role in ("model", "baseline"):
        assert len(r[role]["gen_s"]) == 2 and r[role]["gen_tokens_per_s"] == pytest.approx(4 / np.median(r[role]["gen_s"]))
    assert r["gen_speedup"] == pytest.approx(r["model"]["gen_tokens_per_s"] / r["baseline"]["gen_tokens_per_s"])
