"""The Nemotron-NAS (DeciLM) serving layout of a pruned Llama-family model.

`to_decilm(pruned_dir, out_dir)` rewrites a directory written by `materialize` in NVIDIA's
Nemotron-NAS layout, which vLLM and llama.cpp serve natively: a layer without attention or
without an MLP is a `no_op` there, so the pruned shapes need no modeling code of our own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..adapters import adapter_for
from ..errors import UserError
from .materialize import MODELING_FILE, _replace_dir, _temp_dir_beside, read_pruned_config

# -- Nemotron-NAS (DeciLM) serving layout ----------------------------------------------------------
# Reference for every key below: the config.json of nvidia/Llama-3_3-Nemotron-Super-49B-v1
# (architectures DeciLMForCausalLM, model_type nemotron-nas), and the readers of that format:
# vLLM's model_executor/models/nemotron_nas.py (no_op, n_heads_in_group, ffn_mult) and
# llama.cpp's convert_hf_to_gguf DeciModel (n_heads_in_group None = no attention, ffn_mult
# None = no FFN). Both derive the FFN width as round_up(int(2 * ffn_mult * hidden / 3), 256).
DECILM_HUB_CODE = "nvidia/Llama-3_3-Nemotron-Super-49B-v1"


def decilm_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The FFN width vLLM and llama.cpp derive from a DeciLM `ffn_mult`."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def decilm_block_config(has_attn: bool, has_mlp: bool, n_heads_in_group: int, ffn_mult: float) -> dict:
    return {
        "attention": {
            "n_heads_in_group": n_heads_in_group if has_attn else None,
            "no_op": not has_attn,
            "num_sink_tokens": None,
            "replace_with_linear": False,
            "sparsify": None,
            "unshifted_sink": False,
            "use_prefill_window_in_sink_attention": False,
            "window_length": None,
        },
        "ffn": {
            "ffn_mult": ffn_mult if has_mlp else None,
            "no_op": not has_mlp,
            "replace_with_linear": False,
            "sparsify": None,
        },
    }


def check_decilm(d: dict) -> float:
    """Refuse configs the Nemotron-NAS layout cannot express; returns the FFN's `ffn_mult`.

    Works on the dense model's config.json too, so the CLI can refuse before materialising.
    """
    if not adapter_for(d["model_type"]).nemotron_nas:
        raise UserError(f"the Nemotron-NAS layout is for Llama-family models; this one is {d['model_type']!r}")
    hidden, inter, heads = d["hidden_size"], d["intermediate_size"], d["num_attention_heads"]
    ffn_mult = inter * 3 / (2 * hidden)
    if decilm_intermediate_size(ffn_mult, hidden) != inter:
        raise UserError(f"intermediate_size {inter} cannot be written as a DeciLM ffn_mult for hidden_size {hidden} "
                        "(readers round the FFN width up to a multiple of 256)")
    head_dim = d.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise UserError(f"head_dim {head_dim} x {heads} heads != hidden_size {hidden}; DeciLM readers assume equality")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise UserError("biased attention / MLP projections are not written in the Nemotron-NAS layout")
    return ffn_mult


def decilm_config(d: dict) -> dict:
    """Nemotron-NAS config.json for a pruned Llama-family config.json (as a dict)."""
    ffn_mult = check_decilm(d)
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    kv = d.get("num_key_value_heads") or heads
    rope = dict(d.get("rope_parameters") or {})
    out = {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": f"{DECILM_HUB_CODE}--configuration_decilm.DeciLMConfig",
                     "AutoModelForCausalLM": f"{DECILM_HUB_CODE}--modeling_decilm.DeciLMForCausalLM"},
        "block_configs": [decilm_block_config(k["attn"], k["mlp"], heads // kv, ffn_mult) for k in d["pruned_layers"]],
        "attention_bias": False,
        "attention_dropout": d.get("attention_dropout", 0.0),
        "bos_token_id": d.get("bos_token_id"),
        "eos_token_id": d.get("eos_token_id"),
        "pad_token_id": d.get("pad_token_id"),
        "hidden_act": d.get("hidden_act", "silu"),
        "hidden_size": hidden,
        "initializer_range": d.get("initializer_range", 0.02),
        "intermediate_size": None,
        "max_position_embeddings": d["max_position_embeddings"],
        "mlp_bias": False,
        "num_attention_heads": heads,
        "num_hidden_layers": len(d["pruned_layers"]),
        "num_key_value_heads": None,
        "pretraining_tp": d.get("pretraining_tp", 1),
        "rms_norm_eps": d["rms_norm_eps"],
        "rope_theta": rope.pop("rope_theta", 10000.0),
        "rope_scaling": rope if rope.get("rope_type", "default") != "default" else None,
        "tie_word_embeddings": d.get("tie_word_embeddings", False),
        "torch_dtype": d.get("dtype") or "float32",
        "use_cache": True,
        "vocab_size": d["vocab_size"],
        "pruning": d["pruning"] | {"pruned_layers": d["pruned_layers"]},
    }
    return out


def to_decilm(pruned_dir: str | Path, out_dir: str | Path) -> dict:
    """Rewrite a materialised pruned Llama-family model in the Nemotron-NAS (DeciLM) layout.

    The tensors keep their names (DeciLM layers are Llama layers; a no-op block has none), so
    the weights are copied as they are; config.json gets `block_configs`, and `auto_map` names
    NVIDIA's published DeciLM code for transformers users (vLLM and llama.cpp need no code).
    """
    pruned_dir, out = Path(pruned_dir), Path(out_dir)
    config = decilm_config(read_pruned_config(pruned_dir))
    tmp = _temp_dir_beside(out)
    try:
        for f in pruned_dir.iterdir():
            if f.is_file() and f.name not in ("config.json", "manifest.json", MODELING_FILE):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


