"""Fit a closed-form correction for removed blocks from the dense model's block outputs.

A run of consecutive removed blocks (in forward order) is compensated at the nearest kept
block before it, its *anchor*. Over the calibration windows of the dense model, with

    X = the anchor's contribution to the residual stream (its branch output),
    Y = X + the contributions of the removed blocks of the run,

we fit a map f with f(X) ~ Y and later let the anchor output f(X): the anchor then also
carries, on average, what the removed blocks used to add. Two closed forms, both ridge
regressions pulled toward the identity (no correction) with strength lam = alpha * trace(XtX) / d:

- `scale`: one factor per channel, t = (sum x*y + lam) / (sum x^2 + lam);
- `linear`: a d x d map A = (XtX + lam I)^-1 (XtY + lam I), applied as y = x A.

Only sums are kept (float64), never the activations, so memory is O(d) or O(d^2) per run
whatever the number of windows. The fit is judged on held-out data only: a map that lowers
the calibration residual can still raise held-out perplexity (see the notes on
compensation), which is why it is pulled toward the identity.

A run that starts the layer stack (attn.0 removed) has no anchor; it is skipped and the
skip is recorded.

Each correction is fitted on its own; `guard.py` keeps only those that help together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..adapters import get_path
from ..blocks import PrunableModel, block_index, parse_block
from ..errors import UserError

METHODS = ("scale", "linear")
# ridge strength alpha per method (lam = alpha * trace(XtX) / d), from the measurements:
# a per-channel scale needs little pull, a full d x d map a strong one or it overfits
DEFAULT_ALPHA = {"scale": 0.1, "linear": 10.0}


def check_method(method: str, alpha: float | None = None) -> float:
    """The method's alpha (the default when None), or a one-line error."""
    if method not in METHODS:
        raise UserError(f"unknown compensation method {method!r}; use one of: {', '.join(METHODS)}")
    alpha = DEFAULT_ALPHA[method] if alpha is None else float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise UserError(f"--alpha must be a finite number >= 0, got {alpha}")
    return alpha


@dataclass(frozen=True)
class Target:
    """A run of consecutive removed blocks and the kept block that absorbs it (None: none precedes it)."""

    anchor: str | None
    removed: tuple[str, ...]


def plan_targets(names: Sequence[str], removed: Iterable[str]) -> list[Target]:
    """Maximal runs of removed blocks in forward order, each with the kept block just before it."""
    gone = set(removed)
    unknown = gone - set(names)
    if unknown:
        raise UserError(f"blocks {sorted(unknown)} are not blocks of this model")
    targets: list[Target] = []
    run: list[str] = []
    anchor: str | None = None
    for name in names:
        if name in gone:
            run.append(name)
            continue
        if run:
            targets.append(Target(anchor, tuple(run)))
            run = []
        anchor = name
    if run:
        targets.append(Target(anchor, tuple(run)))
    return targets


@dataclass
class Stats:
    """Float64 sums over calibration tokens for one target.

    scale: xx, xy, yy are per-channel sums (d,); linear: xx, xy are XtX, XtY (d, d) and yy is
    the per-channel sum of y^2 (d,) (only its total is needed).
    """

    xx: torch.Tensor
    xy: torch.Tensor
    yy: torch.Tensor
    tokens: int = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, full: bool) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).double()
        if full:
            self.xx += x.T @ x
            self.xy += x.T @ y
        else:
            self.xx += (x * x).sum(0)
            self.xy += (x * y).sum(0)
        self.yy += (y * y).sum(0)
        self.tokens += x.shape[0]

    def trace_xx(self) -> float:
        return float(self.xx.diagonal().sum() if self.xx.dim() == 2 else self.xx.sum())

    def trace_xy(self) -> float:
        return float(self.xy.diagonal().sum() if self.xy.dim() == 2 else self.xy.sum())


@dataclass
class Correction:
    """The fitted correction of one target: `factor` is t (d,) for `scale`, A (d, d) for `linear`
    (y = x A), None for a skipped target; `summary` is what the manifest records."""

    target: Target
    method: str
    factor: torch.Tensor | None
    summary: dict = field(default_factory=dict)


