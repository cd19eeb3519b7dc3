"""Work counts: block forwards, LM-head tokens, head-bound columns, and FLOPs from `FlopModel`,
an analytic count from the model's shapes (what the benchmarks compare methods by)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import nn

from ..adapters import get_path
from ..blocks import PrunableModel, parse_block


def causal_pairs(tokens: int, window: int | None = None) -> int:
    """(query, key) pairs a causal attention over `tokens` positions computes, with an
    optional sliding window of `window` keys (the query's own position included)."""
    if window is None or window >= tokens:
        return tokens * (tokens + 1) // 2
    return window * (window + 1) // 2 + (tokens - window) * window


@dataclass(frozen=True)
class FlopModel:
    """FLOPs of one block over a window and of the LM head per token, from the model's shapes.

    A multiply-add is 2 FLOPs. Block: 2 x (weights of its linear layers) per token, plus for
    attention 2 x 2 x heads x head_dim per causal (query, key) pair (QK^T and the weighted
    sum of V; sliding-window layers attend to at most `sliding_window` keys). Head:
    2 x hidden x vocab per token. Norms, activations, rotary embeddings, softmaxes and the
    cross-entropy are left out (they are O(hidden) or O(vocab) per token, not O(hidden x ...)).
    """

    linear: dict[str, int]  # block name -> weights in its linear layers
    heads: int
    head_dim: int
    window: dict[int, int | None]  # layer -> sliding window (None: full causal)
    head_weights: int  # hidden x vocab
    hidden: int = 0  # hidden size: a bound column costs 2 x hidden FLOPs per token

    @classmethod
    def of(cls, pm: PrunableModel) -> "FlopModel":
        cached = _FLOP_MODELS.get(pm.model)
        if cached is not None and len(cached.window) == pm.num_layers:
            return cached
        cfg = pm.decoder_config
        linear = {}
        for name in pm.names:
            kind, i = parse_block(name)
            module = getattr(pm.layers[i], pm.adapter.branch(kind).module)
            linear[name] = sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        sliding = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        window = {}
        for i in range(pm.num_layers):
            if types is not None and i < len(types):
                window[i] = sliding if (sliding and "sliding" in str(types[i])) else None
            else:
                window[i] = sliding if (sliding and getattr(cfg, "use_sliding_window", True)) else None
        head = get_path(pm.model, pm.adapter.lm_head)
        fm = cls(linear, heads, head_dim, window, int(head.weight.numel()),  # vocab x hidden (also non-Linear heads)
                 int(head.weight.shape[-1]))
        _FLOP_MODELS[pm.model] = fm
        return fm

    def block(self, name: str, tokens: int) -> int:
        flops = 2 * self.linear[name] * tokens
        kind, i = parse_block(name)
        if kind == "attn":
            flops += 4 * self.heads * self.head_dim * causal_pairs(tokens, self.window[i])
        return flops

    def head(self, tokens: int) -> int:
        return 2 * self.head_weights * tokens

    def bound(self, token_columns: int) -> int:
        """The head bound: one hidden-size dot product per (token, column)."""
        return 2 * self.hidden * token_columns


_FLOP_MODELS: "weakref.WeakKeyDictionary[nn.Module, FlopModel]" = weakref.WeakKeyDictionary()


@dataclass
class Cost:
    """Work done: block forwards (one block over one window), full LM-head tokens, head-bound
    token-columns (one token's logit for one column), and FLOPs."""

    block_forwards: int = 0
    head_tokens: int = 0
    windows: int = 0  # window passes (a window walked once for any number of candidates)
    flops: int = 0  # `FlopModel` count of the block forwards, head tokens and bound columns
    bound_columns: int = 0

    def add_block(self, pm: PrunableModel, name: str, tokens: int, windows: int = 1) -> None:
        self.block_forwards += windows
        self.flops += windows * FlopModel.of(pm).block(name, tokens)

    def add_head(self, pm: PrunableModel, tokens: int) -> None:
        self.head_tokens += tokens
        self.flops += FlopModel.of(pm).head(tokens)

    def add_bound(self, pm: PrunableModel, token_columns: int) -> None:
        self.bound_columns += token_columns
        self.flops += FlopModel.of(pm).bound(token_columns)

    def __iadd__(self, other: "Cost") -> "Cost":
        self.block_forwards += other.block_forwards
        self.head_tokens += other.head_tokens
        self.windows += other.windows
        self.flops += other.flops
        self.bound_columns += other.bound_columns
        return self

    def as_dict(self) -> dict:
        return {"block_forwards": self.block_forwards, "head_tokens": self.head_tokens, "window_passes": self.windows,
                "flops": self.flops, "bound_columns": self.bound_columns}

    @classmethod
    def from_dict(cls, d: dict) -> "Cost":
        return cls(d["block_forwards"], d["head_tokens"], d["window_passes"], d.get("flops", 0), d.get("bound_columns", 0))
