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

Windows run `batch` at a time where the caller asks (`window_groups`: consecutive windows of
one length, `--window-batch`): the walk, the suffixes, the head bound's passes and the head
then work on a (B, T) batch, and each window's NLL is still added in window order.

Everything that scores candidates -- the greedy search, the one-shot ablation, the
sharded step, the benchmark -- goes through `score_candidates`, which also takes an NLL
`bound` (a candidate whose running NLL exceeds it is stopped, status "stopped") and any
candidate subset (sharding).

Exact early stopping (`score_exact`). Token NLLs are >= 0, so a running NLL only grows
(float additions of non-negative numbers are monotone too): once a candidate's running NLL
over some windows -- or some head chunks of a window -- exceeds the total of a candidate
that has finished, it cannot finish below it and can never be chosen. We therefore score
the first window for every candidate, then one *seed* candidate over the other windows --
the best finished candidate of the previous step still available, else the best candidate on
the first window -- and then the others, each stopped as soon as its running NLL exceeds
the seed's total. The bound is fixed (it is
not tightened as other candidates finish), which makes every candidate's recorded result a
function of that candidate and the seed only: a step split over shards (each scoring the
seed itself) records bit-for-bit the scores of the unsharded step.

The head bound (`score_exact(head_bound=N)`). On a large vocabulary the LM head dominates:
Gemma 3's is ~63% of the FLOPs. For a token with logits z and target y, NLL = LSE(z) - z_y
and for any column set S holding y, LSE_S(z) <= LSE(z), so LSE_S(z) - z_y is a lower bound
on the NLL from |S| columns only (`head_lower_bound`). Per window, S is the N columns with
the most softmax mass summed over the window's positions under the seed (read off the
seed's own head pass) plus the window's targets. A candidate whose exact NLL so far plus
its lower bounds over the remaining windows exceeds the seed's total cannot win: it is cut
(status "bounded") without its full head; so is a survivor, window by window, once its exact
NLL so far plus the lower bounds of the windows ahead exceeds the total. The others' final-normed states are kept (within
`BOUND_CACHE_BYTES`, else their blocks are run again) and finished with the full head
exactly as without the bound, so every finished NLL is bit-for-bit the same.

`Cost` counts the work: block forwards (one block over one window), LM-head tokens, bound
token-columns, and FLOPs from `FlopModel`, an analytic count from the model's shapes.
"""

from __future__ import annotations

import math
import weakref
from itertools import chain
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import get_path
from ..blocks import PrunableModel, block_index, parse_block, tie_order
from ..errors import UserError
from . import HEAD_BOUND_COLUMNS

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


# ---------------------------------------------------------------------------- records


@dataclass
class WindowContext:
    """What the model's forward hands its decoder layers for one window."""

    hidden: torch.Tensor  # input of layer 0
    layer_kwargs: list[dict]


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


@dataclass
class Score:
    """One candidate's result.

    status: done | stopped (its running NLL exceeded the bound: it cannot win) | bounded (its
    exact NLL so far plus the head bound's lower bound on the other windows, `lower_bound`,
    exceeded the bound: it cannot win) | nonfinite | screened (dropped by a screened step after
    its first windows). For a result that is not `done`, nll_sum / tokens / windows are what
    was scored exactly before it was dropped.
    """

    block: str
    nll_sum: float = 0.0
    tokens: int = 0
    status: str = "done"
    windows_done: int = 0
    lower_bound: float | None = None  # bounded: a certified lower bound on its total NLL

    @property
    def ppl(self) -> float:
        return perplexity_of(self.nll_sum, self.tokens) if self.status == "done" else math.inf

    def as_dict(self) -> dict:
        d = {"block": self.block, "status": self.status, "windows": self.windows_done, "nll_sum": self.nll_sum, "tokens": self.tokens}
        d["ppl"] = self.ppl if self.status == "done" else None
        if self.lower_bound is not None:
            d["nll_lower_bound"] = self.lower_bound
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Score":
        return cls(d["block"], d["nll_sum"], d["tokens"], d["status"], d["windows"], d.get("nll_lower_bound"))


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


def window_groups(windows: Sequence[torch.Tensor], size: int, start: int = 0) -> list[range]:
    """Indices of `windows[start:]` in consecutive groups of at most `size` windows of one
    length: the batches the engine runs. Windows stay in order, so every candidate's sums are
    added in the same order whatever the batch size."""
    groups, first = [], start
    for i in range(start + 1, len(windows) + 1):
        if i == len(windows) or i - first == size or len(windows[i]) != len(windows[first]):
            groups.append(range(first, i))
            first = i
    return groups


