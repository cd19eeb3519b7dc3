"""The modeling code a materialised (pruned) checkpoint carries, so that it loads anywhere.

`blockpruner.export` copies this file, with the package's branch runner (`blockpruner/branch.py`)
inlined in place of its one import of it and four lines naming the base classes added
(`modeling.pruned.bound_modeling_source`), into every pruned model directory as
`modeling_blockpruner.py`; config.json's `auto_map` points at it, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works where blockpruner is
not installed. `blockpruner.load_pruned` builds the same classes from this module with no
remote code at all. Besides that import, it must import nothing but the standard library,
torch and transformers.

A pruned model is the base architecture with its kept decoder layers renumbered 0..N-1;
`config.pruned_layers[j] = {"source_layer": i, "attn": bool, "mlp": bool}` says where layer j
came from and which of its two residual blocks still exist, and `config.pruning` records how
(the removed blocks in removal order, the method, K, the source) plus the attribute names of
each block (copied from blockpruner's adapter table). A layer without a block has no modules
for it -- no weights, no norms -- and skips that residual branch outright.

KV cache: an attention module's `layer_idx` is its rank among the remaining attention blocks,
so the cache holds exactly one slot per remaining attention block. An attention-less layer
must not own a slot: transformers takes the number of tokens already seen from slot 0, and an
empty slot there would restart the positions at 0 on every decoding step. Caches learn their
layout (how many slots, which are sliding-window) from `config.get_text_config(decoder=True)`,
which therefore returns a view of the decoder config with one entry per attention block; the
model itself keeps reading the per-layer `config.layer_types`.
"""

from __future__ import annotations

import copy

from ..branch import branch_output, keyword_args

KINDS = ("attn", "mlp")


def _get_path(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


# -- layers ---------------------------------------------------------------------------------
class PrunedLayerMixin:
    """Forward of a kept decoder layer: the residual branches it still has, in order.

    Each branch is `h + dropout(post_norm(module(pre_norm(h))))` with the names from
    `config.pruning["branches"]`, exactly the architecture's own two residual lines.

    `bp_removed` is blockpruner's in-memory removal set (blocks.PrunableModel): finding it,
    PrunableModel leaves this forward in place, so a pruned model can be evaluated (and pruned
    further) by blockpruner like a dense one; absent blocks are skipped either way.
    """

    def forward(self, hidden_states, *args, **kwargs):
        kwargs = keyword_args(args, kwargs)
        for kind in self.bp_kinds:
            if kind in self.bp_removed:
                continue
            spec = self.bp_branches[kind]
            hidden_states = hidden_states + branch_output(self, kind, hidden_states, kwargs, spec["pre_norm"],
                                                          spec["module"], spec.get("post_norm"), spec.get("dropout"))
        return (hidden_states,) if self.bp_returns_tuple else hidden_states


_LAYER_CLASSES: dict = {}


def pruned_layer_class(cls):
    """The decoder layer class with the pruned forward.

    It keeps the base class's name, so `_no_split_modules` and output recording, which match
    layers by name or isinstance, treat it as the original layer.
    """
    if issubclass(cls, PrunedLayerMixin):
        return cls
    if cls not in _LAYER_CLASSES:
        _LAYER_CLASSES[cls] = type(cls.__name__, (PrunedLayerMixin, cls), {"__module__": __name__})
    return _LAYER_CLASSES[cls]


def apply_pruning(model, config) -> None:
    """Delete the removed blocks' modules, renumber attention cache slots, install the forward."""
    info = config.pruning
    kept = config.pruned_layers
    layers = _get_path(model, info["layers_path"])
    if len(layers) != len(kept):
        raise ValueError(f"config has {len(kept)} pruned_layers but the model built {len(layers)} decoder layers")
    branches = info["branches"]
    slot = 0
    for layer, keep in zip(layers, kept):
        for kind in KINDS:
            if not keep[kind]:
                for part in branches[kind]["parts"]:
                    delattr(layer, part)
        if keep["attn"]:
            attn = getattr(layer, branches["attn"]["module"])
            if not hasattr(attn, "layer_idx"):
                raise ValueError(f"{type(attn).__name__} has no layer_idx; its KV cache slot cannot be renumbered")
            attn.layer_idx = slot
            slot += 1
        layer.__class__ = pruned_layer_class(type(layer))
        layer.bp_kinds = tuple(k for k in KINDS if keep[k])
        layer.bp_removed = set()
        layer.bp_branches = branches
        layer.bp_returns_tuple = bool(info.get("layer_returns_tuple", False))


# -- config ----------------------------------------------------------------------------------
def kv_cache_view(decoder_config, pruned_layers):
    """The decoder config as a KV cache must see it: one layer per remaining attention block."""
    attn = [j for j, keep in enumerate(pruned_layers) if keep["attn"]]
    if len(attn) == len(pruned_layers):
        return decoder_config
    view = copy.copy(decoder_config)
    names = type(decoder_config).attribute_map
    updates = {"num_hidden_layers": len(attn), "_bp_kv_view": True}
    types = decoder_config.__dict__.get(names.get("layer_types", "layer_types"))
    if types is not None:
        updates["layer_types"] = [types[j] for j in attn]
    # set through __dict__: the strict config would validate each field on its own
    view.__dict__.update({names.get(k, k): v for k, v in updates.items()})
    return view


class PrunedConfigMixin:
    """A base architecture's config plus `pruned_layers` and `pruning` (see the module doc)."""

    def get_text_config(self, decoder=None, encoder=None):
        config = super().get_text_config(decoder=decoder, encoder=encoder)
        pruned = self.__dict__.get("pruned_layers")
        if decoder and not encoder and pruned and not config.__dict__.get("_bp_kv_view"):
            return kv_cache_view(config, pruned)
        return config


# -- model -----------------------------------------------------------------------------------
class PrunedModelMixin:
    """A base architecture's causal LM built with `apply_pruning` applied."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_pruning(self, config)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load, refusing weights that do not match the pruned structure (missing, extra, reshaped).

        transformers would only warn and initialise missing weights at random.
        """
        want_info = kwargs.get("output_loading_info", False)
        kwargs["output_loading_info"] = True
        model, info = super().from_pretrained(*args, **kwargs)
        problems = {k: sorted(map(str, v))[:5] for k, v in info.items()
                    if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(f"{where}: weights do not match the pruned model's structure {problems}; "
                             "materialise the pruned model again")
        return (model, info) if want_info else model


def make_classes(config_cls, model_cls):
    """(config class, causal LM class) for a base architecture; cached so isinstance holds."""
    key = (config_cls, model_cls)
    if key not in _CLASSES:
        cfg = type("BlockPrunerConfig", (PrunedConfigMixin, config_cls), {"__module__": __name__})
        lm = type("BlockPrunerForCausalLM", (PrunedModelMixin, model_cls), {"__module__": __name__, "config_class": cfg})
        _CLASSES[key] = (cfg, lm)
    return _CLASSES[key]


_CLASSES: dict = {}
