"""A pruned Llama-family model as a GGUF file that llama.cpp computes exactly.

`export_gguf(model_dir, out, outtype)` writes a pruned (or, as the baseline, a dense prepared)
directory as llama.cpp's `deci` architecture (the
Nemotron-NAS graph: per-layer head counts and FFN widths, 0 for a missing block):

- **Blocks are packed into layers.** The kept blocks, in forward order, are grouped into
  layers of the form (attention?, MLP?), so a layer of the pruned model whose attention was
  removed shares a GGUF layer with the attention before it. The residual stream is the same:
  h = h + Attn(norm(h)), then h = h + MLP(norm(h)), block by block.
- **Zero-weight placeholders where llama.cpp's graph needs them.** deci.cpp skips the
  attention's residual add in a layer with no FFN (`if (n_ff == 0) continue;`), so such a
  layer gets an FFN of width `ZERO_FFN_WIDTH` with zero weights (its output is exactly 0).
  The head size is read from layer 0, so a first layer without attention gets deci's
  "linear attention" (one zero n_embd x n_embd matrix, no KV cache) instead of none.
- **The vocabulary is llama.cpp's own.** A model prepared from a .gguf keeps its source's
  `tokenizer.*` keys (tokenizer.gguf); otherwise llama.cpp's converter (`convert_hf_to_gguf.py
  --vocab-only`) writes them from the tokenizer files (SentencePiece's tokenizer.model with its
  scores, BPE with its pre-tokenizer, special tokens, chat template). They are copied unchanged.
- **Quantisation is llama.cpp's own.** The file is written in f32 by gguf-py, then
  `llama_model_quantize` (llama-cpp-python) turns it into f16, bf16, q8_0 or q4_k_m.

`check_gguf` runs the file in llama.cpp and compares its logits with `load_pruned`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..adapters import adapter_for
from ..data.sources import CACHE
from ..errors import UserError
from ..gguf_vocab import VOCAB_FILE, add_fields, tokenizer_fields
from .decilm import DeciLayer, pack_layers, packed_layer_tensors
from ..modeling.pruned import read_pruned_config

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
ZERO_FFN_WIDTH = 32  # the block size of q8_0/q4_0/q5_0, so a placeholder quantises like any FFN
CONVERTER_ENV = "BLOCKPRUNER_LLAMA_CPP_CONVERTER"
CONVERTER_FIX = (f"pass --converter PATH/TO/llama.cpp/convert_hf_to_gguf.py (or set {CONVERTER_ENV}); "
                 "`bash envs/llama-cpp.sh` builds llama-cpp-python and unpacks its converter into the cache")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "merges.txt", "vocab.json",
                   "generation_config.json")


# -- which files llama.cpp can run --------------------------------------------------------------
def check_exportable(d: dict) -> None:
    """Refuse, from a config.json dict (dense or pruned), what llama.cpp's deci graph cannot express."""
    model_type = d.get("model_type")
    if not adapter_for(model_type).nemotron_nas:
        raise UserError(f"GGUF export is for Llama-family models (llama.cpp's deci graph); this one is {model_type!r}, "
                        "whose layers llama.cpp builds differently; serve the pruned directory with transformers")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise UserError("biased attention / MLP projections are not written to GGUF (llama.cpp's deci graph has no "
                        "q/k/v biases)")
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise UserError(f"rope_type {rope.get('rope_type')!r} is not written to GGUF; default and llama3 are")
    if (d.get("pretraining_tp") or 1) != 1:
        raise UserError("pretraining_tp != 1 is not written to GGUF")


# -- layout (the packing is the Nemotron-NAS one) -------------------------------------------------
def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Q/K rows from Hugging Face's rotate-half order to llama.cpp's interleaved RoPE order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_factors(d: dict) -> np.ndarray | None:
    """llama.cpp's `rope_freqs` for Llama 3 RoPE: the plain inverse frequencies over the scaled ones."""
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type") != "llama3":
        return None
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(**{k: v for k, v in d.items() if k not in ("pruning", "pruned_layers", "auto_map")})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (plain / scaled.float()).numpy().astype(np.float32)


