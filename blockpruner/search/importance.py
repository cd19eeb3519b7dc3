"""Importance metrics of the baselines: BI, relative magnitude, JS divergence, and the
calibration perplexity of removing a whole layer.

Every metric is computed from the same residual-stream states the search scores: per
calibration window, `engine.forward.capture_window` records what the layers receive and
`engine.forward.prefix_states` runs the model *as it stands* (removed blocks skipped) once,
keeping the state before every block (a removed block's output repeats its input). A
*unit* is a block (`attn.i`, `mlp.i`) or a whole layer (`layer.i` = both of its blocks);
its input x and output y are

    block b:  x = states[index(b)],  y = states[index(b) + 1]
    layer i:  x = states[2i],        y = states[2i + 2]

and per token t (in float64 from the model's states, whatever its dtype; a small BI is a
difference from 1 that fp32 would round away):

    BI_t = 1 - cos(x_t, y_t)                       Block Influence (ShortGPT, Men et al. 2024)
    RM_t = ||y_t - x_t|| / ||y_t||                 relative magnitude ||f(x)|| / ||x + f(x)||
                                                   (Samragh et al. 2023), f the residual update

Both are averaged over every token of every window (token-weighted). The states are the raw
residual stream: the last layer's output is taken before the final norm (implementations
built on `output_hidden_states` compare against the final-normed state there instead).

JS (FinerCut-style, BlockPruner Appendix D): the Jensen-Shannon divergence, natural log,
between the next-token distributions of the current model minus a candidate block and of
the DENSE model, averaged over every position of every window. Candidates reuse the prefix
states (removing block b changes nothing before b); the dense model's final states are one
extra pass per window, and the LM head runs in chunks for both, as for perplexity, with the
log-softmax and divergence in float64 (JS of nearby distributions is a small difference).

All sums are float64 and visited in window order, so values are bit-reproducible for a
given device and dtype. A unit whose value is not finite gets status `nonfinite` and is
never chosen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..adapters import get_path
from ..blocks import PrunableModel, block_index, parse_block, tie_order
from ..errors import UserError
from ..engine.cost import Cost
from ..engine.forward import (capture_window, head_chunk_tokens, head_nll, perplexity_of, prefix_states, run_blocks,
                              walk, window_batches)

METRICS = ("ppl", "bi", "rm", "js")


# ---------------------------------------------------------------- units


def layer_unit(i: int) -> str:
    return f"layer.{i}"


def unit_blocks(unit: str) -> list[str]:
    """The blocks a unit stands for: `layer.i` -> [attn.i, mlp.i], a block name -> itself."""
    if unit.startswith("layer."):
        tail = unit[len("layer."):]
        if not tail.isdigit():
            raise UserError(f"bad unit name {unit!r}: expected 'layer.<i>', 'attn.<i>' or 'mlp.<i>'")
        return [f"attn.{int(tail)}", f"mlp.{int(tail)}"]
    parse_block(unit)
    return [unit]


def unit_order(unit: str) -> tuple[int, int]:
    """Tie-break key: the search's (attention before MLP, then layer) for blocks; layer index for layers."""
    if unit.startswith("layer."):
        return 0, int(unit[len("layer."):])
    return tie_order(unit)


def all_units(num_layers: int) -> list[str]:
    return [f"{kind}.{i}" for i in range(num_layers) for kind in ("attn", "mlp")] + [layer_unit(i) for i in range(num_layers)]


@dataclass
class UnitScore:
    """One unit's metric: `total` summed over `tokens` (for ppl the NLL over predicted tokens)."""

    unit: str
    metric: str
    total: float = 0.0
    tokens: int = 0
    status: str = "done"  # done | nonfinite

    @property
    def value(self) -> float:
        if self.status != "done" or not self.tokens:
            return math.nan
        return perplexity_of(self.total, self.tokens) if self.metric == "ppl" else self.total / self.tokens

    def add(self, amount: float, tokens: int) -> None:
        self.total += amount
        self.tokens += tokens
        if not math.isfinite(self.total):
            self.status = "nonfinite"

    def as_dict(self) -> dict:
        d = {"block": self.unit, "metric": self.metric, "status": self.status, "value": None, "sum": self.total,
             "tokens": self.tokens}
        if self.status == "done":
            d["value"] = self.value
        if self.metric == "ppl":
            d["ppl"], d["nll_sum"] = d["value"], self.total
        return d


def rank_units(scores: Iterable[UnitScore]) -> list[UnitScore]:
    """Finite units lowest first (sum over the shared tokens, then the tie order), then the rest."""
    scores = list(scores)
    done = sorted((s for s in scores if s.status == "done"), key=lambda s: (s.total, unit_order(s.unit)))
    rest = sorted((s for s in scores if s.status != "done"), key=lambda s: unit_order(s.unit))
    return done + rest


# ---------------------------------------------------------------- BI and RM


