"""The forward engine: NLL of the model as it stands, or minus one more block, window by window.

For each calibration window (or batch of windows of one length, `window_groups`):

1. the model's own decoder forward builds what its layers receive -- the scaled embeddings,
   attention masks (causal, sliding-window), rotary tables -- with every layer replaced by a
   recorder, so nothing heavy runs (`capture_window`);
2. `walk` runs the current model's remaining blocks in forward order from there, yielding
   the residual state before each block: removing block b changes nothing before b, so a
   candidate's score runs only the blocks after b from that state (prefix reuse);
3. `head_nll` applies the final norm, the LM head (with any logit soft-capping) and the
   cross-entropy exactly as the model's forward, a chunk of positions at a time, summed in
   float64.

Every pass over blocks in the package -- the search, the baselines, the importance metrics,
compression, compensation and the evaluations -- goes through `walk` (or `run_blocks`) and
every NLL through `head_nll`, so all of them see the same residual stream and the same sums.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..adapters import get_path
from ..blocks import PrunableModel, block_index, tie_order
from ..branch import keyword_args
from ..errors import UserError
from .cost import Cost


@dataclass
class WindowContext:
    """What the model's forward hands its decoder layers for one window."""

    hidden: torch.Tensor  # input of layer 0
    layer_kwargs: list[dict]


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
        seen.append(keyword_args(args, kwargs))
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


def rank(scores: dict[str, Score]) -> list[Score]:
    """Finished candidates best first (NLL, then the documented tie order), then the rest."""
    done = sorted((s for s in scores.values() if s.status == "done"), key=lambda s: (s.nll_sum, tie_order(s.block)))
    rest = sorted((s for s in scores.values() if s.status != "done"), key=lambda s: tie_order(s.block))
    return done + rest
