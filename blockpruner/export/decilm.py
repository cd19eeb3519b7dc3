"""The Nemotron-NAS (DeciLM) layout of a pruned Llama-family model.

`to_decilm(pruned_dir, out_dir)` rewrites a directory written by `materialize` in NVIDIA's
Nemotron-NAS layout (`DeciLMForCausalLM`): a layer is an optional attention block followed by
an optional FFN, each with its residual add, and a missing one is a `no_op`. The kept blocks are
packed into such layers in forward order (`pack_layers`), which is exactly the pruned model, and
two readers' gaps get zero-weight placeholders that change no output:

- llama.cpp's deci graph drops the attention output of a layer without FFN, so an attention
  that no MLP follows in its layer gets a zero FFN (the smallest width `ffn_mult` can say, 256);
- llama.cpp reads the head size from layer 0, so a first layer without attention gets a zero
  attention block.

`auto_map` (NVIDIA's DeciLM code on the Hub, for transformers) is written only when asked: a
reader that sees it asks whether to run remote code. The same packing gives the GGUF layout
(`llamacpp.py`), where the layer-0 placeholder is deci's cheaper zero "linear attention".
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import adapter_for
from ..artifacts import atomic_dir
from ..errors import UserError
from ..modeling.pruned import MODELING_FILE, read_pruned_config
from .materialize import WEIGHTS_FILE

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


@dataclass(frozen=True)
class DeciLayer:
    """One layer of the packed layout: which layer of the pruned directory gives its attention / MLP."""

    attn: int | None  # layer index in the pruned directory, or None
    mlp: int | None
    placeholder_attn: bool = False  # a zero attention: llama.cpp takes the head size from layer 0
    placeholder_ffn: bool = False  # a zero FFN: llama.cpp drops the attention output of an FFN-free layer


def pack_layers(pruned_layers: list[dict]) -> list[DeciLayer]:
    """Group the kept blocks, in forward order, into (attention?, MLP?) layers, with the placeholders
    llama.cpp needs to compute them exactly."""
    blocks = [(kind, j) for j, k in enumerate(pruned_layers) for kind in ("attn", "mlp") if k[kind]]
    layers: list[dict] = []
    for kind, j in blocks:
        last = layers[-1] if layers else None
        if last is None or last[kind] is not None or (kind == "attn" and last["mlp"] is not None):
            layers.append({"attn": None, "mlp": None})
        layers[-1][kind] = j
    out = [DeciLayer(l["attn"], l["mlp"], placeholder_ffn=l["attn"] is not None and l["mlp"] is None) for l in layers]
    if out and out[0].attn is None:
        out[0] = DeciLayer(None, out[0].mlp, placeholder_attn=True, placeholder_ffn=out[0].placeholder_ffn)
    return out


PLACEHOLDER_FFN = 256  # the smallest FFN width a DeciLM ffn_mult can describe


def decilm_config(d: dict, layers: list[DeciLayer], auto_map: bool = False) -> dict:
    """Nemotron-NAS config.json for a pruned Llama-family config.json (as a dict) packed as `layers`."""
    ffn_mult = check_decilm(d)
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    kv = d.get("num_key_value_heads") or heads
    placeholder_mult = PLACEHOLDER_FFN * 3 / (2 * hidden)  # every packed layer has an MLP or a placeholder FFN
    rope = dict(d.get("rope_parameters") or {})
    out = {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "block_configs": [decilm_block_config(l.attn is not None or l.placeholder_attn, True, heads // kv,
                                              ffn_mult if l.mlp is not None else placeholder_mult) for l in layers],
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
        "num_hidden_layers": len(layers),
        "num_key_value_heads": None,
        "pretraining_tp": d.get("pretraining_tp", 1),
        "rms_norm_eps": d["rms_norm_eps"],
        "rope_theta": rope.pop("rope_theta", 10000.0),
        "rope_scaling": rope if rope.get("rope_type", "default") != "default" else None,
        "tie_word_embeddings": d.get("tie_word_embeddings", False),
        "torch_dtype": d.get("dtype") or "float32",
        "use_cache": True,
        "vocab_size": d["vocab_size"],
        "pruning": d["pruning"] | {"pruned_layers": d["pruned_layers"],
                                   "decilm_layers": [vars(l) for l in layers]},
    }
    if auto_map:
        out["auto_map"] = {"AutoConfig": f"{DECILM_HUB_CODE}--configuration_decilm.DeciLMConfig",
                           "AutoModelForCausalLM": f"{DECILM_HUB_CODE}--modeling_decilm.DeciLMForCausalLM"}
    return out


ATTN_PARTS = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_PARTS = ("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def packed_layer_tensors(get: Callable[[str], torch.Tensor], d: dict, layers: list[DeciLayer], zero_ffn_width: int,
                         linear_placeholder: bool = False, dtype: torch.dtype = torch.float32
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every packed layer in order, under Llama's names: the pruned directory's
    tensors (`get(name)`) renumbered, and the zero placeholders: an FFN of `zero_ffn_width`, and in
    layer 0 an attention block or, with `linear_placeholder`, deci's "linear attention" (a norm and
    one n_embd x n_embd matrix, no KV cache; llama.cpp only)."""
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    head_dim = d.get("head_dim") or hidden // heads
    kv = (d.get("num_key_value_heads") or heads) * head_dim
    zero_attn = ({"input_layernorm": torch.ones(hidden), "self_attn.o_proj": torch.zeros(hidden, hidden)}
                 if linear_placeholder else
                 {"input_layernorm": torch.ones(hidden), "self_attn.q_proj": torch.zeros(heads * head_dim, hidden),
                  "self_attn.k_proj": torch.zeros(kv, hidden), "self_attn.v_proj": torch.zeros(kv, hidden),
                  "self_attn.o_proj": torch.zeros(hidden, heads * head_dim)})
    zero_ffn = {"post_attention_layernorm": torch.ones(hidden), "mlp.gate_proj": torch.zeros(zero_ffn_width, hidden),
                "mlp.up_proj": torch.zeros(zero_ffn_width, hidden), "mlp.down_proj": torch.zeros(hidden, zero_ffn_width)}
    for i, l in enumerate(layers):
        for parts, src, zeros in ((ATTN_PARTS, l.attn, zero_attn if l.placeholder_attn else {}),
                                  (MLP_PARTS, l.mlp, zero_ffn if l.placeholder_ffn else {})):
            if src is not None:
                for part in parts:
                    yield f"model.layers.{i}.{part}.weight", get(f"model.layers.{src}.{part}.weight")
            else:
                for part, t in zeros.items():
                    yield f"model.layers.{i}.{part}.weight", t.to(dtype)


