"""The scoring engine: NLL of "the current model minus one more block" for many candidates.

For each calibration window we

1. let the model's own decoder forward build what its layers receive -- the scaled
   embeddings, attention masks (causal, sliding-window), rotary tables -- but with every
   layer replaced by a recorder, so nothing heavy runs (`capture_window`);
2. walk the current model's remaining blocks once, in forward order; at each candidate b
   the running residual stream *is* the state before b (removing b changes nothing before
   it), so we run only the blocks after b from there, then the LM head (prefix reuse).
   Only the running state and one candidate's suffix are alive at a time: memory is one
   window's activations, never the whole calibration set, whatever the number of blocks.

Everything that scores candidates -- the greedy search, the one-shot ablation, the
sharded step, the benchmark -- goes through `score_candidates`, which also takes an NLL
`bound` (a candidate whose running NLL exceeds it is stopped, status "stopped") and any
candidate subset (sharding).

Exact early stopping (`score_exact`). Token NLLs are >= 0, so a running NLL only grows
(float additions of non-negative numbers are monotone too): once a candidate's running NLL
over some windows -- or some head chunks of a window -- exceeds the total of a candidate
that has finished, it cannot finish below it and can never be chosen. We therefore score
the first window for every candidate, then one *seed* candidate over the other windows --
the best-ranked candidate of the previous step still available, else the best candidate on
the first window -- and then the others, each stopped as soon as its running NLL exceeds
the seed's total. The bound is fixed (it is
not tightened as other candidates finish), which makes every candidate's recorded result a
function of that candidate and the seed only: a step split over shards (each scoring the
seed itself) records bit-for-bit the scores of the unsharded step.

`Cost` counts the work: block forwards (one block over one window), LM-head tokens, and
FLOPs from `FlopModel`, an analytic count from the model's shapes.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import get_path
from ..blocks import PrunableModel, block_index, parse_block, tie_order

# ---------------------------------------------------------------------------- FLOP model


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
        fm = cls(linear, heads, head_dim, window, int(head.weight.numel()))  # vocab x hidden (also non-Linear heads)
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


_FLOP_MODELS: "weakref.WeakKeyDictionary[nn.Module, FlopModel]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------- records


@dataclass
class WindowContext:
    """What the model's forward hands its decoder layers for one window."""

    hidden: torch.Tensor  # input of layer 0
    layer_kwargs: list[dict]


@dataclass
class Cost:
    """Work done: block forwards (one block over one window), LM-head tokens, and FLOPs."""

    block_forwards: int = 0
    head_tokens: int = 0
    windows: int = 0  # window passes (a window walked once for any number of candidates)
    flops: int = 0  # `FlopModel` count of the block forwards and head tokens above

    def add_block(self, pm: PrunableModel, name: str, tokens: int) -> None:
        self.block_forwards += 1
        self.flops += FlopModel.of(pm).block(name, tokens)

    def add_head(self, pm: PrunableModel, tokens: int) -> None:
        self.head_tokens += tokens
        self.flops += FlopModel.of(pm).head(tokens)

    def __iadd__(self, other: "Cost") -> "Cost":
        self.block_forwards += other.block_forwards
        self.head_tokens += other.head_tokens
        self.windows += other.windows
        self.flops += other.flops
        return self

    def as_dict(self) -> dict:
        return {"block_forwards": self.block_forwards, "head_tokens": self.head_tokens, "window_passes": self.windows,
                "flops": self.flops}

    @classmethod
    def from_dict(cls, d: dict) -> "Cost":
        return cls(d["block_forwards"], d["head_tokens"], d["window_passes"], d.get("flops", 0))


@dataclass
class Score:
    """One candidate's result.

    status: done | stopped (its running NLL exceeded the bound: it cannot win) | nonfinite |
    screened (dropped by a screened step after its first windows). For a result that is not
    `done`, nll_sum / tokens / windows are what was scored before it was dropped.
    """

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

    @classmethod
    def from_dict(cls, d: dict) -> "Score":
        return cls(d["block"], d["nll_sum"], d["tokens"], d["status"], d["windows"])


# ---------------------------------------------------------------------------- the engine
# Every pass over blocks in the package goes through `walk` (or `run_blocks`, its last
# state) and every NLL through `head_nll`: the search, the baselines, the importance
# metrics and the analyses all see the same residual stream and the same sums.


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