# -- the vocabulary, from llama.cpp's converter ----------------------------------------------------
def find_converter(path: str | Path | None = None) -> Path:
    """llama.cpp's convert_hf_to_gguf.py: the given path, $BLOCKPRUNER_LLAMA_CPP_CONVERTER, or the cache's copy."""
    candidates = [path] if path else [os.environ.get(CONVERTER_ENV)] if os.environ.get(CONVERTER_ENV) else \
        sorted(CACHE.glob("llama-cpp-python-*/llama.cpp/convert_hf_to_gguf.py"), reverse=True)
    for c in candidates:
        c = Path(c).expanduser()
        if c.is_dir():
            c = c / "convert_hf_to_gguf.py"
        if c.is_file():
            return c
    where = str(path or os.environ.get(CONVERTER_ENV) or CACHE / "llama-cpp-python-*/llama.cpp/convert_hf_to_gguf.py")
    raise UserError(f"llama.cpp's converter not found at {where}; {CONVERTER_FIX}")


def exported_config(model_dir: Path) -> dict:
    """config.json of a pruned directory, or of a prepared dense one as a pruning that removed nothing
    (so the dense baseline goes through the same writer and the same llama.cpp graph)."""
    f = Path(model_dir) / "config.json"
    d = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    if "slicegpt" in d:
        raise UserError(f"{model_dir} is SliceGPT-sliced (rotated, narrower layers with shortcut matrices), which "
                        "llama.cpp's graphs cannot express; export a block-pruned or LaCo directory")
    if "pruning" in d or "pruned_layers" in d or not (Path(model_dir) / "manifest.json").is_file():
        return read_pruned_config(model_dir)
    n = d["num_hidden_layers"]
    return d | {"pruned_layers": [{"source_layer": i, "attn": True, "mlp": True} for i in range(n)],
                "pruning": {"method": "dense", "k": 0, "removed": [], "source_num_layers": n,
                            "source_model": str(model_dir), "base_architecture": (d.get("architectures") or ["?"])[0]}}


def base_config(d: dict) -> dict:
    """The pruned config.json as the dense base architecture's (what the converter reads for the vocabulary)."""
    out = {k: v for k, v in d.items() if k not in ("pruning", "pruned_layers", "auto_map", "quantization_config")}
    out["architectures"] = [d["pruning"]["base_architecture"]]
    return out


