"""The one place that knows how each architecture lays out its decoder.

BlockPruner treats every decoder layer as two residual blocks,

    h = h + post_attn_norm(Attn(pre_attn_norm(h)))
    h = h + post_mlp_norm(MLP(pre_mlp_norm(h)))

(the post norms exist only in Gemma 2/3). An `Adapter` names, for one family of
`config.model_type`s, the attribute paths of those pieces; everything else in the package
(blocks, scoring, export, speed, baselines) reads this table and never branches on the
model type itself.

Adding an architecture is one entry in `ADAPTERS`: check the family's `DecoderLayer.forward`
in transformers' `modeling_<type>.py` matches the two lines above, then fill in the names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class Branch:
    """One residual branch of a decoder layer: module, its norms and its residual dropout."""

    module: str
    pre_norm: str
    post_norm: str | None = None
    dropout: str | None = None  # Phi-3's resid dropout; identity in eval mode

    def parts(self) -> list[str]:
        """Attribute names (inside the layer) whose parameters belong to this block."""
        return [p for p in (self.pre_norm, self.module, self.post_norm) if p]


@dataclass(frozen=True)
class Adapter:
    """Where the decoder pieces of one architecture family live."""

    family: str
    decoder: str = "model"  # the base model, whose forward builds masks and rotary tables
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: Branch = Branch("self_attn", "input_layernorm")
    mlp: Branch = Branch("mlp", "post_attention_layernorm")
    text_config: str | None = None  # multimodal configs keep the decoder's settings here
    layer_returns_tuple: bool = False  # remote-code layers written for transformers 4.x
    # config attributes holding one entry per decoder layer; a materialised (pruned) model keeps
    # the entries of the layers it keeps (Gemma 2/3's sliding / full attention pattern, Qwen's)
    per_layer_lists: tuple[str, ...] = ("layer_types",)
    # the layer is Llama's exactly, so a pruned model can be written in the Nemotron-NAS
    # (DeciLM) layout that vLLM and llama.cpp serve natively
    nemotron_nas: bool = False
    notes: str = ""

    def branch(self, kind: str) -> Branch:
        return self.attn if kind == "attn" else self.mlp


_LLAMA_LIKE = dict()  # Llama's layout is the dataclass default
_GEMMA2_LIKE = dict(
    attn=Branch("self_attn", "input_layernorm", "post_attention_layernorm"),
    mlp=Branch("mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
)

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", nemotron_nas=True, notes="Llama 2 / Llama 3 / 3.1 / 3.2"),
    "mistral": Adapter("mistral", notes="Mistral 7B"),
    "qwen2": Adapter("qwen2", notes="Qwen1.5 / Qwen2 / Qwen2.5"),
    "qwen3": Adapter("qwen3", notes="Qwen3 dense models"),
    "gemma": Adapter("gemma", notes="Gemma 1"),
    "phi3": Adapter(
        "phi3",
        attn=Branch("self_attn", "input_layernorm", dropout="resid_attn_dropout"),
        mlp=Branch("mlp", "post_attention_layernorm", dropout="resid_mlp_dropout"),
        notes="Phi-3 / Phi-3.5 / Phi-4",
    ),
    "gemma2": Adapter("gemma2", **_GEMMA2_LIKE, notes="Gemma 2"),
    "gemma3_text": Adapter("gemma3_text", **_GEMMA2_LIKE, notes="Gemma 3 text-only (270M, 1B)"),
    "gemma3": Adapter(
        "gemma3",
        decoder="model.language_model",
        layers="model.language_model.layers",
        embed="model.language_model.embed_tokens",
        final_norm="model.language_model.norm",
        text_config="text_config",
        **_GEMMA2_LIKE,
        notes="Gemma 3 multimodal (4B-27B); only the language model is pruned",
    ),
    # Baichuan 2 ships its own modeling code (trust_remote_code=True); its layer has
    # Llama's names and returns a tuple, as transformers 4.x layers did.
    "baichuan": Adapter("baichuan", layer_returns_tuple=True, notes="Baichuan 2 (remote code)"),
}


def supported_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a `config.model_type`, or a one-line error saying how to add one."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UserError(
            f"unsupported architecture model_type={model_type!r}; supported: "
            f"{', '.join(supported_types())}. To add one, add an entry to "
            "blockpruner/adapters.py:ADAPTERS naming its layers, attention, MLP and norms."
        ) from None


def get_path(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted attribute path such as `model.layers`."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def text_config(model_config, adapter: Adapter):
    """The config that holds the decoder's settings (the text config for multimodal models)."""
    return getattr(model_config, adapter.text_config) if adapter.text_config else model_config