@torch.no_grad()
def residual_metrics(pm: PrunableModel, windows: Sequence[torch.Tensor], units: Sequence[str] | None = None,
                     cost: Cost | None = None) -> dict[str, dict[str, UnitScore]]:
    """BI and RM of each unit (default: every block and every layer) of the model as it stands.

    Returns {"bi": {unit: UnitScore}, "rm": {unit: UnitScore}}; one forward pass per window.
    """
    cost = cost if cost is not None else Cost()
    units = list(units) if units is not None else all_units(pm.num_layers)
    spans = {}
    for u in units:
        blocks = unit_blocks(u)
        pm.check(blocks)
        idx = [block_index(b) for b in blocks]
        spans[u] = (min(idx), max(idx) + 1)
    out = {m: {u: UnitScore(u, m) for u in units} for m in ("bi", "rm")}
    for ids in window_batches(pm, windows):
        ctx = capture_window(pm, ids)
        states = prefix_states(pm, ctx, cost, skip=set(pm.removed))
        cost.windows += 1
        n = ids.shape[1]
        for u, (a, b) in spans.items():
            x = states[a].double()
            y = states[b].to(x.device).double()
            cos = F.cosine_similarity(x, y, dim=-1, eps=1e-12)
            rm = (y - x).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-30)
            out["bi"][u].add((1.0 - cos).double().sum().item(), n)
            out["rm"][u].add(rm.double().sum().item(), n)
        del states, ctx
    return out


# ---------------------------------------------------------------- JS divergence


def _logits(pm: PrunableModel, normed: torch.Tensor) -> torch.Tensor:
    logits = get_path(pm.model, pm.adapter.lm_head)(normed).double()
    softcap = getattr(pm.decoder_config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def js_sum(pm: PrunableModel, hidden_a: torch.Tensor, hidden_b: torch.Tensor) -> float:
    """Sum over positions of JS(P_a || P_b), P the next-token distributions of two final
    (pre-norm) hidden states of shape (1, T, d); LM head in chunks, float64, natural log."""
    norm = get_path(pm.model, pm.adapter.final_norm)
    a, b = norm(hidden_a), norm(hidden_b.to(hidden_a.device))
    head = get_path(pm.model, pm.adapter.lm_head)
    step = max(1, head_chunk_tokens(head.weight.shape[0]) // 8)  # float64, two distributions
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    log2 = math.log(2.0)
    for s in range(0, a.shape[1], step):
        lp = torch.log_softmax(_logits(pm, a[:, s : s + step]), dim=-1)
        lq = torch.log_softmax(_logits(pm, b[:, s : s + step]), dim=-1)
        lm = torch.logaddexp(lp, lq) - log2
        # kl_div(input=log m, target=log p, log_target) = p (log p - log m)
        js = 0.5 * (F.kl_div(lm, lp, reduction="none", log_target=True).sum(-1)
                    + F.kl_div(lm, lq, reduction="none", log_target=True).sum(-1))
        total += js.sum()
    return total.item()


@torch.no_grad()
def js_scores(pm: PrunableModel, windows: Sequence[torch.Tensor], candidates: Sequence[str],
              cost: Cost | None = None) -> dict[str, UnitScore]:
    """Mean JS divergence (per position) between the dense model and the current model minus each candidate."""
    cost = cost if cost is not None else Cost()
    candidates = pm.check(candidates)
    removed = set(pm.removed)
    scores = {c: UnitScore(c, "js") for c in candidates}
    for ids in window_batches(pm, windows):
        ctx = capture_window(pm, ids)
        states = prefix_states(pm, ctx, cost, skip=set(pm.removed))
        cost.windows += 1
        dense = states[-1] if not removed else run_blocks(pm, ctx, ctx.hidden, cost)
        n = ids.shape[1]
        for c in candidates:
            i = block_index(c)
            h = run_blocks(pm, ctx, states[i], cost, start=i + 1, skip=removed | {c})
            scores[c].add(js_sum(pm, h, dense), n)
            cost.add_head(pm, 2 * n)
        del states, ctx, dense
    return scores


@torch.no_grad()
def js_to_dense(pm: PrunableModel, windows: Sequence[torch.Tensor], cost: Cost | None = None) -> UnitScore:
    """Mean JS divergence between the model as it stands and the dense model."""
    cost = cost if cost is not None else Cost()
    score = UnitScore("current", "js")
    for ids in window_batches(pm, windows):
        ctx = capture_window(pm, ids)
        current = run_blocks(pm, ctx, ctx.hidden, cost, skip=set(pm.removed))
        dense = run_blocks(pm, ctx, ctx.hidden, cost)
        score.add(js_sum(pm, current, dense), ids.shape[1])
        cost.add_head(pm, 2 * ids.shape[1])
        cost.windows += 1
    return score


# ---------------------------------------------------------------- perplexity of multi-block units


@torch.no_grad()
def unit_nll(pm: PrunableModel, windows: Sequence[torch.Tensor], units: Sequence[str],
             cost: Cost | None = None) -> dict[str, UnitScore]:
    """Calibration NLL of the current model with each unit's blocks additionally removed.

    The multi-block counterpart of `exact.score_candidates` (same prefix reuse: a unit's
    run starts from the state before its first block), used for whole-layer candidates.
    """
    cost = cost if cost is not None else Cost()
    removed = set(pm.removed)
    blocks = {u: pm.check(unit_blocks(u)) for u in units}
    scores = {u: UnitScore(u, "ppl") for u in units}
    for ids in window_batches(pm, windows):
        ctx = capture_window(pm, ids)
        states = prefix_states(pm, ctx, cost, skip=set(pm.removed))
        cost.windows += 1
        for u, bs in blocks.items():
            start = min(block_index(b) for b in bs)
            h = run_blocks(pm, ctx, states[start], cost, start=start, skip=removed | set(bs))
            (nll,), tokens = head_nll(pm, h, ids, cost)
            scores[u].add(nll, tokens)
        del states, ctx
    return scores


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