def vocabulary_fields(model_dir: Path, d: dict, converter: Path | None, work: Path) -> list:
    """The `tokenizer.*` fields for this directory: its source GGUF's own (tokenizer.gguf), else
    those llama.cpp's converter writes for its tokenizer files."""
    if (model_dir / VOCAB_FILE).is_file():
        return tokenizer_fields(model_dir / VOCAB_FILE)
    src = work / "vocab-src"
    src.mkdir()
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, src / name)
    (src / "config.json").write_text(json.dumps(base_config(d), indent=2), encoding="utf-8")
    out = work / "vocab.gguf"
    run = subprocess.run([sys.executable, str(find_converter(converter)), "--vocab-only", "--outfile", str(out), str(src)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if run.returncode != 0 or not out.is_file():
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"llama.cpp's converter could not write this tokenizer ({last[:300]}); "
                        "a vocabulary llama.cpp does not know cannot be exported")
    return tokenizer_fields(out)


# -- writing -------------------------------------------------------------------------------------
def gguf_metadata(d: dict, layers: list[DeciLayer]) -> dict:
    """What the file records about the pruning (also returned to the caller for the model card)."""
    rec = d["pruning"]
    return {
        "removed": list(rec["removed"]), "method": rec.get("method"), "k": rec.get("k"),
        "source_model": rec.get("source_model"), "source_layers": rec.get("source_num_layers"),
        "gguf_layers": len(layers),
        "placeholder_ffn_layers": [i for i, l in enumerate(layers) if l.placeholder_ffn],
        "placeholder_attn_layers": [i for i, l in enumerate(layers) if l.placeholder_attn],
        "layers": [asdict(l) for l in layers],
    }


def write_f32(pruned_dir: Path, d: dict, out: Path, converter: str | Path | None, name: str | None = None) -> dict:
    """Write the directory (`d`: its exported_config) as an f32 deci GGUF at `out`; returns the layout record."""
    import gguf
    from safetensors import safe_open

    layers = pack_layers(d["pruned_layers"])
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim") or hidden // heads
    inter = d["intermediate_size"]
    rope = d.get("rope_parameters") or {}

    with tempfile.TemporaryDirectory(prefix=".vocab.", dir=out.parent) as work:
        vocab = vocabulary_fields(pruned_dir, d, converter, Path(work))
        w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DECI], use_temp_file=True)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or Path(pruned_dir).name)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_block_count(len(layers))
        w.add_context_length(d["max_position_embeddings"])
        w.add_embedding_length(hidden)
        w.add_feed_forward_length([inter if l.mlp is not None else ZERO_FFN_WIDTH for l in layers])
        w.add_head_count([heads if (l.attn is not None or l.placeholder_attn) else 0 for l in layers])
        w.add_head_count_kv([kv_heads if l.attn is not None else 0 for l in layers])
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        w.add_layer_norm_rms_eps(float(d["rms_norm_eps"]))
        w.add_vocab_size(d["vocab_size"])
        meta = gguf_metadata(d, layers)
        w.add_tags(["pruned", "blockpruner"])
        w.add_string("blockpruner.method", str(meta["method"]))
        w.add_array("blockpruner.removed", meta["removed"] or [""])
        w.add_uint32("blockpruner.source_layers", int(meta["source_layers"] or 0))
        add_fields(w, vocab)

        tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, len(layers))

        def gguf_name(hf: str) -> str:
            got = tmap.get_name(hf, try_suffixes=(".weight",))
            if got is None:
                raise UserError(f"{pruned_dir}: tensor {hf} has no GGUF name for llama.cpp's deci graph")
            return got

        files = sorted(Path(pruned_dir).glob("*.safetensors"))
        handles = [safe_open(str(f), "pt") for f in files]
        where = {k: h for h in handles for k in h.keys()}

        def tensor(key: str) -> torch.Tensor:
            if key not in where:
                raise UserError(f"{pruned_dir}: weight {key} missing; materialise the model again")
            return where[key].get_tensor(key).float()

        def add(hf: str, t: torch.Tensor) -> None:
            w.add_tensor(gguf_name(hf), np.ascontiguousarray(t.numpy(), dtype=np.float32))

        add("model.embed_tokens.weight", tensor("model.embed_tokens.weight"))
        add("model.norm.weight", tensor("model.norm.weight"))
        if "lm_head.weight" in where and not d.get("tie_word_embeddings", False):
            add("lm_head.weight", tensor("lm_head.weight"))
        if (factors := rope_factors(d)) is not None:
            w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)
        for hf, t in packed_layer_tensors(tensor, d, layers, ZERO_FFN_WIDTH, linear_placeholder=True):
            if hf.endswith("self_attn.q_proj.weight"):
                t = permute_rows(t, heads)
            elif hf.endswith("self_attn.k_proj.weight"):
                t = permute_rows(t, kv_heads)
            add(hf, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return meta


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise UserError("llama-cpp-python is not installed; `bash envs/llama-cpp.sh` builds and installs it "
                        "(or pip install llama-cpp-python==0.3.36)") from None
    return llama_cpp


def quantize(f32: Path, out: Path, outtype: str, threads: int = 0) -> None:
    """llama.cpp's own quantiser (`llama_model_quantize`) from the f32 file to `outtype`."""
    llama_cpp = llama_cpp_module()
    ftype = {"f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
             "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[outtype]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
    if rc != 0:
        raise UserError(f"llama.cpp's quantiser failed on {f32} -> {outtype} (return code {rc})")


def export_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f32", converter: str | Path | None = None,
                threads: int = 0, check_tokens: int = 0) -> dict:
    """Write `out` (a .gguf) that llama.cpp runs as the directory's model; returns the layout record.

    With `check_tokens`, the f32 file is run in llama.cpp first and refused unless it computes
    the directory's logits. The file appears only when complete (written beside `out`, renamed).
    """
    from ..artifacts import atomic_write

    model_dir, out = Path(model_dir), Path(out)
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    d = exported_config(model_dir)
    check_exportable(d)
    if not (model_dir / VOCAB_FILE).is_file():
        find_converter(converter)  # refuse before the work
    if outtype != "f32" or check_tokens:
        llama_cpp_module()
    meta: dict = {}

    def write(tmp: str) -> None:
        f32 = Path(tmp) if outtype == "f32" else Path(tmp + ".f32")
        try:
            meta.update(write_f32(model_dir, d, f32, converter, name=out.stem))
            if check_tokens:
                meta["check"] = verify(model_dir, f32, check_tokens)
            if outtype != "f32":
                quantize(f32, Path(tmp), outtype, threads)
        finally:
            if outtype != "f32":
                f32.unlink(missing_ok=True)

    atomic_write(out, write)
    return meta | {"outtype": outtype, "bytes": out.stat().st_size}


CHECK_TEXT = ("Removing a block skips its whole residual branch, so the model that is left computes the same "
              "function as the original with that branch set to zero. The quick brown fox jumps over the lazy dog; "
              "1, 2, 3, 4, 5, 6, 7, 8, 9, 10. ") * 8


def verify(model_dir: Path, f32: Path, n_tokens: int) -> dict:
    """Refuse a file llama.cpp computes differently from the directory (f32 weights and KV cache)."""
    from ..model_dir import load_tokenizer

    ids = load_tokenizer(model_dir)(CHECK_TEXT)["input_ids"][:n_tokens]
    c = check_gguf(model_dir, f32, ids)
    if c["argmax_agree"] != c["tokens"] or c["max_abs_diff"] > 1e-3 * max(1.0, c["ref_max_abs"]):
        raise UserError(f"llama.cpp computes {f32.name} differently from {model_dir} (max |logit difference| "
                        f"{c['max_abs_diff']:.3g}, argmax agrees on {c['argmax_agree']}/{c['tokens']}); not written")
    return c


# -- running it in llama.cpp ---------------------------------------------------------------------
def open_gguf(path: str | Path, n_ctx: int = 512, f32_kv: bool = False, threads: int | None = None,
              logits_all: bool = True):
    """A llama_cpp.Llama on the file (CPU), quiet; `f32_kv` keeps the KV cache in f32 instead of f16."""
    llama_cpp = llama_cpp_module()
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_kv else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False, seed=0,
                           n_threads=threads or torch.get_num_threads(), n_gpu_layers=0, **kv)


def gguf_logits(path: str | Path, ids: list[int], f32_kv: bool = True, threads: int | None = None) -> np.ndarray:
    """llama.cpp's logits at every position of `ids` (one batch, fresh context)."""
    llm = open_gguf(path, n_ctx=max(64, len(ids)), f32_kv=f32_kv, threads=threads)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def check_gguf(model_dir: str | Path, path: str | Path, ids: list[int]) -> dict:
    """llama.cpp's logits on `ids` against the directory's own (fp32, as `load_pruned` loads a pruned
    one): max |difference| and on how many positions the argmax agrees."""
    from ..model_dir import load_model_dir

    model = load_model_dir(model_dir, dtype="fp32", tokenizer=False)[0]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()
    got = gguf_logits(path, ids)
    return {"tokens": len(ids), "max_abs_diff": float(np.abs(got - ref).max()), "ref_max_abs": float(np.abs(ref).max()),
            "argmax_agree": int((got.argmax(-1) == ref.argmax(-1)).sum())}