def decilm_tensors(pruned: dict[str, torch.Tensor], d: dict, layers: list[DeciLayer]) -> dict[str, torch.Tensor]:
    """The pruned directory's tensors renamed to the packed layers, plus the zero placeholders."""
    dtype = pruned["model.embed_tokens.weight"].dtype
    out = {k: v for k, v in pruned.items() if not k.startswith("model.layers.")}
    return out | dict(packed_layer_tensors(pruned.__getitem__, d, layers, PLACEHOLDER_FFN, dtype=dtype))


def to_decilm(pruned_dir: str | Path, out_dir: str | Path, auto_map: bool = False) -> dict:
    """Rewrite a materialised pruned Llama-family model in the Nemotron-NAS (DeciLM) layout.

    Tensors keep Llama's names under the packed layer numbers; config.json gets `block_configs`
    (and, with `auto_map`, the names of NVIDIA's DeciLM code for transformers users).
    """
    from safetensors.torch import load_file, save_file

    from .model_card import card_from_dir, write_model_card

    pruned_dir, out = Path(pruned_dir), Path(out_dir)
    d = read_pruned_config(pruned_dir)
    layers = pack_layers(d["pruned_layers"])
    config = decilm_config(d, layers, auto_map)
    tensors = decilm_tensors(load_file(str(pruned_dir / WEIGHTS_FILE)), d, layers)
    with atomic_dir(out) as tmp:
        for f in pruned_dir.iterdir():
            if f.is_file() and f.name not in ("config.json", "manifest.json", "README.md", MODELING_FILE, WEIGHTS_FILE):
                shutil.copy2(f, tmp / f.name)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        write_model_card(tmp, card_from_dir(pruned_dir), layout="nemotron-nas")
    return config
