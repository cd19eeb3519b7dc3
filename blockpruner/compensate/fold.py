"""Fold fitted corrections into the anchors' weights, or apply them at run time (hooks).

Where a correction goes, per architecture (read from the adapter table):

- the branch ends in a post-norm (Gemma 2 / 3): its output is norm(z) * (offset + w), so a
  per-channel scale t folds exactly into the weight as (offset + w) * t - offset (offset 1 for
  Gemma's (1 + w) convention). A d x d map does not fold through the normalisation: refused.
- otherwise the branch ends in its output projection (o_proj / down_proj, then an identity
  dropout in eval mode): its rows are mixed, W' = A^T W and b' = A^T b (diag(t) for a scale).

Both are exact: the folded model computes what the unfolded model computes with the correction
applied to the anchor's output (`applied`, which the tests compare against).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..adapters import Adapter
from ..blocks import PrunableModel, parse_block
from ..errors import UserError
from .fit import Correction, contribution_module, first_output

# the output projection of each branch in the architectures without a post-norm
OUTPUT_PROJECTION = {"attn": "o_proj", "mlp": "down_proj"}
# post-norm weight convention: output = norm(z) * (offset + weight)
NORM_OFFSET = {"gemma2": 1.0, "gemma3_text": 1.0, "gemma3": 1.0}


def has_post_norm(adapter: Adapter) -> bool:
    return any(adapter.branch(kind).post_norm for kind in OUTPUT_PROJECTION)


def check_foldable(adapter: Adapter, method: str) -> None:
    """Refuse, before any work, a method that cannot be folded exactly into this architecture."""
    if has_post_norm(adapter):
        if method != "scale":
            raise UserError(f"--method {method} cannot be folded exactly into {adapter.family}: its blocks end in a "
                            "post-norm, through which only a per-channel scale folds; use --method scale")
        if adapter.family not in NORM_OFFSET:
            raise UserError(f"the post-norm weight convention of {adapter.family} is unknown; add it to "
                            "blockpruner/compensate/fold.py:NORM_OFFSET")


def fold_one(pm: PrunableModel, c: Correction) -> dict:
    """Fold one correction into its anchor's weights (in place); returns where it went."""
    kind, i = parse_block(c.target.anchor)
    layer = pm.layers[i]
    spec = pm.adapter.branch(kind)
    if spec.post_norm:
        norm = getattr(layer, spec.post_norm)
        if c.factor.dim() != 1:
            raise UserError(f"a d x d map cannot be folded into the post-norm of {c.target.anchor}")
        offset = NORM_OFFSET[pm.adapter.family]
        w = norm.weight
        w.copy_(((offset + w.double()) * c.factor.double().to(w.device) - offset).to(w.dtype))
        return {"anchor": c.target.anchor, "folded_into": f"{spec.post_norm}.weight"}
    proj = getattr(getattr(layer, spec.module), OUTPUT_PROJECTION[kind], None)
    if not isinstance(proj, torch.nn.Linear):
        raise UserError(f"{c.target.anchor}: no output projection {spec.module}.{OUTPUT_PROJECTION[kind]} to fold into")
    mix = torch.diag(c.factor.double()) if c.factor.dim() == 1 else c.factor.double().T  # W' = A^T W
    mix = mix.to(proj.weight.device)
    proj.weight.copy_((mix @ proj.weight.double()).to(proj.weight.dtype))
    if proj.bias is not None:
        proj.bias.copy_((mix @ proj.bias.double()).to(proj.bias.dtype))
    return {"anchor": c.target.anchor, "folded_into": f"{spec.module}.{OUTPUT_PROJECTION[kind]}"}


@torch.no_grad()
def fold(pm: PrunableModel, corrections: Sequence[Correction]) -> list[dict]:
    """Fold every fitted correction into the model's weights (skipped targets are left alone)."""
    for c in corrections:
        if c.factor is not None:
            check_foldable(pm.adapter, c.method)
    return [fold_one(pm, c) for c in corrections if c.factor is not None]


@contextlib.contextmanager
def applied(pm: PrunableModel, corrections: Sequence[Correction]) -> Iterator[None]:
    """Apply the corrections at run time, to the anchors' outputs (the reference for folding)."""
    handles = []

    def make_hook(factor: torch.Tensor):
        def hook(module, args, out):
            x = first_output(out)
            f = factor.to(x.device, torch.float64)
            y = (x.double() * f if f.dim() == 1 else x.double() @ f).to(x.dtype)
            return (y, *out[1:]) if isinstance(out, tuple) else y
        return hook

    try:
        for c in corrections:
            if c.factor is not None:
                handles.append(contribution_module(pm, c.target.anchor).register_forward_hook(make_hook(c.factor)))
        yield
    finally:
        for h in handles:
            h.remove()
