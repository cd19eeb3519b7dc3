"""Materialised pruned models: physically smaller, loadable two ways, equal to the in-memory pruning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from blockpruner.adapters import adapter_for
from blockpruner.blocks import PrunableModel, parse_block
from blockpruner.model_dir import load_model_dir, read_manifest
from blockpruner.data.sources import prepare_model
from blockpruner.errors import UserError
from blockpruner.export import decilm, materialize
from blockpruner.search.greedy import StepSettings, search_step
from blockpruner.steps import write_step

from .conftest import ARCHS, tiny_model, word_tokenizer

# 5 layers: attn.0 gone (layer 0 is MLP-only), layer 1 gone entirely, layer 3 MLP-only between the
# attention layers 2 and 4, layer 4 attention-only. On Gemma 3 the kept attention is one sliding
# (layer 2) and one full (layer 4) layer, so the cache's slot types must follow the renumbering.
PATTERN = ["attn.0", "mlp.1", "attn.1", "attn.3", "mlp.4"]
PROMPT = torch.tensor([[5, 9, 14, 3, 77, 21, 8, 60, 33, 12]])  # longer than the tiny sliding window (6)


pytestmark = pytest.mark.usefixtures("one_thread")


def prepared_tiny(root: Path, arch: str, layers: int = 5, **over) -> tuple[Path, torch.nn.Module]:
    """A tiny random model written and prepared like a real source; returns (prepared dir, model)."""
    model = tiny_model(arch, num_hidden_layers=layers, **over)
    model.save_pretrained(root / "src")
    word_tokenizer().save_pretrained(root / "src")
    prepare_model(str(root / "src"), root / "prepared")
    return root / "prepared", model


def step_record(model, model_dir: Path, removed: list[str]) -> dict:
    """A step artifact with the fields search_step writes (scores etc. are not read by export)."""
    pm = PrunableModel.wrap(model)
    kinds = [parse_block(b)[0] for b in removed]
    return {
        "k": len(removed), "removed_block": removed[-1], "ppl": 1.0, "nll_sum": 0.0, "tokens": 1,
        "removed": list(removed), "attn_removed": kinds.count("attn"), "mlp_removed": kinds.count("mlp"),
        "params": pm.param_summary(removed), "scores": [], "settings": {"method": "blockpruner"},
        "inputs": {"model": str(model_dir), "model_hash": read_manifest(model_dir)["content_hash"],
                   "calibration": None, "calibration_hash": None, "previous_step": None},
    }


def eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def greedy_without_cache(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Reference decoding: a full forward over the whole sequence for every new token.

    End-of-sequence ids are suppressed, as generate(min_new_tokens=n) does.
    """
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids, use_cache=False).logits[:, -1]
            logits[:, eos_ids(model)] = -math.inf
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def remote_load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


