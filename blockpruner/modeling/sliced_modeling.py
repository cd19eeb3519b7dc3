"""The modeling code a SliceGPT-sliced checkpoint carries, so that it loads anywhere.

`blockpruner.compress.slicegpt` copies this file, with the package's branch runner
(`blockpruner/branch.py`) inlined in place of its one import of it and the lines naming the
base classes added (`modeling.pruned.bound_modeling_source`), into every sliced model
directory as `modeling_slicegpt.py`; config.json's `auto_map` points at it, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works where blockpruner is
not installed. `modeling.sliced.load_sliced` builds the same classes from this module without
running the directory's code. Besides that import, it must import nothing but the standard
library, torch and transformers.

A sliced model is the base architecture with a narrower residual stream. `config.slicegpt`
records the widths and the attribute names (copied from blockpruner's adapter table):

- the token embedding is [vocab, sliced_size];
- every decoder layer reads and writes a `sliced_size` stream: the linears that read it
  (q/k/v or qkv, gate/up or gate_up) take `sliced_size` inputs, the linears that write it
  (o_proj, down_proj) give `sliced_size` outputs -- except the last layer's down_proj, which
  gives `head_size` outputs (the full width when the head is not sliced, as in the reference);
- each residual shortcut carries a matrix, `attn_shortcut_Q` [sliced_size, sliced_size] and
  `mlp_shortcut_Q` [sliced_size, out], because consecutive blocks see the stream in different
  (PCA) bases;
- the RMSNorms have no weights (they were fused into the following linears) and divide by the
  ORIGINAL width `hidden_size`, so a sliced stream is normalised as the full one was;
- the LM head is [vocab, head_size]; embeddings are never tied.

`config.hidden_size` keeps the original width: attention heads and rotary tables depend on it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..branch import branch_output, keyword_args

FORMAT = "blockpruner.slicegpt/1"
KINDS = ("attn", "mlp")


def _get_path(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set_path(root, path, module):
    parent, _, name = path.rpartition(".")
    setattr(_get_path(root, parent) if parent else root, name, module)


class WeightlessRMSNorm(nn.Module):
    """x / rms(x), the rms taken over the original width `mean_dim` whatever the input's width.

    With unit weight RMSNorm commutes with an orthogonal rotation of its input (it depends on
    ||x|| only); after slicing, ||x_sliced|| is close to ||x|| and dividing by the original
    width keeps the scale the full model had.
    """

    def __init__(self, mean_dim: int, eps: float):
        super().__init__()
        self.mean_dim = mean_dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (x * torch.rsqrt(variance + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.eps}"


# -- layers ---------------------------------------------------------------------------------
class SlicedLayerMixin:
    """Forward of a sliced decoder layer: the two residual lines with a matrix on each shortcut.

        h = h @ attn_shortcut_Q + attn(norm(h))
        h = h @ mlp_shortcut_Q + mlp(norm(h))

    `bp_removed` is blockpruner's in-memory removal set: finding it, blockpruner leaves this
    forward in place, and a removed branch leaves only its shortcut.
    """

    def forward(self, hidden_states, *args, **kwargs):
        kwargs = keyword_args(args, kwargs)
        for kind in KINDS:
            spec = self.sg_branches[kind]
            shortcut = hidden_states @ getattr(self, f"{kind}_shortcut_Q")
            if kind in self.bp_removed:
                hidden_states = shortcut
                continue
            hidden_states = shortcut + branch_output(self, kind, hidden_states, kwargs, spec["norm"], spec["module"],
                                                     None, spec.get("dropout"))
        return (hidden_states,) if self.sg_returns_tuple else hidden_states


_LAYER_CLASSES: dict = {}


def sliced_layer_class(cls):
    """The decoder layer class with the sliced forward, under the base class's name (so that
    `_no_split_modules` and output recording treat it as the original layer)."""
    if issubclass(cls, SlicedLayerMixin):
        return cls
    if cls not in _LAYER_CLASSES:
        _LAYER_CLASSES[cls] = type(cls.__name__, (SlicedLayerMixin, cls), {"__module__": __name__})
    return _LAYER_CLASSES[cls]


def _resize_linear(linear: nn.Linear, in_features: int, out_features: int) -> None:
    """Give a linear new, uninitialised weights of the sliced shape (they are loaded afterwards)."""
    w = linear.weight
    linear.weight = nn.Parameter(torch.empty(out_features, in_features, device=w.device, dtype=w.dtype))
    if linear.bias is not None:
        linear.bias = nn.Parameter(torch.empty(out_features, device=w.device, dtype=w.dtype))
    linear.in_features, linear.out_features = in_features, out_features


def _resize_embedding(embed: nn.Embedding, width: int) -> None:
    """Resized in place, so an embedding subclass (Gemma's scaled one) keeps its behaviour."""
    w = embed.weight
    embed.weight = nn.Parameter(torch.empty(w.shape[0], width, device=w.device, dtype=w.dtype))
    embed.embedding_dim = width


def apply_slicing(model, config) -> None:
    """Give the modules their sliced shapes, add the shortcut matrices, install the forward."""
    info = config.slicegpt
    d, k, k_head, eps = info["hidden_size"], info["sliced_size"], info["head_size"], info["eps"]
    _resize_embedding(_get_path(model, info["embed"]), k)
    layers = _get_path(model, info["layers_path"])
    for i, layer in enumerate(layers):
        for kind in KINDS:
            spec = info["branches"][kind]
            out = k_head if (kind == "mlp" and i == len(layers) - 1) else k
            for name in spec["inputs"]:
                reader = _get_path(layer, name)
                _resize_linear(reader, k, reader.out_features)
            writer = _get_path(layer, spec["output"])
            _resize_linear(writer, writer.in_features, out)
            _set_path(layer, spec["norm"], WeightlessRMSNorm(d, eps))
            w = writer.weight
            layer.register_parameter(f"{kind}_shortcut_Q", nn.Parameter(torch.empty(k, out, device=w.device, dtype=w.dtype)))
        layer.__class__ = sliced_layer_class(type(layer))
        layer.sg_branches = info["branches"]
        layer.sg_returns_tuple = bool(info.get("layer_returns_tuple", False))
        layer.bp_removed = set()
    _set_path(model, info["final_norm"], WeightlessRMSNorm(d, eps))
    head = _get_path(model, info["lm_head"])
    _resize_linear(head, k_head, head.out_features)


# -- model -----------------------------------------------------------------------------------
class SlicedModelMixin:
    """A base architecture's causal LM built with `apply_slicing` applied."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_slicing(self, config)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load, refusing weights that do not match the sliced structure (missing, extra, reshaped);
        transformers would only warn and initialise missing weights at random."""
        want_info = kwargs.get("output_loading_info", False)
        kwargs["output_loading_info"] = True
        model, info = super().from_pretrained(*args, **kwargs)
        problems = {k: sorted(map(str, v))[:5] for k, v in info.items()
                    if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(f"{where}: weights do not match the sliced model's structure {problems}; "
                             "slice the model again")
        return (model, info) if want_info else model


def make_classes(config_cls, model_cls):
    """(config class, causal LM class) for a base architecture; cached so isinstance holds."""
    key = (config_cls, model_cls)
    if key not in _CLASSES:
        cfg = type("SlicedConfig", (config_cls,), {"__module__": __name__})
        lm = type("SlicedForCausalLM", (SlicedModelMixin, model_cls), {"__module__": __name__, "config_class": cfg})
        _CLASSES[key] = (cfg, lm)
    return _CLASSES[key]


_CLASSES: dict = {}