def contribution_module(pm: PrunableModel, name: str) -> torch.nn.Module:
    """The last module of a block's branch: its output is the block's contribution to the residual
    stream (the residual dropout, else the post-norm, else the attention / MLP module)."""
    kind, i = parse_block(name)
    spec = pm.adapter.branch(kind)
    return getattr(pm.layers[i], spec.dropout or spec.post_norm or spec.module)


def first_output(out):
    """An attention module returns (output, weights[, cache]); the contribution is the first."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_contributions(pm: PrunableModel, ids: torch.Tensor, blocks: Iterable[str]) -> dict[str, torch.Tensor]:
    """Each named block's contribution over one (1, T) window, from one forward of the model as it stands."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name in blocks:
        def hook(module, args, out, name=name):
            got[name] = first_output(out).detach()
        handles.append(contribution_module(pm, name).register_forward_hook(hook))
    try:
        get_path(pm.model, pm.adapter.decoder)(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


@torch.no_grad()
def collect_stats(pm: PrunableModel, windows: Sequence[torch.Tensor], targets: Sequence[Target],
                  method: str) -> dict[Target, Stats]:
    """Sums over `windows` for each target with an anchor, from the dense model's block outputs."""
    if pm.removed:
        raise UserError("compensation is fitted on the dense model's block outputs; restore the removed blocks first")
    full = method == "linear"
    live = [t for t in targets if t.anchor is not None]
    if not live:
        return {}
    device = next(pm.model.parameters()).device
    d = int(pm.decoder_config.hidden_size)
    shape = (d, d) if full else (d,)
    stats = {t: Stats(torch.zeros(shape, dtype=torch.float64, device=device),
                      torch.zeros(shape, dtype=torch.float64, device=device),
                      torch.zeros(d, dtype=torch.float64, device=device)) for t in live}
    wanted = sorted({b for t in live for b in (t.anchor, *t.removed)}, key=block_index)
    for ids in windows:
        c = block_contributions(pm, ids.to(device).unsqueeze(0), wanted)
        for t in live:
            x = c[t.anchor].double()
            y = x + sum(c[b].double() for b in t.removed)
            stats[t].add(x, y, full)
        del c
    return stats


def solve(target: Target, stats: Stats, method: str, alpha: float) -> Correction:
    """The ridge solution toward the identity, and the calibration residual before / after it."""
    d = stats.yy.shape[0]
    lam = alpha * stats.trace_xx() / d
    sum_yy = float(stats.yy.sum())
    before = sum_yy - 2 * stats.trace_xy() + stats.trace_xx()  # sum ||y - x||^2: the anchor left as is
    if method == "scale":
        factor = (stats.xy + lam) / (stats.xx + lam)
        after = sum_yy - 2 * float((factor * stats.xy).sum()) + float((factor * factor * stats.xx).sum())
        shape = {"factor_min": float(factor.min()), "factor_mean": float(factor.mean()), "factor_max": float(factor.max())}
    else:
        eye = torch.eye(d, dtype=torch.float64, device=stats.xx.device)
        factor = torch.linalg.solve(stats.xx + lam * eye, stats.xy + lam * eye)
        after = sum_yy - 2 * float((factor * stats.xy).sum()) + float((factor * (stats.xx @ factor)).sum())
        shape = {"distance_from_identity": float(torch.linalg.matrix_norm(factor - eye) / math.sqrt(d))}
    n = max(stats.tokens, 1)
    summary = {
        "anchor": target.anchor, "removed": list(target.removed), "tokens": stats.tokens, "lambda": lam,
        "residual_before": before / n, "residual_after": max(after, 0.0) / n,
        "residual_ratio": max(after, 0.0) / before if before > 0 else None, **shape,
    }
    return Correction(target, method, factor.float().cpu(), summary)


def skipped(target: Target, method: str) -> Correction:
    return Correction(target, method, None, {"anchor": None, "removed": list(target.removed),
                                             "skipped": "no kept block precedes it (the run starts the layer stack)"})


def fit(pm: PrunableModel, windows: Sequence[torch.Tensor], removed: Sequence[str], method: str,
        alpha: float | None = None) -> list[Correction]:
    """Corrections for removing `removed` from the dense model `pm`, fitted on `windows`."""
    alpha = check_method(method, alpha)
    targets = plan_targets(pm.names, removed)
    stats = collect_stats(pm, windows, targets, method)
    return [solve(t, stats[t], method, alpha) if t.anchor is not None else skipped(t, method) for t in targets]
