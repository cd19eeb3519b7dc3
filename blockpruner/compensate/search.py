"""Compensation-aware scoring: each candidate judged with its own correction applied (opt-in).

The plain search scores "the current model minus one more block". Here each candidate c is
scored as the model minus (removed + c) *with the per-channel scale fitted for that set*, so
the search can prefer blocks whose loss a correction recovers.

Fitting is free per candidate: the scale's sums only involve products of dense block
contributions, so one dense pass per window collects every pair's per-channel sum
G[a, b] = sum c_a * c_b (float64, 2L x 2L x d), and any target's sums follow
(X = c_p, Y = c_p + sum over the run: xx = G[p,p], xy = G[p,p] + sum G[p,b]). Scoring is the
cost: the correction changes the anchor before the candidate, so there is no prefix reuse or
early stopping -- every candidate runs all remaining blocks over every window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..blocks import PrunableModel, block_index
from ..errors import UserError
from ..engine.cost import Cost
from ..engine.forward import Score, current_nll
from .fit import Correction, Stats, Target, block_contributions, check_method, plan_targets, solve, skipped
from .fold import applied


def step_scorer(alpha: float):
    """What a compensation-aware search step scores its candidates with (`search_step`'s
    `score_compensated`): pair sums on the dense model, then each candidate with its own
    correction. Returns a function (pm, windows, removed, candidates, cost, on_progress)."""

    def score(pm: PrunableModel, windows: Sequence[torch.Tensor], removed: list[str], candidates: list[str],
              cost: Cost, on_progress: Callable[[int], None] | None = None) -> dict[str, Score]:
        pm.set_removed([])
        gram, tokens = pair_sums(pm, windows, cost)
        pm.set_removed(removed)
        return score_with_compensation(pm, windows, candidates, gram, tokens, alpha, cost, on_progress)

    return score


@torch.no_grad()
def pair_sums(pm: PrunableModel, windows: Sequence[torch.Tensor], cost: Cost | None = None) -> tuple[torch.Tensor, int]:
    """G[a, b] = per-channel sum over tokens of c_a * c_b for all blocks a, b of the dense model
    (one decoder pass per window, counted in `cost`)."""
    if pm.removed:
        raise UserError("pair sums are taken on the dense model's block outputs; restore the removed blocks first")
    device = next(pm.model.parameters()).device
    n, d = len(pm.names), int(pm.decoder_config.hidden_size)
    gram = torch.zeros(n, n, d, dtype=torch.float64, device=device)
    tokens = 0
    for ids in windows:
        c = block_contributions(pm, ids.to(device).unsqueeze(0), pm.names)
        if cost is not None:
            cost.windows += 1
            for name in pm.names:
                cost.add_block(pm, name, ids.numel())
        stack = torch.stack([c[name].reshape(-1, d).double() for name in pm.names])  # (n, T, d)
        gram += torch.einsum("atd,btd->abd", stack, stack)
        tokens += stack.shape[1]
        del c, stack
    return gram, tokens


def scale_from_pairs(gram: torch.Tensor, tokens: int, target: Target, alpha: float) -> Correction:
    """The `scale` correction of one target from the pair sums (same as fitting it directly)."""
    if target.anchor is None:
        return skipped(target, "scale")
    p = block_index(target.anchor)
    run = [block_index(b) for b in target.removed]
    xx = gram[p, p]
    xy = xx + sum(gram[p, b] for b in run)
    both = [p, *run]
    yy = sum(gram[a, b] for a in both for b in both)
    return solve(target, Stats(xx.clone(), xy, yy, tokens), "scale", alpha)


def score_with_compensation(pm: PrunableModel, windows: Sequence[torch.Tensor], candidates: Sequence[str],
                            gram: torch.Tensor, tokens: int, alpha: float | None = None,
                            cost: Cost | None = None, on_progress: Callable[[int], None] | None = None) -> dict[str, Score]:
    """NLL over `windows` of the current model minus each candidate, with the `scale` correction of the
    whole removed set (current removals + candidate) applied at run time."""
    alpha = check_method("scale", alpha)
    cost = cost if cost is not None else Cost()
    removed = pm.removed
    scores = {}
    for c in candidates:
        corrections = [scale_from_pairs(gram, tokens, t, alpha) for t in plan_targets(pm.names, [*removed, c])]
        with pm.without([c]), applied(pm, corrections):
            scores[c] = current_nll(pm, windows, cost)
        scores[c].block = c
        if on_progress:
            on_progress(len(windows))
    return scores
