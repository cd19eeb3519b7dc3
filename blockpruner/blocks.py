"""Blocks: naming them, skipping their residual branch, and counting their parameters.

A model with L layers has 2L blocks, `attn.0, mlp.0, attn.1, mlp.1, ...` in forward order.
`PrunableModel.wrap(model)` replaces each decoder layer's `forward` with `layer_forward`
below: the same two residual lines as the architecture's own forward (the adapter says
which norms), except that a removed block's whole branch -- norms, module, dropout -- is
not executed at all. Removal is a set of names on the layer, so it is free to undo.

The patched forward is also what lets the scoring engine run a single block (`run_block`) from
cached hidden states, so prefix reuse needs no second copy of the model code.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import Adapter, adapter_for, get_path, text_config
from .branch import branch_output, keyword_args
from .errors import UserError

KINDS = ("attn", "mlp")
_BLOCK_RE = re.compile(r"^(attn|mlp)\.(\d+)$")


def block_names(num_layers: int) -> list[str]:
    """All block names in forward order."""
    return [f"{kind}.{i}" for i in range(num_layers) for kind in KINDS]


def parse_block(name: str) -> tuple[str, int]:
    m = _BLOCK_RE.match(name)
    if not m:
        raise UserError(f"bad block name {name!r}: expected 'attn.<layer>' or 'mlp.<layer>'")
    return m.group(1), int(m.group(2))


def block_index(name: str) -> int:
    """Position of a block in forward order (attn.i -> 2i, mlp.i -> 2i + 1)."""
    kind, layer = parse_block(name)
    return 2 * layer + KINDS.index(kind)


def tie_order(name: str) -> tuple[int, int]:
    """Tie-break key: attention blocks before MLP blocks, then ascending layer.

    This is the order in which the reference implementation enumerates candidates, so
    when two candidates give bit-identical perplexity we pick the one it would have kept.
    """
    kind, layer = parse_block(name)
    return KINDS.index(kind), layer


def run_branch(layer: nn.Module, adapter: Adapter, kind: str, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """h + branch(h) for one block, exactly as the architecture's own layer computes it."""
    spec = adapter.branch(kind)
    return hidden + branch_output(layer, kind, hidden, kwargs, spec.pre_norm, spec.module, spec.post_norm, spec.dropout)


def layer_forward(layer: nn.Module, adapter: Adapter, hidden_states: torch.Tensor, *args, **kwargs):
    """Replacement for `DecoderLayer.forward` that skips removed blocks outright."""
    kwargs = keyword_args(args, kwargs)
    for kind in KINDS:
        if kind not in layer.bp_removed:
            hidden_states = run_branch(layer, adapter, kind, hidden_states, kwargs)
    return (hidden_states,) if adapter.layer_returns_tuple else hidden_states


@dataclass
class PrunableModel:
    """A causal LM whose blocks can be removed and restored in memory."""

    model: nn.Module
    adapter: Adapter
    layers: nn.ModuleList
    names: list[str] = field(init=False)
    # a label id every NLL skips (the official code's pad-token quirk; numerics.Numerics.apply)
    ignore_index: int | None = None

    def __post_init__(self) -> None:
        self.names = block_names(len(self.layers))

    @classmethod
    def wrap(cls, model: nn.Module) -> "PrunableModel":
        """Install the skipping forward on every decoder layer (idempotent)."""
        adapter = adapter_for(model.config.model_type)
        layers = get_path(model, adapter.layers)
        for layer in layers:
            if not hasattr(layer, "bp_removed"):
                layer.bp_removed = set()
                layer.forward = functools.partial(layer_forward, layer, adapter)
        return cls(model, adapter, layers)

    # -- which blocks are removed -------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def removed(self) -> list[str]:
        return [n for n in self.names if self._kind_removed(n)]

    def remaining(self) -> list[str]:
        return [n for n in self.names if not self._kind_removed(n)]

    def _kind_removed(self, name: str) -> bool:
        kind, i = parse_block(name)
        return kind in self.layers[i].bp_removed

    def check(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        for n in names:
            _, i = parse_block(n)
            if i >= self.num_layers:
                raise UserError(f"block {n!r} does not exist: the model has {self.num_layers} layers (0..{self.num_layers - 1})")
        return names

    def remove(self, names: Iterable[str]) -> None:
        for n in self.check(names):
            kind, i = parse_block(n)
            self.layers[i].bp_removed.add(kind)

    def restore(self, names: Iterable[str]) -> None:
        for n in self.check(names):
            kind, i = parse_block(n)
            self.layers[i].bp_removed.discard(kind)

    def set_removed(self, names: Iterable[str]) -> None:
        names = self.check(names)
        for layer in self.layers:
            layer.bp_removed.clear()
        self.remove(names)

    @contextlib.contextmanager
    def without(self, names: Iterable[str]) -> Iterator[None]:
        """Temporarily remove blocks (those not already removed), restoring them on exit."""
        added = [n for n in self.check(names) if not self._kind_removed(n)]
        self.remove(added)
        try:
            yield
        finally:
            self.restore(added)

    # -- running one block ----------------------------------------------------------------
    def run_block(self, name: str, hidden: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
        kind, i = parse_block(name)
        return run_branch(self.layers[i], self.adapter, kind, hidden, layer_kwargs)

    # -- sizes -----------------------------------------------------------------------------
    def block_params(self, name: str) -> int:
        kind, i = parse_block(name)
        layer = self.layers[i]
        return sum(p.numel() for part in self.adapter.branch(kind).parts() for p in getattr(layer, part).parameters())

    def param_summary(self, removed: Iterable[str] = ()) -> dict:
        """Parameter counts and pruning ratios, with and without embeddings.

        `total` counts every parameter once (tied embeddings once), as the paper's ratios do;
        `total_no_embed` leaves out the input embedding and the LM head.
        """
        removed = list(removed)
        total = sum(p.numel() for p in self.model.parameters())  # .parameters() dedups tied weights
        embed = {id(p): p.numel() for p in get_path(self.model, self.adapter.embed).parameters()}
        embed |= {id(p): p.numel() for p in get_path(self.model, self.adapter.lm_head).parameters()}
        no_embed = total - sum(embed.values())
        gone = sum(self.block_params(n) for n in removed)
        return {
            "total": total,
            "removed": gone,
            "remaining": total - gone,
            "ratio": gone / total,
            "total_no_embed": no_embed,
            "ratio_no_embed": gone / no_embed if no_embed else 0.0,
        }

    @property
    def decoder_config(self):
        return text_config(self.model.config, self.adapter)