def stack_windows(pm: PrunableModel, windows: Sequence[torch.Tensor], group: range) -> torch.Tensor:
    """The windows of `group` as one (B, T) batch on the model's device."""
    return torch.stack([windows[i] for i in group]).to(model_device(pm))


def window_batch_for(asked: str | int, device: torch.device | str) -> int:
    """Windows per forward: `asked`, or for "auto" 1 on a CPU (a window already fills its
    cores, and results stay bit for bit those of one window at a time) and 8 on an
    accelerator, as the official code's evaluation script (`--ppl-eval-batch-size 8`), so
    the blocks' matmuls fill the card."""
    if asked == "auto":
        return 1 if torch.device(device).type == "cpu" else 8
    try:
        batch = int(asked)
    except ValueError:
        batch = 0
    if batch < 1:
        raise UserError(f"--window-batch takes a positive integer or auto, got {asked!r}")
    return batch


def walk(pm: PrunableModel, ctx: WindowContext, hidden: torch.Tensor, cost: Cost, *, start: int = 0,
         skip: Collection[str] = ()) -> Iterator[tuple[str | None, torch.Tensor]]:
    """Walk blocks `pm.names[start:]` from residual state `hidden`: yield (block, the state
    before it) for each, then run it unless it is in `skip`; finally yield (None, the last
    state). A skipped block's state before and after is the same tensor. Stopping the
    iteration early leaves the later blocks unrun."""
    h = hidden
    rows, tokens = hidden.shape[:2]
    for name in pm.names[start:]:
        yield name, h
        if name not in skip:
            h = pm.run_block(name, h, ctx.layer_kwargs[block_index(name) // 2])
            cost.add_block(pm, name, tokens, rows)
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


LOGIT_BYTES_PER_CHUNK = 64 * 2**20  # fp32 logits held at once by the head on a CPU
LOGIT_BYTES_PER_CHUNK_ACCELERATOR = 1 << 30  # on a GPU: larger head matmuls, fewer launches


def head_chunk_tokens(vocab_size: int, device: torch.device | None = None) -> int:
    budget = LOGIT_BYTES_PER_CHUNK if device is None or device.type == "cpu" else LOGIT_BYTES_PER_CHUNK_ACCELERATOR
    return max(16, budget // (4 * vocab_size))


def head_nll(pm: PrunableModel, hidden: torch.Tensor, input_ids: torch.Tensor, cost: Cost | None = None, *,
             normed: bool = False, bound: float | None = None, before: float = 0.0,
             mass: torch.Tensor | None = None) -> tuple[list[float], int]:
    """Summed next-token NLL per row of a (B, T) batch, and the label positions scored per row.

    `hidden` is the last residual state (final-normed already when `normed`). The LM head and
    any final logit soft-capping are applied exactly as the model's own forward, a chunk of
    positions at a time, each chunk's cross-entropy summed in float64. With `bound`, scoring
    stops between chunks once `before` plus the running sums of all rows exceeds it: the rest
    can only add to it. With `mass` (float32, [B, vocab], or [vocab] for one row), each
    column's softmax probability summed over a row's scored positions is added to its row (the
    head bound's choice of columns).

    With `pm.ignore_index` set (parity mode), labels equal to it count 0 and each row's sum is
    scaled by positions / counted labels: for the official code's equal-length windows the
    perplexity exp(sum / positions) is then exp(mean over windows of each window's mean).
    """
    if not normed:
        hidden = get_path(pm.model, pm.adapter.final_norm)(hidden)
    head = get_path(pm.model, pm.adapter.lm_head)
    softcap = getattr(pm.decoder_config, "final_logit_softcapping", None)
    hidden = hidden[:, :-1]
    labels = input_ids[:, 1:].to(hidden.device)
    b, t = labels.shape
    step = max(1, head_chunk_tokens(head.weight.shape[0], hidden.device) // b)
    sums = torch.zeros(b, dtype=torch.float64, device=hidden.device)
    counted = scale = None
    if pm.ignore_index is not None:
        counted = labels != pm.ignore_index
        scale = t / counted.sum(dim=1).clamp(min=1).double()
    done = 0
    while done < t:
        logits = head(hidden[:, done : done + step]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        nll = F.cross_entropy(logits.flatten(0, 1), labels[:, done : done + step].flatten(), reduction="none")
        if mass is not None:
            probs = torch.softmax(logits.flatten(0, 1), dim=-1)
            mass += (probs.sum(dim=0) if b == 1 else probs.view(b, -1, probs.shape[-1]).sum(dim=1)).to(mass.device)
        if counted is None:
            sums += nll.view(b, -1).double().sum(dim=1)
        else:
            sums += (nll.view(b, -1) * counted[:, done : done + step]).double().sum(dim=1) * scale
        done += nll.numel() // b
        if cost is not None:
            cost.add_head(pm, nll.numel())
        if bound is not None and done < t and before + sums.sum().item() > bound:
            break
    return sums.tolist(), done


def perplexity_of(nll_sum: float, tokens: int) -> float:
    mean = nll_sum / tokens
    return math.exp(mean) if math.isfinite(mean) and mean < 700 else math.inf


# ---------------------------------------------------------------------------- the head bound

BOUND_STAGE_FACTOR = 4  # the second stage's columns, as a multiple of the first's
BOUND_CACHE_BYTES = 1 << 30  # final-normed states kept for the candidates the bound does not cut
ROUNDING = {torch.float32: 0.0, torch.float64: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def bound_head(pm: PrunableModel) -> nn.Linear | None:
    """The LM head if the bound can compute its logits column by column (a plain linear layer;
    Baichuan's NormHead normalises its weight rows first, so it gets no bound)."""
    head = get_path(pm.model, pm.adapter.lm_head)
    return head if type(head) is nn.Linear else None


def bound_columns(mass: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted head columns for one (1, T) window: the `n` with the most `mass` (the seed's
    softmax summed over the window) and every target of the window."""
    top = torch.topk(mass, min(n, mass.numel())).indices
    return torch.unique(torch.cat([top, ids[0, 1:].to(top.device)]))


@dataclass
class BoundWindow:
    """One window's head-bound columns and their head rows (shared by every candidate)."""

    columns: torch.Tensor  # sorted, every target of the window included
    weight: torch.Tensor  # head rows of `columns`, float64
    bias: torch.Tensor | None  # head bias of `columns`, float64
    weight_norm: float  # largest Euclidean norm of those rows
    bias_max: float  # largest |bias| of those columns (0 without a bias)

    @classmethod
    def of(cls, head: nn.Linear, columns: torch.Tensor) -> "BoundWindow":
        w = head.weight[columns].double()
        b = head.bias[columns].double() if head.bias is not None else None
        return cls(columns, w, b, w.norm(dim=1).max().item(), b.abs().max().item() if b is not None else 0.0)


def rounding_allowance(pm: PrunableModel, h: torch.Tensor, z: torch.Tensor, bw: BoundWindow) -> torch.Tensor:
    """Per token: how far the full head's float NLL may fall below the exact value of the
    bound's terms, so that the bound also holds for `head_nll`'s computed NLL.

    `head_nll` computes the logits ẑ = z + δ in the model's float arithmetic; its NLL is
    LSE(ẑ) - ẑ_y >= LSE_S(ẑ) - ẑ_y >= LSE_S(z) - z_y - 2 max_{j in S} |δ_j| (y in S). With
    fp32 accumulation over K = hidden terms (+1 for a bias), |δ_j| <= γ_K (||h|| ||w_j|| + |b_j|)
    (the dot-product error bound, Cauchy-Schwarz for sum |h_i w_ji|), γ_K = K u / (1 - K u),
    u = 2^-24, plus 2 u_in where CUDA rounds fp32 inputs (TF32: u_in = 2^-11; bf16: 2^-8) and
    the output's rounding u_out |z_j| in bf16 / fp16 (products of bf16 / fp16 inputs are exact
    in fp32). Softcapping is 1-Lipschitz (its
    derivative is sech^2 <= 1), so it does not enlarge δ. Last, 1e-6 (1 + max |g(z)|) covers
    the float32 cross-entropy's and softcap's own rounding (a few ulps of the largest logit).
    Where no such bound is small (half-precision reductions on CUDA, which PyTorch allows by
    default: `half_precision_reduction`), the allowance is infinite: the bound is 0 and cuts
    nothing. Setting `torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction`
    (or the fp16 one) to False makes cuBLAS accumulate in fp32; u is then one fp32 ulp, 2^-23
    (tensor cores may truncate rather than round), and the bound can cut again.
    """
    dtype = h.dtype
    k = h.shape[-1] + (1 if bw.bias is not None else 0)
    u, u_in = 2.0**-24, 0.0
    zmax = z.abs().amax(dim=1)
    if h.device.type == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        u_in = 2.0**-8 if torch.get_float32_matmul_precision() == "medium" else 2.0**-11
    if h.device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        # tensor cores accumulate in fp32 but may truncate (one ulp, not half); cuBLAS may
        # also reduce split-K partial sums in the half precision itself
        u = ROUNDING[dtype] if half_precision_reduction(dtype) else 2.0**-23
    if k * u >= 0.5:
        return torch.full_like(zmax, math.inf)
    gamma = k * u / (1 - k * u) + 2 * u_in
    u_out = ROUNDING.get(dtype, 2.0**-7)
    delta = gamma * (h.double().norm(dim=1) * bw.weight_norm + bw.bias_max) + u_out * zmax
    return 2 * delta + 1e-6 * (1 + zmax)


def half_precision_reduction(dtype: torch.dtype) -> bool:
    """Whether cuBLAS may accumulate a `dtype` GEMM in that half precision (split-K reductions)."""
    matmul = torch.backends.cuda.matmul
    if dtype == torch.bfloat16:
        return bool(matmul.allow_bf16_reduced_precision_reduction)
    return bool(matmul.allow_fp16_reduced_precision_reduction)


@torch.no_grad()
def head_lower_bound(pm: PrunableModel, normed: torch.Tensor, ids: torch.Tensor, bw: BoundWindow,
                     cost: Cost | None = None) -> float:
    """A lower bound on the summed next-token NLL `head_nll` computes for a (1, T) window,
    from the logits of `bw.columns` only.

    normed: the final-normed last state (1, T, H). Per token with target y in S = the
    columns: NLL = LSE_V(g(z)) - g(z_y) >= LSE_S(g(z)) - g(z_y), since LSE over a subset of
    the same numbers is smaller (every exp term is positive). g is what `head_nll` applies to
    each logit on its own: identity, or softcapping c tanh(z / c); being applied column-wise,
    it gives the S columns exactly the values they have among all V, so the subset inequality
    holds for the capped logits too. The logits are computed in float64 from the head's own
    weights, and `rounding_allowance` is taken off each token; an NLL is never negative, so
    each token's bound is clipped at 0.
    """
    h = normed[0, :-1].to(bw.weight.device)  # the head's device (a model split over devices)
    t = h.shape[0]
    if t == 0:
        return 0.0
    labels = ids[0, 1:].to(h.device)
    z = h.double() @ bw.weight.T
    if bw.bias is not None:
        z = z + bw.bias
    allowance = rounding_allowance(pm, h, z, bw)
    softcap = getattr(pm.decoder_config, "final_logit_softcapping", None)
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    target = z.gather(1, torch.searchsorted(bw.columns, labels)[:, None])[:, 0]
    lower = (torch.logsumexp(z, dim=1) - target - allowance).clamp_min(0.0)
    if cost is not None:
        cost.add_bound(pm, t * bw.columns.numel())
    return lower.sum().item()


# ---------------------------------------------------------------------------- scoring candidates


@torch.no_grad()
def _add_batch_nll(pm: PrunableModel, hidden: torch.Tensor, ids: torch.Tensor, s: Score, bound: float | None,
                   cost: Cost, last_batch: bool = False, *, normed: bool = False,
                   mass: torch.Tensor | None = None, ahead: Sequence[float] | None = None) -> None:
    """Add a (B, T) batch of windows' NLL to `s`, row by row, stopping once `bound` is exceeded.

    `ahead[r]`: a certified lower bound on what the windows after row r add (the head
    bound's), counted against `bound` with the exact NLL so far. A candidate over the bound is
    `stopped` (its exact NLL alone is over) or `bounded` (with `ahead`) only where work was
    cut (a chunk, a row or a window left); one that finished its last window stays `done`,
    with its full NLL, and simply loses. The head stops between chunks once the rows' running
    sums exceed the bound (then every row is partial); otherwise the rows are added in order
    and the ones after the candidate went over the bound are dropped, so a candidate's record
    is what one window at a time would record, except that a stop inside a batch of several
    windows is seen at the end of the row (or, between chunks, of the batch) that crossed it.
    """
    b, n = ids.shape[0], ids.shape[1] - 1
    ahead = list(ahead) if ahead is not None else [0.0] * b
    nlls, done = head_nll(pm, hidden, ids, cost, normed=normed, bound=bound, before=s.nll_sum + ahead[-1], mass=mass)
    if done < n:  # cut between head chunks: every row is partial
        s.nll_sum += nlls[0] if b == 1 else math.fsum(nlls)
        s.tokens += done * b
        _check_bound(s, bound, ahead[-1], cut=True)
        return
    for r, nll in enumerate(nlls):
        s.nll_sum += nll
        s.tokens += done
        s.windows_done += 1
        _check_bound(s, bound, ahead[r], cut=not (last_batch and r == b - 1))
        if s.status != "done":
            return


def _check_bound(s: Score, bound: float | None, ahead: float, cut: bool) -> None:
    """Mark `s` nonfinite, or stopped / bounded when it is over `bound` and work was cut."""
    if not math.isfinite(s.nll_sum):
        s.status = "nonfinite"
    elif bound is not None and s.nll_sum + ahead > bound and cut:
        if s.nll_sum > bound:
            s.status = "stopped"
        else:
            s.status, s.lower_bound = "bounded", s.nll_sum + ahead


def _suffix_states(pm: PrunableModel, ctx: WindowContext, blocks: Collection[str], removed: Collection[str],
                   cost: Cost) -> Iterator[tuple[str, torch.Tensor]]:
    """(b, last state of the model without b) for each b of `blocks`, walking the blocks once:
    at b the running state is the state before b (removing b changes nothing before it), so
    only the blocks after b run from there (prefix reuse)."""
    if not blocks:
        return
    last = max(block_index(b) for b in blocks)
    for name, h in walk(pm, ctx, ctx.hidden, cost, skip=removed):
        if name is None or block_index(name) > last:
            break
        if name in blocks:
            yield name, run_blocks(pm, ctx, h, cost, start=block_index(name) + 1, skip=removed)


def _check_candidates(pm: PrunableModel, scores: Iterable[Score]) -> None:
    removed = set(pm.removed)
    for s in scores:
        if s.block not in pm.names or s.block in removed:
            raise ValueError(f"candidate {s.block} is not a remaining block of the model")


@torch.no_grad()
def _score_windows(pm: PrunableModel, windows: Iterable[torch.Tensor], scores: Sequence[Score], bound: float | None,
                   cost: Cost, on_progress: Callable[[int], None] | None = None,
                   masses: list[torch.Tensor] | None = None, batch: int = 1) -> None:
    """Accumulate each window's NLL into every live (`done`) score, walking the blocks once per
    batch of `batch` windows (`_suffix_states`). With `masses` (one score), each window's column
    mass is appended to it (`head_nll(mass=...)`)."""
    removed = set(pm.removed)
    _check_candidates(pm, scores)
    windows = list(windows)
    groups = window_groups(windows, batch)
    for group in groups:
        alive = {s.block: s for s in scores if s.status == "done"}
        if not alive:
            break
        ids = stack_windows(pm, windows, group)
        ctx = capture_window(pm, ids)
        cost.windows += len(group)
        mass = None
        if masses is not None:
            weight = get_path(pm.model, pm.adapter.lm_head).weight
            mass = torch.zeros(len(group), weight.shape[0], device=weight.device)
            masses.extend(mass.unbind(0))
        for name, x in _suffix_states(pm, ctx, alive, removed, cost):
            _add_batch_nll(pm, x, ids, alive[name], bound, cost, last_batch=group is groups[-1], mass=mass)
            del x
            if on_progress:
                on_progress(len(group))
        del ctx


@torch.no_grad()
def _score_bounded(pm: PrunableModel, windows: Sequence[torch.Tensor], scores: Sequence[Score], bound: float,
                   columns: Sequence[Sequence[torch.Tensor]], cost: Cost,
                   on_progress: Callable[[int], None] | None = None, first: dict[str, torch.Tensor] | None = None,
                   batch: int = 1) -> None:
    """`_score_windows` with `bound`, cutting with the head bound first, `batch` windows per walk.

    columns[s][i]: the bound's columns on window i at stage s (`bound_stages`; each stage's
    hold the last's). A candidate is `bounded` -- it cannot win -- as soon as its exact NLL
    before these windows plus its per-window lower bounds exceeds `bound`.

    Pass 1 walks the windows once and adds each live candidate's stage-0 `head_lower_bound`.
    `first`: final-normed states on the first window already computed (`_seed_by_bound`), used
    instead of running those blocks again. The survivors' states are kept (up to
    `BOUND_CACHE_BYTES`). Each later stage recomputes the survivors' bounds from their kept
    states with more columns (the larger of two lower bounds is one too). Pass 2 scores the
    survivors with the full head window by window, as `_score_windows` would, from the kept
    states or by running their blocks again: the same tensors, the same sums. Each window's
    exact NLL replaces its lower bound, and a survivor is cut as soon as its exact NLL so far
    plus the lower bounds of the windows ahead exceeds `bound`.
    """
    head = bound_head(pm)
    removed = set(pm.removed)
    _check_candidates(pm, scores)
    live = {s.block: s for s in scores if s.status == "done"}
    window_lower: dict[str, list[float]] = {b: [] for b in live}  # the head bound per window
    kept: dict[tuple[str, int], torch.Tensor] = {}
    kept_bytes = 0

    def lower(name: str) -> float:
        return live[name].nll_sum + sum(window_lower[name])

    def cut(name: str) -> None:
        nonlocal kept_bytes
        live[name].status, live[name].lower_bound = "bounded", lower(name)
        del live[name]
        for j in range(len(windows)):
            gone = kept.pop((name, j), None)
            kept_bytes -= 0 if gone is None else gone.numel() * gone.element_size()

    def row(states: torch.Tensor, r: int) -> torch.Tensor:
        return states if states.shape[0] == 1 else states[r : r + 1].clone()  # a kept row frees its batch

    # the first window alone where `first` holds its states, so those are not run again
    groups = ([range(0, 1)] + window_groups(windows, batch, 1)) if first else window_groups(windows, batch)
    for group in groups:
        if not live:
            break
        ids = stack_windows(pm, windows, group)
        given = (first or {}) if group.start == 0 else {}
        todo = [b for b in live if b not in given]
        bws = [BoundWindow.of(head, columns[0][i]) for i in group]
        for name, normed in chain(((b, given.pop(b)) for b in list(live) if b in given),
                                  _normed_states(pm, ids, todo, removed, cost)):
            for r, i in enumerate(group):
                x = row(normed, r)
                window_lower[name].append(head_lower_bound(pm, x, ids[r : r + 1], bws[r], cost))
                if lower(name) > bound:
                    cut(name)
                    break
                if kept_bytes + x.numel() * x.element_size() <= BOUND_CACHE_BYTES:
                    kept[name, i] = x
                    kept_bytes += x.numel() * x.element_size()
            del normed
            if on_progress:
                on_progress(len(group))
        del bws
    for stage in columns[1:]:
        for i, ids in enumerate(window_batches(pm, windows)):
            names = [b for b in live if (b, i) in kept]
            bw = BoundWindow.of(head, stage[i]) if names else None
            for name in names:
                window_lower[name][i] = max(window_lower[name][i], head_lower_bound(pm, kept[name, i], ids, bw, cost))
                if lower(name) > bound:
                    cut(name)
            del bw
    groups = window_groups(windows, batch)
    for group in groups:
        alive = {b: s for b, s in live.items() if s.status == "done"}
        if not alive:
            break
        ids = stack_windows(pm, windows, group)
        for name, normed in _normed_states(pm, ids, [b for b in alive if any((b, i) not in kept for i in group)],
                                           removed, cost):
            for r, i in enumerate(group):
                kept[name, i] = row(normed, r)
        for name, s in alive.items():
            rows = [kept.pop((name, i)) for i in group]
            _add_batch_nll(pm, rows[0] if len(rows) == 1 else torch.cat(rows), ids, s, bound, cost,
                           last_batch=group is groups[-1], normed=True,
                           ahead=[sum(window_lower[name][i + 1:]) for i in group])
            del rows
            if s.status != "done":
                for j in range(group.stop, len(windows)):
                    kept.pop((name, j), None)
    kept.clear()


def _normed_states(pm: PrunableModel, ids: torch.Tensor, blocks: Sequence[str], removed: Collection[str],
                   cost: Cost) -> Iterator[tuple[str, torch.Tensor]]:
    """(b, final-normed last state without b) for each b of `blocks` on a (B, T) batch."""
    if not blocks:
        return
    final_norm = get_path(pm.model, pm.adapter.final_norm)
    ctx = capture_window(pm, ids)
    cost.windows += ids.shape[0]
    for name, x in _suffix_states(pm, ctx, blocks, removed, cost):
        yield name, final_norm(x)


@torch.no_grad()
def _seed_by_bound(pm: PrunableModel, window: torch.Tensor, candidates: Sequence[Score], columns: int,
                   cost: Cost, states: dict[str, torch.Tensor]) -> str | None:
    """A seed without scoring every candidate's head: the candidate with the lowest head bound
    on `window`, from columns chosen by the current model's logits there (any seed is exact;
    a good one cuts more). The candidates' final-normed states there go into `states` (up to
    `BOUND_CACHE_BYTES`), for `_score_bounded` to reuse."""
    removed = set(pm.removed)
    _check_candidates(pm, candidates)
    live = {s.block: s for s in candidates if s.status == "done"}
    if not live:
        return None
    (ids,) = window_batches(pm, [window])
    ctx = capture_window(pm, ids)
    cost.windows += 1
    weight = get_path(pm.model, pm.adapter.lm_head).weight
    mass = torch.zeros(weight.shape[0], device=weight.device)
    head_nll(pm, run_blocks(pm, ctx, ctx.hidden, cost, skip=removed), ids, cost, mass=mass)
    bw = BoundWindow.of(bound_head(pm), bound_columns(mass, ids, columns))
    final_norm = get_path(pm.model, pm.adapter.final_norm)
    lower = {}
    kept_bytes = 0
    for name, x in _suffix_states(pm, ctx, list(live), removed, cost):
        normed = final_norm(x)
        del x
        value = live[name].nll_sum + head_lower_bound(pm, normed, ids, bw, cost)
        if math.isfinite(value):
            lower[name] = value
        if kept_bytes + normed.numel() * normed.element_size() <= BOUND_CACHE_BYTES:
            states[name] = normed
            kept_bytes += normed.numel() * normed.element_size()
    return min(lower, key=lambda b: (lower[b], tie_order(b))) if lower else None


@torch.no_grad()
def score_candidates(
    pm: PrunableModel,
    windows: Sequence[torch.Tensor],
    candidates: Sequence[str],
    *,
    bound: float | None = None,
    cost: Cost | None = None,
    on_progress: Callable[[int], None] | None = None,
    batch: int = 1,
) -> dict[str, Score]:
    """NLL over all windows of the current model with each candidate additionally removed.

    Windows are visited in order, `batch` to a forward, so sums are bit-reproducible and
    independent of which other candidates are scored alongside. With `bound`, a candidate is stopped (status
    "stopped") as soon as its running NLL exceeds it, between windows or head chunks (NLL
    only grows, so it cannot finish below the bound); its partial NLL is kept.
    """
    cost = cost if cost is not None else Cost()
    scores = {c: Score(c) for c in candidates}
    _score_windows(pm, windows, list(scores.values()), bound, cost, on_progress, batch=batch)
    return scores


@dataclass
class ExactResult:
    """Scores of an exact (optionally early-stopped) evaluation, and how it was bounded."""

    scores: dict[str, Score]
    early_stop: bool
    seed: str | None = None  # the candidate scored first; its total is the bound
    seed_from: str | None = None  # "previous step" | "first window" | "head bound" | "screen"
    bound: float | None = None
    head_bound: int = 0  # head-bound columns per window (0: the bound was not used)

    def info(self) -> dict:
        return {"early_stop": self.early_stop, "seed": self.seed, "seed_from": self.seed_from, "bound": self.bound,
                "head_bound_columns": self.head_bound}


def _best(scores: Iterable[Score]) -> Score | None:
    done = [s for s in scores if s.status == "done" and math.isfinite(s.nll_sum)]
    return min(done, key=lambda s: (s.nll_sum, tie_order(s.block))) if done else None


def bound_stages(pm: PrunableModel, columns: int) -> list[int]:
    """Columns per window at each stage of the head bound: N for every candidate, then
    `BOUND_STAGE_FACTOR` x N for those it did not cut, where that is still under half the
    vocabulary. On Gemma 3 270M the second stage costs ~5% of a head pass per survivor and
    cuts most candidates the first one leaves."""
    wide = BOUND_STAGE_FACTOR * columns
    return [columns, wide] if 2 * wide < bound_head(pm).weight.shape[0] else [columns]


def usable_head_bound(pm: PrunableModel, columns: int) -> int:
    """`columns` if the head bound can serve this model and is cheaper than the head, else 0
    (also 0 when labels are ignored and windows reweighted: the bound covers plain sums)."""
    head = bound_head(pm)
    if columns <= 0 or head is None or 2 * columns >= head.weight.shape[0] or pm.ignore_index is not None:
        return 0
    return columns


@torch.no_grad()
def score_exact(
    pm: PrunableModel,
    windows: Sequence[torch.Tensor],
    candidates: Sequence[str],
    *,
    prefer: Sequence[str] = (),
    early_stop: bool = True,
    head_bound: int = HEAD_BOUND_COLUMNS,
    owned: Sequence[str] | None = None,
    start: dict[str, Score] | None = None,
    seed_from: str = "previous step",
    cost: Cost | None = None,
    on_progress: Callable[[int], None] | None = None,
    batch: int = 1,
) -> ExactResult:
    """Exact scores of `candidates` with early stopping: the winner and every finished NLL
    are those of plain scoring; losers may be stopped with a partial NLL.

    1. The first window is scored for every candidate wanted (no bound is known yet; a
       single window rarely exceeds a total over all windows anyway).
    2. The seed -- the first of `prefer` (the previous step's finished candidates) among `candidates`,
       else the best candidate on the first window -- is scored on the remaining windows;
       its total is the bound.
    3. The other candidates are scored on the remaining windows with that bound; with
       `head_bound` N > 0, the head bound first cuts those that cannot win (`_score_bounded`,
       columns from the seed's logits of step 2). It is off where `usable_head_bound` says
       it cannot pay (a vocabulary below 2N, a head that is not a plain linear layer).
    With the head bound, step 1 is skipped: without a preference the seed is the candidate
    with the lowest head bound on the first window (`_seed_by_bound`); it is scored on every
    window and the others are bounded from the first window on.

    owned: the candidates whose scores are wanted (a shard). The seed is scored in every
      shard, and without a preference every candidate's first window too, so that every
      shard has the same bound and records exactly the unsharded scores of its candidates.
    start: scores already accumulated over earlier windows (not in `windows`), continued
      here (the screened step's confirmation).
    batch: windows per forward (`window_groups`). A finished score is the same sum in the same
      order for any batch; its terms may differ in the last bits where the batch shape changes
      the kernels' rounding. Where a loser is stopped, and so its partial record, can move
      with the batch (`_add_batch_nll`); the seed's first window and the head bound's seed
      choice run one window at a time.
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
        _score_windows(pm, windows, live(owned), None, cost, on_progress, batch=batch)
        return result
    seed = next((c for c in prefer if c in scores and scores[c].status == "done"), None)
    columns = usable_head_bound(pm, head_bound)
    first_states: dict[str, torch.Tensor] = {}  # final-normed states on the first window, from `_seed_by_bound`
    if seed is None and columns and windows:
        seed, seed_from = (_seed_by_bound(pm, windows[0], [scores[c] for c in candidates], columns, cost, first_states),
                           "head bound")
    if seed is not None and columns:  # the seed over every window, then the others bounded from the first
        rest = list(windows)
    else:
        first_states.clear()  # they are of windows[0], which the others are not bounded on here
        first = candidates if seed is None else [c for c in candidates if c in set(owned) | {seed}]
        _score_windows(pm, windows[:1], live(first), None, cost, on_progress)
        rest = list(windows[1:])
        if seed is None:
            best = _best(scores[c] for c in candidates)
            seed, seed_from = (best.block if best else None), "first window"
        elif scores[seed].status != "done":
            seed = None  # the preferred seed went non-finite; shards do not know the others' first window
    if seed is None:  # nothing finite bounds the others
        _score_windows(pm, rest, live(owned), None, cost, on_progress, batch=batch)
        return result
    masses: list[torch.Tensor] | None = [] if columns and rest else None
    _score_windows(pm, rest, [scores[seed]], None, cost, on_progress, masses=masses, batch=batch)
    total = scores[seed]
    bound = total.nll_sum if total.status == "done" else None
    result.seed, result.seed_from, result.bound = seed, seed_from, bound
    others = [c for c in owned if c != seed]
    if rest and bound is not None:  # beyond the bound already on the first window
        for s in live(others):
            if s.nll_sum > bound:
                s.status = "stopped"
    if masses is not None and bound is not None:
        chosen = [[bound_columns(m, x, n) for m, x in zip(masses, window_batches(pm, rest))]
                  for n in bound_stages(pm, columns)]
        result.head_bound = columns
        _score_bounded(pm, rest, live(others), bound, chosen, cost, on_progress, first_states, batch=batch)
        return result
    _score_windows(pm, rest, live(others), bound, cost, on_progress, batch=batch)
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

