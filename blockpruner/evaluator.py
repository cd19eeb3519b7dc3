"""The evaluator: NLL of "the current model minus one more block" for many candidates.

For each calibration window we

1. let the model's own decoder forward build what its layers receive -- the scaled
   embeddings, attention masks (causal, sliding-window), rotary tables -- but with every
   layer replaced by a recorder, so nothing heavy runs (`capture_window`);
2. run the current model's remaining blocks once, keeping the residual stream before every
   block (`prefix_states`);
3. for each candidate block b, start from the state before b and run only the blocks after
   it (prefix reuse: removing b changes nothing before b), then the LM head.

Everything that scores candidates -- the greedy search, the one-shot ablation, the
sharded step, the benchmark -- goes through `score_candidates`, which also takes an NLL
`bound` (exact early stopping: a candidate whose running NLL already exceeds the best
finished total cannot win) and a candidate subset (sharding). Memory is bounded by one
window's hidden states per block, never the whole calibration set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .adapters import get_path
from .blocks import PrunableModel, block_index
from .perplexity import perplexity_of, window_nll


@dataclass
class WindowContext:
    """What the model's forward hands its decoder layers for one window."""

    hidden: torch.Tensor  # input of layer 0
    layer_kwargs: list[dict]


@dataclass
class Cost:
    """Work done, in units that convert to FLOPs: block forwards and LM-head tokens."""

    block_forwards: int = 0  # one block over one window
    head_tokens: int = 0  # positions pushed through the LM head
    windows: int = 0

    def as_dict(self) -> dict:
        return {"block_forwards": self.block_forwards, "head_tokens": self.head_tokens, "window_passes": self.windows}


@dataclass
class Score:
    """One candidate's result. status: done | stopped (bound exceeded) | nonfinite."""

    block: str
    nll_sum: float = 0.0
    tokens: int = 0
    status: str = "done"
    windows_done: int = 0

    @property
    def ppl(self) -> float:
        return perplexity_of(self.nll_sum, self.tokens) if self.status == "done" else math.inf

    def as_dict(self) -> dict:
        d = {"block": self.block, "status": self.status, "windows": self.windows_done, "nll_sum": self.nll_sum, "tokens": self.tokens}
        d["ppl"] = self.ppl if self.status == "done" else None
        return d


@torch.no_grad()
def capture_window(pm: PrunableModel, input_ids: torch.Tensor) -> WindowContext:
    """Run the decoder with identity layers to record each layer's input kwargs."""
    seen: list[dict] = []
    first: list[torch.Tensor] = []
    saved = [layer.forward for layer in pm.layers]

    def recorder(hidden_states, *args, **kwargs):
        if not first:
            first.append(hidden_states)
        if args:
            kwargs = dict(zip(("attention_mask", "position_ids", "past_key_value"), args)) | kwargs
        seen.append(kwargs)
        return (hidden_states,) if pm.adapter.layer_returns_tuple else hidden_states

    try:
        for layer in pm.layers:
            layer.forward = recorder
        get_path(pm.model, pm.adapter.decoder)(input_ids=input_ids, use_cache=False)
    finally:
        for layer, fwd in zip(pm.layers, saved):
            layer.forward = fwd
    return WindowContext(first[0], seen)


def _kwargs_for(ctx: WindowContext, name: str) -> dict:
    return ctx.layer_kwargs[block_index(name) // 2]


@torch.no_grad()
def prefix_states(pm: PrunableModel, ctx: WindowContext, cost: Cost) -> list[torch.Tensor]:
    """Residual stream before each block (index 2L = after the last one), removed blocks skipped."""
    states = [ctx.hidden]
    h = ctx.hidden
    removed = set(pm.removed)
    for name in pm.names:
        if name not in removed:
            h = pm.run_block(name, h, _kwargs_for(ctx, name))
            cost.block_forwards += 1
        states.append(h)
    return states


@torch.no_grad()
def run_suffix(pm: PrunableModel, ctx: WindowContext, start: torch.Tensor, after: str, cost: Cost) -> torch.Tensor:
    """Run the remaining blocks after block `after`, starting from hidden state `start`."""
    removed = set(pm.removed)
    h = start
    for name in pm.names[block_index(after) + 1 :]:
        if name not in removed:
            h = pm.run_block(name, h, _kwargs_for(ctx, name))
            cost.block_forwards += 1
    return h


@torch.no_grad()
def score_candidates(
    pm: PrunableModel,
    windows: Sequence[torch.Tensor],
    candidates: Sequence[str],
    *,
    bound: float | None = None,
    cost: Cost | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Score]:
    """NLL over all windows of the current model with each candidate additionally removed.

    Windows are visited in order and candidates in the given order inside each window, so
    sums are bit-reproducible. With `bound`, a candidate is stopped as soon as its running
    NLL exceeds it (NLL only grows, so it cannot finish below the bound).
    """
    cost = cost if cost is not None else Cost()
    device = next(pm.model.parameters()).device
    scores = {c: Score(c) for c in candidates}
    for ids in windows:
        alive = [s for s in scores.values() if s.status == "done"]
        if not alive:
            break
        ids = ids.to(device).unsqueeze(0)
        ctx = capture_window(pm, ids)
        states = prefix_states(pm, ctx, cost)
        cost.windows += 1
        for s in alive:
            h = run_suffix(pm, ctx, states[block_index(s.block)], s.block, cost)
            nll = window_nll(pm, h, ids)[0]
            cost.head_tokens += ids.shape[1] - 1
            s.nll_sum += nll
            s.tokens += ids.shape[1] - 1
            s.windows_done += 1
            if not math.isfinite(s.nll_sum):
                s.status = "nonfinite"
            elif bound is not None and s.nll_sum > bound:
                s.status = "stopped"
            if on_progress:
                on_progress(1)
        del states, ctx
    return scores


@torch.no_grad()
def current_nll(pm: PrunableModel, windows: Sequence[torch.Tensor], cost: Cost | None = None) -> Score:
    """NLL of the model as it stands, through the same block runner as the candidates."""
    cost = cost if cost is not None else Cost()
    device = next(pm.model.parameters()).device
    score = Score("current")
    for ids in windows:
        ids = ids.to(device).unsqueeze(0)
        ctx = capture_window(pm, ids)
        h = prefix_states(pm, ctx, cost)[-1]
        score.nll_sum += window_nll(pm, h, ids)[0]
        score.tokens += ids.shape[1] - 1
        score.windows_done += 1
        cost.head_tokens += ids.shape[1] - 1
    if not math.isfinite(score.nll_sum):
        score.status = "nonfinite"
    return score


def rank(scores: dict[str, Score]) -> list[Score]:
    """Finished candidates best first (NLL, then the documented tie order), then the rest."""
    from .blocks import tie_order

    done = sorted((s for s in scores.values() if s.status == "done"), key=lambda s: (s.nll_sum, tie_order(s.block)))
    rest = sorted((s for s in scores.values() if s.status != "done"), key=lambda s: tie_order(s.block))
    return done + rest