def model_device(pm: PrunableModel) -> torch.device:
    return next(pm.model.parameters()).device


def window_batches(pm: PrunableModel, windows: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each 1-D window as a (1, T) batch on the model's device."""
    device = model_device(pm)
    for ids in windows:
        yield ids.to(device).unsqueeze(0)


def walk(pm: PrunableModel, ctx: WindowContext, hidden: torch.Tensor, cost: Cost, *, start: int = 0,
         skip: Collection[str] = ()) -> Iterator[tuple[str | None, torch.Tensor]]:
    """Walk blocks `pm.names[start:]` from residual state `hidden`: yield (block, the state
    before it) for each, then run it unless it is in `skip`; finally yield (None, the last
    state). A skipped block's state before and after is the same tensor. Stopping the
    iteration early leaves the later blocks unrun."""
    h = hidden
    tokens = hidden.shape[1]
    for name in pm.names[start:]:
        yield name, h
        if name not in skip:
            h = pm.run_block(name, h, ctx.layer_kwargs[block_index(name) // 2])
            cost.add_block(pm, name, tokens)
    yield None, h


def run_blocks(pm: PrunableModel, ctx: WindowContext, hidden: torch.Tensor, cost: Cost, *, start: int = 0,
               skip: Collection[str] = ()) -> torch.Tensor:
    """The residual stream after blocks `pm.names[start:]` not in `skip`, from `hidden`."""
    for name, h in walk(pm, ctx, hidden, cost, start=start, skip=skip):
        if name is None:
            return h
    raise AssertionError("walk always ends with the last state")


def prefix_states(pm: PrunableModel, ctx: WindowContext, cost: Cost, skip: Collection[str] = ()) -> list[torch.Tensor]:
    """Residual stream before each block (index 2L: after the last one), `skip` not run."""
    return [h for _, h in walk(pm, ctx, ctx.hidden, cost, skip=skip)]


LOGIT_BYTES_PER_CHUNK = 64 * 2**20  # fp32 logits held at once by the head


def head_chunk_tokens(vocab_size: int) -> int:
    return max(16, LOGIT_BYTES_PER_CHUNK // (4 * vocab_size))


def head_nll(pm: PrunableModel, hidden: torch.Tensor, input_ids: torch.Tensor, cost: Cost | None = None, *,
             normed: bool = False, bound: float | None = None, before: float = 0.0) -> tuple[list[float], int]:
    """Summed next-token NLL per row of a (B, T) batch, and the label positions scored per row.

    `hidden` is the last residual state (final-normed already when `normed`). The LM head and
    any final logit soft-capping are applied exactly as the model's own forward, a chunk of
    positions at a time, each chunk's cross-entropy summed in float64. With `bound` (one row),
    scoring stops between chunks once `before` plus the running sum exceeds it: the rest can
    only add to it.
    """
    if not normed:
        hidden = get_path(pm.model, pm.adapter.final_norm)(hidden)
    head = get_path(pm.model, pm.adapter.lm_head)
    softcap = getattr(pm.decoder_config, "final_logit_softcapping", None)
    hidden = hidden[:, :-1]
    labels = input_ids[:, 1:].to(hidden.device)
    b, t = labels.shape
    step = max(1, head_chunk_tokens(head.weight.shape[0]) // b)
    sums = torch.zeros(b, dtype=torch.float64, device=hidden.device)
    done = 0
    while done < t:
        logits = head(hidden[:, done : done + step]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        nll = F.cross_entropy(logits.flatten(0, 1), labels[:, done : done + step].flatten(), reduction="none")
        sums += nll.view(b, -1).double().sum(dim=1)
        done += nll.numel() // b
        if cost is not None:
            cost.add_head(pm, nll.numel())
        if bound is not None and done < t and before + sums.item() > bound:
            break
    return sums.tolist(), done


def perplexity_of(nll_sum: float, tokens: int) -> float:
    mean = nll_sum / tokens
    return math.exp(mean) if math.isfinite(mean) and mean < 700 else math.inf


# ---------------------------------------------------------------------------- scoring candidates


@torch.no_grad()
def _add_window_nll(pm: PrunableModel, hidden: torch.Tensor, ids: torch.Tensor, s: Score, bound: float | None,
                    cost: Cost, last_window: bool = False) -> None:
    """Add one window's NLL to `s`, stopping between head chunks once `bound` is exceeded.

    A candidate over the bound is `stopped` only where work was cut (a chunk or a window
    left); one that finished its last window stays `done`, with its full NLL, and simply loses.
    """
    (nll,), done = head_nll(pm, hidden, ids, cost, bound=bound, before=s.nll_sum)
    n = ids.shape[1] - 1
    s.nll_sum += nll
    s.tokens += done
    if done == n:
        s.windows_done += 1
    if not math.isfinite(s.nll_sum):
        s.status = "nonfinite"
    elif bound is not None and s.nll_sum > bound and (done < n or not last_window):
        s.status = "stopped"


@torch.no_grad()
def _score_windows(pm: PrunableModel, windows: Iterable[torch.Tensor], scores: Sequence[Score], bound: float | None,
                   cost: Cost, on_progress: Callable[[int], None] | None = None) -> None:
    """Accumulate each window's NLL into every live (`done`) score, walking the blocks once per
    window: at candidate b the running state is the state before b (removing b changes
    nothing before it), so only the blocks after b run from there (prefix reuse)."""
    removed = set(pm.removed)
    for s in scores:
        if s.block not in pm.names or s.block in removed:
            raise ValueError(f"candidate {s.block} is not a remaining block of the model")
    windows = list(windows)
    for i, ids in enumerate(window_batches(pm, windows)):
        alive = {s.block: s for s in scores if s.status == "done"}
        if not alive:
            break
        ctx = capture_window(pm, ids)
        cost.windows += 1
        last = max(block_index(b) for b in alive)
        for name, h in walk(pm, ctx, ctx.hidden, cost, skip=removed):
            if name is None or block_index(name) > last:
                break
            s = alive.get(name)
            if s is not None:
                x = run_blocks(pm, ctx, h, cost, start=block_index(name) + 1, skip=removed)
                _add_window_nll(pm, x, ids, s, bound, cost, last_window=i == len(windows) - 1)
                del x
                if on_progress:
                    on_progress(1)
        del h, ctx


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

    Windows are visited in order, so sums are bit-reproducible and independent of which
    other candidates are scored alongside. With `bound`, a candidate is stopped (status
    "stopped") as soon as its running NLL exceeds it, between windows or head chunks (NLL
    only grows, so it cannot finish below the bound); its partial NLL is kept.
    """
    cost = cost if cost is not None else Cost()
    scores = {c: Score(c) for c in candidates}
    _score_windows(pm, windows, list(scores.values()), bound, cost, on_progress)
    return scores


@dataclass
class ExactResult:
    """Scores of an exact (optionally early-stopped) evaluation, and how it was bounded."""

    scores: dict[str, Score]
    early_stop: bool
    seed: str | None = None  # the candidate scored first; its total is the bound
    seed_from: str | None = None  # "previous step" | "first window" | "screen"
    bound: float | None = None

    def info(self) -> dict:
        return {"early_stop": self.early_stop, "seed": self.seed, "seed_from": self.seed_from, "bound": self.bound}


def _best(scores: Iterable[Score]) -> Score | None:
    done = [s for s in scores if s.status == "done" and math.isfinite(s.nll_sum)]
    return min(done, key=lambda s: (s.nll_sum, tie_order(s.block))) if done else None


@torch.no_grad()
def score_exact(
    pm: PrunableModel,
    windows: Sequence[torch.Tensor],
    candidates: Sequence[str],
    *,
    prefer: Sequence[str] = (),
    early_stop: bool = True,
    owned: Sequence[str] | None = None,
    start: dict[str, Score] | None = None,
    seed_from: str = "previous step",
    cost: Cost | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ExactResult:
    """Exact scores of `candidates` with early stopping: the winner and every finished NLL
    are those of plain scoring; losers may be stopped with a partial NLL.

    1. The first window is scored for every candidate wanted (no bound is known yet; a
       single window rarely exceeds a total over all windows anyway).
    2. The seed -- the first of `prefer` (the previous step's ranking) among `candidates`,
       else the best candidate on the first window -- is scored on the remaining windows;
       its total is the bound.
    3. The other candidates are scored on the remaining windows with that bound.

    owned: the candidates whose scores are wanted (a shard). The seed is scored in every
      shard, and without a preference every candidate's first window too, so that every
      shard has the same bound and records exactly the unsharded scores of its candidates.
    start: scores already accumulated over earlier windows (not in `windows`), continued
      here (the screened step's confirmation).
    """
    cost = cost if cost is not None else Cost()
    candidates = list(candidates)
    owned = candidates if owned is None else [c for c in candidates if c in set(owned)]
    scores = dict(start) if start else {}
    for c in candidates:
        scores.setdefault(c, Score(c))
    result = ExactResult({c: scores[c] for c in owned}, early_stop)

    def live(names):
        return [scores[c] for c in names if scores[c].status == "done"]

    if not early_stop or not candidates:
        _score_windows(pm, windows, live(owned), None, cost, on_progress)
        return result
    seed = next((c for c in prefer if c in scores and scores[c].status == "done"), None)
    first = candidates if seed is None else [c for c in candidates if c in set(owned) | {seed}]
    _score_windows(pm, windows[:1], live(first), None, cost, on_progress)
    rest = list(windows[1:])
    if seed is None:
        best = _best(scores[c] for c in candidates)
        seed, seed_from = (best.block if best else None), "first window"
    elif scores[seed].status != "done":
        seed = None  # the preferred seed went non-finite; shards do not know the others' first window
    if seed is None:  # nothing finite bounds the others
        _score_windows(pm, rest, live(owned), None, cost, on_progress)
        return result
    _score_windows(pm, rest, [scores[seed]], None, cost, on_progress)
    total = scores[seed]
    bound = total.nll_sum if total.status == "done" else None
    result.seed, result.seed_from, result.bound = seed, seed_from, bound
    others = [c for c in owned if c != seed]
    if rest and bound is not None:  # beyond the bound already on the first window
        for s in live(others):
            if s.nll_sum > bound:
                s.status = "stopped"
    _score_windows(pm, rest, live(others), bound, cost, on_progress)
    return result


# ---------------------------------------------------------------------------- other passes


@torch.no_grad()
def current_nll(pm: PrunableModel, windows: Sequence[torch.Tensor], cost: Cost | None = None) -> Score:
    """NLL of the model as it stands, through the same block runner as the candidates."""
    cost = cost if cost is not None else Cost()
    removed = set(pm.removed)
    score = Score("current")
    for ids in window_batches(pm, windows):
        ctx = capture_window(pm, ids)
        h = run_blocks(pm, ctx, ctx.hidden, cost, skip=removed)
        cost.windows += 1
        (nll,), done = head_nll(pm, h, ids, cost)
        score.nll_sum += nll
        score.tokens += done
        score.windows_done += 1
    if not math.isfinite(score.nll_sum):
        score.status = "nonfinite"
    return score


@torch.no_grad()
def layer_influence(pm: PrunableModel, windows: Sequence[torch.Tensor], cost: Cost | None = None) -> dict[int, float]:
    """Block Influence of every layer of the model as it stands: 1 - cos(layer input, layer
    output) per token (float64), averaged over every token of every window (ShortGPT's BI,
    as in `importance.residual_metrics`). A layer whose blocks are all removed has BI 0."""
    cost = cost if cost is not None else Cost()
    removed = set(pm.removed)
    sums = [0.0] * pm.num_layers
    tokens = 0
    for ids in window_batches(pm, windows):
        ctx = capture_window(pm, ids)
        cost.windows += 1
        x, layer = None, -1  # the input of the layer being walked, and its index
        for name, h in walk(pm, ctx, ctx.hidden, cost, skip=removed):
            if name is not None and not name.startswith("attn."):
                continue
            if layer >= 0 and h is not x:  # h: the output of that layer
                cos = F.cosine_similarity(x.double(), h.double(), dim=-1, eps=1e-12)
                sums[layer] += (1.0 - cos).sum().item()
            if name is not None:
                x, layer = h, block_index(name) // 2
        tokens += ids.shape[1]
        del ctx, h, x
    return {i: sums[i] / tokens for i in range(pm.num_layers)}


def rank(scores: dict[str, Score]) -> list[Score]:
    """Finished candidates best first (NLL, then the documented tie order), then the rest."""
    done = sorted((s for s in scores.values() if s.status == "done"), key=lambda s: (s.nll_sum, tie_order(s.block)))
    rest = sorted((s for s in scores.values() if s.status != "done"), key=lambda s: tie_order(s.block))
    return done + rest

