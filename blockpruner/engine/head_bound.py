"""The certified LM-head bound: a lower bound on a candidate's NLL from a few head columns.

On a large vocabulary the LM head dominates: Gemma 3's is ~63% of the FLOPs. For a token with
logits z and target y, NLL = LSE(z) - z_y, and for any column set S holding y,
LSE_S(z) <= LSE(z), so LSE_S(z) - z_y is a lower bound on the NLL from |S| columns only
(`head_lower_bound`), less an allowance for the float rounding of the full head
(`rounding_allowance`). Per window, S is the N columns with the most softmax mass summed over
the window's positions under a seed candidate, plus the window's targets (`bound_columns`).
`search.exact` uses it to cut candidates that cannot win without their full head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import get_path
from ..blocks import PrunableModel
from .cost import Cost


BOUND_STAGE_FACTOR = 4  # the second stage's columns, as a multiple of the first's
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