def tensor_names(path: Path) -> set[str]:
    with safe_open(str(path / materialize.WEIGHTS_FILE), "pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def materialised(tmp_path_factory):
    """arch -> (in-memory model with PATTERN removed, prepared dir, pruned dir, step record)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            root = tmp_path_factory.mktemp(arch)
            prep, model = prepared_tiny(root, arch)
            rec = step_record(model, prep, PATTERN)
            write_step(root / "step_5.json", rec)
            materialize.materialize(prep, root / "step_5.json", root / "pruned")
            pm = PrunableModel.wrap(model)
            pm.set_removed(PATTERN)
            cache[arch] = (model, prep, root / "pruned", rec)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_both_loaders_equal_in_memory_pruning(arch, materialised):
    model, _, pruned, _ = materialised(arch)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        for loaded in (materialize.load_pruned(pruned), remote_load(pruned)):
            assert loaded.config.num_hidden_layers == 4
            torch.testing.assert_close(loaded(ids).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_with_kv_cache(arch, materialised):
    """Greedy decoding with the cache equals full recomputation by the in-memory pruned model.

    Layer 0 has no attention and layer 3 (attention-less) sits between attention layers, so a
    cache slot owned by an attention-less layer would restart the positions or shift the slots.
    """
    model, _, pruned, _ = materialised(arch)
    want = greedy_without_cache(model, PROMPT, 6)
    for loaded in (materialize.load_pruned(pruned), remote_load(pruned)):
        out = loaded.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=False, max_new_tokens=6,
                              min_new_tokens=6, return_dict_in_generate=True, pad_token_id=0)
        assert out.sequences.tolist() == want.tolist()
        cache = out.past_key_values
        assert len(cache.layers) == 2  # one slot per remaining attention block (layers 2 and 4)
        assert all(layer.keys is not None and layer.keys.shape[-2] > 0 for layer in cache.layers)
        types = getattr(model.config, "layer_types", None)
        if types:
            assert cache.is_sliding == [types[i] == "sliding_attention" for i in (2, 4)]
        # no mask, no positions: the model takes the position from the cache's slot 0
        with torch.no_grad():
            cache = loaded(PROMPT, use_cache=True).past_key_values
            assert cache.get_seq_length() == PROMPT.shape[1]
            step = loaded(want[:, 10:11], past_key_values=cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(step, model(want[:, :11], use_cache=False).logits[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_removed_blocks_have_no_tensors(arch, materialised):
    model, prep, pruned, rec = materialised(arch)
    adapter = adapter_for(model.config.model_type)
    names = tensor_names(pruned)
    prefix = adapter.layers + "."
    # new layer j <- source layer: 0 <- 0 (mlp), 1 <- 2 (attn+mlp), 2 <- 3 (mlp), 3 <- 4 (attn)
    layout = [(0, False, True), (2, True, True), (3, False, True), (4, True, False)]
    assert {int(n[len(prefix):].split(".")[0]) for n in names if n.startswith(prefix)} == {0, 1, 2, 3}
    for j, (_, attn, mlp) in enumerate(layout):
        for kind, present in (("attn", attn), ("mlp", mlp)):
            for part in adapter.branch(kind).parts():
                has = any(n.startswith(f"{prefix}{j}.{part}.") for n in names)
                assert has == present, (j, part)
    loaded = materialize.load_pruned(pruned)
    assert sum(p.numel() for p in loaded.parameters()) == rec["params"]["remaining"]
    assert read_manifest(pruned)["parameters"] == rec["params"]["remaining"]
    cfg = json.loads((pruned / "config.json").read_text())
    assert cfg["pruning"]["removed"] == PATTERN and cfg["pruning"]["k"] == 5
    assert cfg["pruning"]["method"] == "blockpruner" and cfg["pruning"]["source_hash"] == read_manifest(prep)["content_hash"]
    assert [(k["source_layer"], k["attn"], k["mlp"]) for k in cfg["pruned_layers"]] == layout
    if "layer_types" in cfg:
        src = json.loads((prep / "config.json").read_text())["layer_types"]
        assert cfg["layer_types"] == [src[i] for i, _, _ in layout]


def test_attention_module_renumbered(materialised):
    _, _, pruned, _ = materialised("gemma3_text")
    loaded = materialize.load_pruned(pruned)
    attn = [(j, layer.self_attn.layer_idx) for j, layer in enumerate(loaded.model.layers) if hasattr(layer, "self_attn")]
    assert attn == [(1, 0), (3, 1)]
    assert not hasattr(loaded.model.layers[0], "input_layernorm")  # the attention block's norm went with it
    assert not hasattr(loaded.model.layers[3], "pre_feedforward_layernorm")


def test_load_model_dir_reads_materialised_dir(materialised):
    """Later stages load models with model_dir.load_model_dir: the pruned dir has a manifest too."""
    model, _, pruned, _ = materialised("llama")
    loaded, tok, manifest = load_model_dir(pruned)
    assert manifest["num_layers"] == 4 and manifest["pruning"]["removed"] == PATTERN
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROMPT).logits, model(PROMPT).logits, atol=1e-5, rtol=0)


def test_blockpruner_perplexity_of_materialised_model(materialised):
    """Evaluation wraps models in PrunableModel; a pruned model keeps its own forward under it."""
    from blockpruner.eval.wikitext import perplexity

    model, _, pruned, _ = materialised("gemma2")
    windows = [torch.randint(3, 96, (12,), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    want = perplexity(PrunableModel.wrap(model), windows, progress=False)  # PATTERN set in memory
    pm = PrunableModel.wrap(materialize.load_pruned(pruned))
    pm.set_removed([])
    got = perplexity(pm, windows, progress=False)
    assert math.isclose(got["nll_sum"], want["nll_sum"], rel_tol=1e-6)
    pm.set_removed(["mlp.1"])  # further in-memory removal of a block that is still there
    assert perplexity(pm, windows, progress=False)["nll_sum"] != got["nll_sum"]


def test_real_search_steps(tmp_path):
    """Three greedy steps on a tiny model, then materialise the last artifact."""
    prep, _ = prepared_tiny(tmp_path, "qwen3", layers=4)
    model, _, manifest = load_model_dir(prep)
    pm = PrunableModel.wrap(model)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(3, 96, (10,), generator=g) for _ in range(2)]
    removed = []
    for k in (1, 2, 3):
        rec = search_step(pm, windows, k, removed, StepSettings(), {"model_hash": manifest["content_hash"]}, progress=False)
        write_step(tmp_path / f"step_{k}.json", rec)
        removed = rec["removed"]
    summary = materialize.materialize(prep, tmp_path / "step_3.json", tmp_path / "pruned")
    assert summary["removed"] == removed and summary["params"] == rec["params"]["remaining"]
    pm.set_removed(removed)
    with torch.no_grad():
        torch.testing.assert_close(materialize.load_pruned(tmp_path / "pruned")(PROMPT).logits, model(PROMPT).logits,
                                   atol=1e-5, rtol=0)


def test_bf16_model_stays_bf16(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    model.save_pretrained(tmp_path / "src")
    word_tokenizer().save_pretrained(tmp_path / "src")
    prep = tmp_path / "prepared"
    prepare_model(str(tmp_path / "src"), prep, dtype="bf16")
    dense, _, _ = load_model_dir(prep)
    removed = ["mlp.1", "attn.0"]
    write_step(tmp_path / "step.json", step_record(dense, prep, removed))
    materialize.materialize(prep, tmp_path / "step.json", tmp_path / "pruned")
    PrunableModel.wrap(dense).set_removed(removed)
    assert read_manifest(tmp_path / "pruned")["dtype"] == "bf16"
    with torch.no_grad():
        for loaded in (materialize.load_pruned(tmp_path / "pruned"), load_model_dir(tmp_path / "pruned")[0]):
            assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
            torch.testing.assert_close(loaded(PROMPT).logits, dense(PROMPT).logits, atol=0, rtol=0)


def test_all_attention_removed(tmp_path):
    """No attention left: the cache stays empty and decoding still matches."""
    prep, model = prepared_tiny(tmp_path, "llama", layers=2)
    removed = ["attn.1", "attn.0"]
    write_step(tmp_path / "step.json", step_record(model, prep, removed))
    materialize.materialize(prep, tmp_path / "step.json", tmp_path / "pruned")
    PrunableModel.wrap(model).set_removed(removed)
    loaded = materialize.load_pruned(tmp_path / "pruned")
    out = loaded.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=False, max_new_tokens=4,
                          min_new_tokens=4, pad_token_id=0)
    assert out.tolist() == greedy_without_cache(model, PROMPT, 4).tolist()


def test_multimodal_gemma3(tmp_path):
    """Gemma 3 4B+ is multimodal: only the language model (under text_config) is pruned."""
    import transformers as tf

    text = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, sliding_window=6, max_position_embeddings=128, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.Gemma3Config(text_config=text, vision_config=vision,
                                                                mm_tokens_per_image=4, image_token_index=95,
                                                                boi_token_index=93, eoi_token_index=94)).eval()
    model.save_pretrained(tmp_path / "src")
    word_tokenizer().save_pretrained(tmp_path / "src")
    prep = tmp_path / "prepared"
    prepare_model(str(tmp_path / "src"), prep)
    removed = ["attn.0", "mlp.1", "attn.1"]
    write_step(tmp_path / "step.json", step_record(model, prep, removed))
    materialize.materialize(prep, tmp_path / "step.json", tmp_path / "pruned")
    PrunableModel.wrap(model).set_removed(removed)
    cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 3 and len(cfg["text_config"]["layer_types"]) == 3
    with torch.no_grad():
        for loaded in (materialize.load_pruned(tmp_path / "pruned"), remote_load(tmp_path / "pruned")):
            torch.testing.assert_close(loaded(PROMPT).logits, model(PROMPT).logits, atol=1e-5, rtol=0)
            out = loaded.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=False, max_new_tokens=4,
                                  min_new_tokens=4, return_dict_in_generate=True)
            assert out.sequences.tolist() == greedy_without_cache(model, PROMPT, 4).tolist()
            assert len(out.past_key_values.layers) == 2


def test_stale_step_refused(tmp_path, materialised):
    model, prep, _, rec = materialised("llama")
    write_step(tmp_path / "step.json", rec | {"inputs": rec["inputs"] | {"model_hash": "0" * 64}})
    with pytest.raises(UserError, match="stale"):
        materialize.materialize(prep, tmp_path / "step.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_step_for_a_different_model_size_refused(tmp_path, materialised):
    """A step whose parameter count disagrees with the model is caught, and nothing is written."""
    model, prep, _, rec = materialised("llama")
    bad = rec | {"params": rec["params"] | {"remaining": rec["params"]["remaining"] + 1}}
    write_step(tmp_path / "step.json", bad)
    with pytest.raises(UserError, match="parameters"):
        materialize.materialize(prep, tmp_path / "step.json", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def _copy_pruned(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["missing", "unexpected", "wrong shape"])
def test_damaged_weights_refused(tmp_path, materialised, damage):
    _, _, pruned, _ = materialised("llama")
    bad = _copy_pruned(pruned, tmp_path / "bad")
    tensors = load_file(str(bad / materialize.WEIGHTS_FILE))
    if damage == "missing":
        del tensors["model.layers.1.self_attn.k_proj.weight"]
    elif damage == "unexpected":  # e.g. weights of a removed block left behind
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"].clone()
    else:
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1].clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(bad / materialize.WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(UserError, match=damage):
        materialize.load_pruned(bad)
    if damage == "wrong shape":  # transformers itself refuses a shape mismatch
        with pytest.raises(RuntimeError, match="mismatched_sizes"):
            remote_load(bad)
    else:  # transformers would only warn: the carried modeling code refuses
        with pytest.raises(ValueError, match="do not match the pruned model"):
            remote_load(bad)


def test_not_a_pruned_dir(materialised):
    _, prep, _, _ = materialised("llama")
    with pytest.raises(UserError, match="not a materialised pruned model"):
        materialize.load_pruned(prep)


def test_cli_materialize(tmp_path, materialised):
    from blockpruner.cli import main

    _, prep, pruned, _ = materialised("llama")
    step = pruned.parent / "step_5.json"
    assert main(["materialize", "--model", str(prep), "--step", str(step), "--out", str(tmp_path / "p")]) == 0
    assert tensor_names(tmp_path / "p") == tensor_names(pruned)
    assert main(["materialize", "--model", str(prep), "--step", str(tmp_path / "nope.json"), "--out", str(tmp_path / "q")]) == 2
    # the tiny FFN (48) has no Nemotron-NAS form: refused before anything is written
    assert main(["materialize", "--model", str(prep), "--step", str(step), "--out", str(tmp_path / "r"),
                 "--nemotron-nas", str(tmp_path / "nas")]) == 2
    assert not (tmp_path / "r").exists() and not (tmp_path / "nas").exists()


# -- Nemotron-NAS (DeciLM) -----------------------------------------------------------------------
# Reference: config.json of nvidia/Llama-3_3-Nemotron-Super-49B-v1
# (https://huggingface.co/nvidia/Llama-3_3-Nemotron-Super-49B-v1/blob/main/config.json, as quoted in
# NVIDIA's public test fixtures; found with the code search tool). Every block_configs entry there
# has exactly these keys; attention-free layers have n_heads_in_group null + no_op true and FFN-free
# ones ffn_mult null + no_op true. The readers: vLLM model_executor/models/nemotron_nas.py (layers named
# like Llama's: input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
# mlp.{gate,up,down}_proj; no modules for a no_op block) and llama.cpp convert_hf_to_gguf DeciModel.
NAS_ATTENTION_KEYS = {"n_heads_in_group", "no_op", "num_sink_tokens", "replace_with_linear", "sparsify",
                      "unshifted_sink", "use_prefill_window_in_sink_attention", "window_length"}
NAS_FFN_KEYS = {"ffn_mult", "no_op", "replace_with_linear", "sparsify"}
NAS_TOP_KEYS = {"architectures", "attention_bias", "attention_dropout", "auto_map", "block_configs", "bos_token_id",
                "eos_token_id", "hidden_act", "hidden_size", "initializer_range", "intermediate_size",
                "max_position_embeddings", "mlp_bias", "model_type", "num_attention_heads", "num_hidden_layers",
                "num_key_value_heads", "pretraining_tp", "rms_norm_eps", "rope_scaling", "rope_theta",
                "tie_word_embeddings", "torch_dtype", "use_cache", "vocab_size"}
NAS_LAYER_TENSORS = {"attn": {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                              "self_attn.v_proj.weight", "self_attn.o_proj.weight"},
                     "mlp": {"post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                             "mlp.down_proj.weight"}}


def reader_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The FFN width a DeciLM reader builds from `ffn_mult`, as vLLM's nemotron_nas.py
    (`_ffn_mult_to_intermediate_size` + `_find_multiple`) and llama.cpp's convert_hf_to_gguf.py
    (`DeciModel._ffn_mult_to_intermediate_size`) both write it: round_up(int(2 * ffn_mult * hidden / 3), 256)."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % 256 == 0 else n + 256 - (n % 256)


def test_decilm_reader_formula_by_hand():
    """Hand-computed cases, so the reference formula above is itself checked."""
    assert reader_intermediate_size(6.0, 64) == 256  # 2 * 6 * 64 / 3 = 256 exactly
    assert reader_intermediate_size(1.0, 64) == 256  # int(42.67) = 42, rounded up to 256
    assert reader_intermediate_size(6.0, 96) == 512  # 384, rounded up to 512
    assert reader_intermediate_size(5.25, 8192) == 28672  # 2 * 5.25 * 8192 / 3 = 28672 = 112 * 256 (Llama 3 70B's FFN)


def test_decilm_layout_matches_published_format(tmp_path):
    # FFN width 256 = round_up(int(2 * 6.0 * 64 / 3), 256): representable as a DeciLM ffn_mult
    prep, model = prepared_tiny(tmp_path, "llama", layers=5, hidden_size=64, intermediate_size=256)
    write_step(tmp_path / "step.json", step_record(model, prep, PATTERN))
    materialize.materialize(prep, tmp_path / "step.json", tmp_path / "pruned")
    cfg = decilm.to_decilm(tmp_path / "pruned", tmp_path / "nas")
    written = json.loads((tmp_path / "nas" / "config.json").read_text())
    assert written == json.loads(json.dumps(cfg))
    assert NAS_TOP_KEYS - {"auto_map"} <= set(written) and "auto_map" not in written  # remote code only when asked
    assert written["architectures"] == ["DeciLMForCausalLM"] and written["model_type"] == "nemotron-nas"
    # PATTERN keeps mlp.0 | attn.2 mlp.2 | mlp.3 | attn.4, packed as (attention?, MLP?) layers:
    # (zero attention, mlp.0) (attn.2, mlp.2) (-, mlp.3) (attn.4, zero FFN)
    expect = [("zero", "mlp"), ("attn", "mlp"), (None, "mlp"), ("attn", "zero")]
    assert written["num_hidden_layers"] == len(written["block_configs"]) == len(expect)
    nas = load_file(str(tmp_path / "nas" / materialize.WEIGHTS_FILE))
    for j, (block, (attn, mlp)) in enumerate(zip(written["block_configs"], expect)):
        assert set(block) == {"attention", "ffn"}
        assert set(block["attention"]) == NAS_ATTENTION_KEYS and set(block["ffn"]) == NAS_FFN_KEYS
        assert block["attention"]["no_op"] is (attn is None) and block["ffn"]["no_op"] is False
        assert block["attention"]["n_heads_in_group"] == (None if attn is None else 4 // 2)
        assert reader_intermediate_size(block["ffn"]["ffn_mult"], written["hidden_size"]) == 256
        layer = {n.split(".", 3)[3] for n in nas if n.startswith(f"model.layers.{j}.")}
        assert layer == (NAS_LAYER_TENSORS["attn"] if attn else set()) | NAS_LAYER_TENSORS["mlp"]
        for kind, what in (("attn", attn), ("mlp", mlp)):
            weights = [nas[f"model.layers.{j}.{t}"] for t in NAS_LAYER_TENSORS[kind] if what and "norm" not in t]
            assert all((not w.any()) if what == "zero" else w.any() for w in weights)
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= set(nas)
    assert not (tmp_path / "nas" / materialize.MODELING_FILE).exists()
    asked = decilm.to_decilm(tmp_path / "pruned", tmp_path / "nas2", auto_map=True)
    assert asked["auto_map"]["AutoModelForCausalLM"].endswith("modeling_decilm.DeciLMForCausalLM")


def test_decilm_refuses_other_layouts(tmp_path, materialised):
    _, _, pruned, _ = materialised("qwen2")
    with pytest.raises(UserError, match="Llama-family"):
        decilm.to_decilm(pruned, tmp_path / "nas")
    _, _, pruned, _ = materialised("llama")  # intermediate 48 is not a multiple of 256
    with pytest.raises(UserError, match="ffn_mult"):
        decilm.to_decilm(pruned, tmp_path / "nas")


# -- the real Gemma 3 270M -------------------------------------------------------------------------
@pytest.mark.gemma
def test_gemma_round_trip(gemma_dir, tmp_path):
    model, _, manifest = load_model_dir(gemma_dir)
    # attn.0 out, layer 5 (full attention) gone, layer 9 MLP-only, one more MLP
    removed = ["attn.0", "mlp.5", "attn.5", "attn.9", "mlp.12"]
    rec = step_record(model, gemma_dir, removed)
    write_step(tmp_path / "step_5.json", rec)
    summary = materialize.materialize(gemma_dir, tmp_path / "step_5.json", tmp_path / "pruned")
    print("\ngemma materialised:", {k: summary[k] for k in ("params_before", "params", "layers", "attention_layers",
                                                             "removed_tensors")})
    assert summary["params"] == rec["params"]["remaining"] and summary["layers"] == 17
    PrunableModel.wrap(model).set_removed(removed)
    ids = torch.randint(1000, 200000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        for loaded in (materialize.load_pruned(tmp_path / "pruned"), remote_load(tmp_path / "pruned")):
            torch.testing.assert_close(loaded(ids).logits, want, atol=1e-5, rtol=0)
            out = loaded.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                                  min_new_tokens=5, return_dict_in_generate=True)
            assert out.sequences.tolist() == greedy_without_cache(model, ids, 5).tolist()
            assert len(out.past_key_values.layers) == 18 - 3
    assert math.isclose(summary["removed_params"], rec["params"]["removed"])
