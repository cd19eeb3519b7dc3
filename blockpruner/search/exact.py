"""Scoring candidates exactly: every remaining block's NLL, or just enough of it to know it loses.

Everything that scores candidates -- the greedy search, the one-shot ablation, the sharded
step, the benchmark, the refinements -- goes through `score_candidates`, `score_exact` or
`score_against` (against a total known already: a refinement's incumbent), on the forward
engine (`engine.forward`): per window (or batch of windows), the current model's blocks are
walked once and each candidate's suffix is run from the state before it (prefix reuse). Only
the running state and one candidate's suffix are alive at a time: memory is one batch's
activations, never the whole calibration set, whatever the number of blocks.

Exact early stopping (`score_exact`). Token NLLs are >= 0, so a running NLL only grows
(float additions of non-negative numbers are monotone too): once a candidate's running NLL
over some windows -- or some head chunks of a window -- exceeds the total of a candidate
that has finished, it cannot finish below it and can never be chosen. We therefore score
the first window for every candidate, then one *seed* candidate over the other windows --
the best finished candidate of the previous step still available, else the best candidate on
the first window -- and then the others, each stopped as soon as its running NLL exceeds
the seed's total. The bound is fixed (it is not tightened as other candidates finish), which
makes every candidate's recorded result a function of that candidate and the seed only: a
step split over shards (each scoring the seed itself) records bit-for-bit the scores of the
unsharded step.

The head bound (`score_exact(head_bound=N)`, maths in `engine.head_bound`). A candidate whose
exact NLL so far plus its lower bounds over the remaining windows exceeds the seed's total
cannot win: it is cut (status "bounded") without its full head; so is a survivor, window by
window, once its exact NLL so far plus the lower bounds of the windows ahead exceeds the
total. The others' final-normed states are kept (within `BOUND_CACHE_BYTES`, else their
blocks are run again) and finished with the full head exactly as without the bound, so every
finished NLL is bit-for-bit the same.

Windows run `batch` at a time where the caller asks (`--window-batch`): the walk, the
suffixes, the head bound's passes and the head then work on a (B, T) batch, and each
window's NLL is still added in window order.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..adapters import get_path
from ..blocks import PrunableModel, block_index, tie_order
from ..engine.cost import Cost
from ..engine.forward import (Score, WindowContext, capture_window, head_nll, run_blocks, stack_windows, walk,
                              window_batches, window_groups)
from ..engine.head_bound import (BoundWindow, bound_columns, bound_head, bound_stages, head_lower_bound,
                                 usable_head_bound)
from . import HEAD_BOUND_COLUMNS
from .journal import NO_JOURNAL, Scope

BOUND_CACHE_BYTES = 1 << 30  # final-normed states kept for the candidates the bound does not cut


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


def _state(s: Score) -> dict:
    """A score as the journal records it: the whole state, so that replaying it is exact."""
    return {"nll_sum": s.nll_sum, "tokens": s.tokens, "status": s.status, "windows": s.windows_done,
            "lower_bound": s.lower_bound}


def _restore(s: Score, d: dict) -> None:
    s.nll_sum, s.tokens, s.status, s.windows_done, s.lower_bound = (d["nll_sum"], d["tokens"], d["status"], d["windows"],
                                                                    d["lower_bound"])


def _columns_record(columns: Sequence[torch.Tensor]) -> list[list[int]]:
    return [c.tolist() for c in columns]


@torch.no_grad()
def _score_windows(pm: PrunableModel, windows: Iterable[torch.Tensor], scores: Sequence[Score], bound: float | None,
                   cost: Cost, on_progress: Callable[..., None] | None = None,
                   mass_stages: Sequence[int] | None = None, columns: list | None = None, batch: int = 1,
                   journal: Scope = NO_JOURNAL.scope("")) -> None:
    """Accumulate each window's NLL into every live (`done`) score, walking the blocks once per
    batch of `batch` windows (`_suffix_states`). With `mass_stages` (one score), each window's
    head-bound columns at each stage (`bound_columns` of its column mass) are appended to
    `columns`. A candidate's batch recorded in `journal` is replayed, not computed."""
    removed = set(pm.removed)
    _check_candidates(pm, scores)
    windows = list(windows)
    groups = window_groups(windows, batch)
    for group in groups:
        alive = {s.block: s for s in scores if s.status == "done"}
        if not alive:
            break
        for name, s in list(alive.items()):
            if (d := journal.get(group.start, name)) is not None:
                _restore(s, d["score"])
                if mass_stages is not None:
                    columns.extend([torch.tensor(c, dtype=torch.long) for c in per_stage] for per_stage in d["columns"])
                del alive[name]
                if on_progress:
                    on_progress(len(group), s, True)
        if not alive:
            continue
        ids = stack_windows(pm, windows, group)
        ctx = capture_window(pm, ids)
        cost.windows += len(group)
        mass = None
        if mass_stages is not None:
            weight = get_path(pm.model, pm.adapter.lm_head).weight
            mass = torch.zeros(len(group), weight.shape[0], device=weight.device)
        for name, x in _suffix_states(pm, ctx, alive, removed, cost):
            s = alive[name]
            _add_batch_nll(pm, x, ids, s, bound, cost, last_batch=group is groups[-1], mass=mass)
            del x
            record = {"score": _state(s)}
            if mass is not None:
                chosen = [[bound_columns(mass[r], ids[r : r + 1], n) for n in mass_stages] for r in range(len(group))]
                columns.extend(chosen)
                record["columns"] = [_columns_record(c) for c in chosen]
            journal.put(group.start, name, record)
            if on_progress:
                on_progress(len(group), s)
        del ctx
        journal.sync()


@torch.no_grad()
def _score_bounded(pm: PrunableModel, windows: Sequence[torch.Tensor], scores: Sequence[Score], bound: float,
                   columns: Sequence[Sequence[torch.Tensor]], cost: Cost,
                   on_progress: Callable[..., None] | None = None, first: dict[str, torch.Tensor] | None = None,
                   batch: int = 1, journal: Scope = NO_JOURNAL.scope("")) -> None:
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

    Resuming from `journal`: which states pass 1 kept is recorded with their sizes, so the
    cache holds what an uninterrupted run holds; a kept state that a replayed unit did not
    compute in this process is computed again when a later stage or pass 2 needs it, from the
    same batch of windows (`restore`), so that it is the same tensor.
    """
    head = bound_head(pm)
    removed = set(pm.removed)
    _check_candidates(pm, scores)
    live = {s.block: s for s in scores if s.status == "done"}
    window_lower: dict[str, list[float]] = {b: [] for b in live}  # the head bound per window
    kept_sizes: dict[tuple[str, int], int] = {}  # the states pass 1 keeps, and their bytes
    kept: dict[tuple[str, int], torch.Tensor] = {}  # those of them in memory
    kept_bytes = 0

    def lower(name: str) -> float:
        return live[name].nll_sum + sum(window_lower[name])

    def drop(name: str) -> None:
        nonlocal kept_bytes
        del live[name]
        for j in range(len(windows)):
            kept.pop((name, j), None)
            kept_bytes -= kept_sizes.pop((name, j), 0)

    def cut(name: str) -> None:
        live[name].status, live[name].lower_bound = "bounded", lower(name)
        drop(name)

    def row(states: torch.Tensor, r: int) -> torch.Tensor:
        return states if states.shape[0] == 1 else states[r : r + 1].clone()  # a kept row frees its batch

    # the first window alone where `first` holds its states, so those are not run again
    groups = ([range(0, 1)] + window_groups(windows, batch, 1)) if first is not None else window_groups(windows, batch)

    def restore(i: int, names: Iterable[str]) -> None:
        """Kept states of `names` from window i on that are not in memory (a replayed unit's),
        computed again from pass 1's batch holding window i: the same tensors."""
        names = sorted((b for b in names if (b, i) in kept_sizes and (b, i) not in kept), key=block_index)
        if not names:  # the usual case: nothing was replayed
            return
        group = next(g for g in groups if i in g)
        for name, normed in _normed_states(pm, stack_windows(pm, windows, group), names, removed, cost):
            for r, j in enumerate(group):
                if j >= i and (name, j) in kept_sizes and (name, j) not in kept:
                    kept[name, j] = row(normed, r)

    part = journal.scope("pass1")
    for group in groups:
        if not live:
            break
        replayed = set()
        for name in list(live):  # the units recorded: a prefix of the group's, in block order
            if (d := part.get(group.start, name)) is not None:
                s = live[name]
                replayed.add(name)
                window_lower[name].extend(d["lower"])
                for j, size in d["kept"]:
                    kept_sizes[name, j] = size
                    kept_bytes += size
                _restore(s, d["score"])
                if s.status != "done":
                    drop(name)
                if on_progress:
                    on_progress(len(group), s, True)
        todo = sorted((b for b in live if b not in replayed), key=block_index)
        if not todo:
            continue
        ids = stack_windows(pm, windows, group)
        given = (first or {}) if group.start == 0 else {}
        bws = [BoundWindow.of(head, columns[0][i]) for i in group]
        states = heapq.merge(((b, given.pop(b)) for b in todo if b in given),
                             _normed_states(pm, ids, [b for b in todo if b not in given], removed, cost),
                             key=lambda item: block_index(item[0]))
        for name, normed in states:
            s, added, kept_now = live[name], [], []
            for r, i in enumerate(group):
                x = row(normed, r)
                value = head_lower_bound(pm, x, ids[r : r + 1], bws[r], cost)
                window_lower[name].append(value)
                added.append(value)
                if lower(name) > bound:
                    cut(name)
                    break
                size = x.numel() * x.element_size()
                if kept_bytes + size <= BOUND_CACHE_BYTES:
                    kept[name, i], kept_sizes[name, i] = x, size
                    kept_bytes += size
                    kept_now.append([i, size])
            del normed
            part.put(group.start, name, {"lower": added, "kept": kept_now, "score": _state(s)})
            if on_progress:
                on_progress(len(group), s)
        del bws, states
        part.sync()
    for k, stage in enumerate(columns[1:], start=1):
        part = journal.scope(f"stage{k}")
        for i, ids in enumerate(window_batches(pm, windows)):
            names = [b for b in live if (b, i) in kept_sizes]
            if not names:
                continue
            if (d := part.get(i)) is not None:
                for name in names:
                    window_lower[name][i] = d["lower"][name]
                    if lower(name) > bound:
                        cut(name)
                continue
            restore(i, names)
            bw = BoundWindow.of(head, stage[i])
            values = {}
            for name in names:
                window_lower[name][i] = values[name] = max(window_lower[name][i],
                                                           head_lower_bound(pm, kept[name, i], ids, bw, cost))
                if lower(name) > bound:
                    cut(name)
            del bw
            part.put(i, {"lower": values})
        part.sync()
    part = journal.scope("pass2")
    groups2 = window_groups(windows, batch)

    def forget(name: str, group: range, status: str) -> None:
        """Drop the kept states a candidate no longer needs: this batch's, or all ahead once it is out."""
        for j in (group if status == "done" else range(group.start, len(windows))):
            kept.pop((name, j), None)
            kept_sizes.pop((name, j), None)

    for group in groups2:
        alive = {b: s for b, s in live.items() if s.status == "done"}
        if not alive:
            break
        for name, s in list(alive.items()):
            if (d := part.get(group.start, name)) is not None:
                _restore(s, d["score"])
                del alive[name]
                forget(name, group, s.status)
        if not alive:
            continue
        ids = stack_windows(pm, windows, group)
        whole = [b for b in alive if all((b, i) in kept_sizes for i in group)]  # pass 1 kept the batch
        for i in group:
            restore(i, whole)
        for name, normed in _normed_states(pm, ids, [b for b in alive if any((b, i) not in kept for i in group)],
                                           removed, cost):
            for r, i in enumerate(group):
                kept[name, i] = row(normed, r)
        for name, s in alive.items():
            rows = [kept.pop((name, i)) for i in group]
            _add_batch_nll(pm, rows[0] if len(rows) == 1 else torch.cat(rows), ids, s, bound, cost,
                           last_batch=group is groups2[-1], normed=True,
                           ahead=[sum(window_lower[name][i + 1:]) for i in group])
            del rows
            forget(name, group, s.status)
            part.put(group.start, name, {"score": _state(s)})
        part.sync()
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
                   cost: Cost, states: dict[str, torch.Tensor], journal: Scope = NO_JOURNAL.scope("")) -> str | None:
    """A seed without scoring every candidate's head: the candidate with the lowest head bound
    on `window`, from columns chosen by the current model's logits there (any seed is exact;
    a good one cuts more). The candidates' final-normed states there go into `states` (up to
    `BOUND_CACHE_BYTES`), for `_score_bounded` to reuse. A candidate's bound recorded in
    `journal` is replayed, not computed."""
    removed = set(pm.removed)
    _check_candidates(pm, candidates)
    live = {s.block: s for s in candidates if s.status == "done"}
    if not live:
        return None
    lower = {}
    for name in list(live):
        if (d := journal.get(name)) is not None:
            if d["lower"] is not None:
                lower[name] = d["lower"]
            del live[name]
    if live:
        (ids,) = window_batches(pm, [window])
        ctx = capture_window(pm, ids)
        cost.windows += 1
        weight = get_path(pm.model, pm.adapter.lm_head).weight
        mass = torch.zeros(weight.shape[0], device=weight.device)
        head_nll(pm, run_blocks(pm, ctx, ctx.hidden, cost, skip=removed), ids, cost, mass=mass)
        bw = BoundWindow.of(bound_head(pm), bound_columns(mass, ids, columns))
        final_norm = get_path(pm.model, pm.adapter.final_norm)
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
            journal.put(name, {"lower": lower.get(name)})
        journal.sync()
    return min(lower, key=lambda b: (lower[b], tie_order(b))) if lower else None


@torch.no_grad()
def score_candidates(pm: PrunableModel, windows: Sequence[torch.Tensor], candidates: Sequence[str], *,
                     bound: float | None = None, cost: Cost | None = None,
                     on_progress: Callable[..., None] | None = None, batch: int = 1,
                     journal: Scope = NO_JOURNAL.scope("")) -> dict[str, Score]:
    """NLL over all windows of the current model with each candidate additionally removed.

    Windows are visited in order, `batch` to a forward, so sums are bit-reproducible and
    independent of which other candidates are scored alongside. With `bound`, a candidate is stopped (status
    "stopped") as soon as its running NLL exceeds it, between windows or head chunks (NLL
    only grows, so it cannot finish below the bound); its partial NLL is kept.
    """
    cost = cost if cost is not None else Cost()
    scores = {c: Score(c) for c in candidates}
    _score_windows(pm, windows, list(scores.values()), bound, cost, on_progress, batch=batch, journal=journal)
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


@torch.no_grad()
def score_exact(pm: PrunableModel, windows: Sequence[torch.Tensor], candidates: Sequence[str], *,
                prefer: Sequence[str] = (), early_stop: bool = True, head_bound: int = HEAD_BOUND_COLUMNS,
                owned: Sequence[str] | None = None, start: dict[str, Score] | None = None,
                seed_from: str = "previous step", cost: Cost | None = None,
                on_progress: Callable[..., None] | None = None, batch: int = 1,
                journal: Scope = NO_JOURNAL.scope("")) -> ExactResult:
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
        _score_windows(pm, windows, live(owned), None, cost, on_progress, batch=batch, journal=journal.scope("all"))
        return result
    seed = next((c for c in prefer if c in scores and scores[c].status == "done"), None)
    columns = usable_head_bound(pm, head_bound)
    first_states: dict[str, torch.Tensor] | None = None  # final-normed states on the first window (`_seed_by_bound`)
    if seed is None and columns and windows:
        first_states = {}
        seed, seed_from = (_seed_by_bound(pm, windows[0], [scores[c] for c in candidates], columns, cost, first_states,
                                          journal.scope("seed-by-bound")), "head bound")
    if seed is not None and columns:  # the seed over every window, then the others bounded from the first
        rest = list(windows)
    else:
        first_states = None  # they are of windows[0], which the others are not bounded on here
        first = candidates if seed is None else [c for c in candidates if c in set(owned) | {seed}]
        _score_windows(pm, windows[:1], live(first), None, cost, on_progress, journal=journal.scope("first"))
        rest = list(windows[1:])
        if seed is None:
            best = _best(scores[c] for c in candidates)
            seed, seed_from = (best.block if best else None), "first window"
        elif scores[seed].status != "done":
            seed = None  # the preferred seed went non-finite; shards do not know the others' first window
    if seed is None:  # nothing finite bounds the others
        _score_windows(pm, rest, live(owned), None, cost, on_progress, batch=batch, journal=journal.scope("unbounded"))
        return result
    by_stage = _score_seed(pm, rest, scores[seed], columns, cost, on_progress, batch, journal.scope("seed"))
    total = scores[seed]
    bound = total.nll_sum if total.status == "done" else None
    result.seed, result.seed_from, result.bound = seed, seed_from, bound
    others = [c for c in owned if c != seed]
    if rest and bound is not None:  # beyond the bound already on the first window
        for s in live(others):
            if s.nll_sum > bound:
                s.status = "stopped"
    if by_stage is not None and bound is not None:
        result.head_bound = columns
        _score_bounded(pm, rest, live(others), bound, by_stage, cost, on_progress, first_states, batch=batch,
                       journal=journal.scope("bounded"))
        return result
    _score_windows(pm, rest, live(others), bound, cost, on_progress, batch=batch, journal=journal.scope("others"))
    return result


@torch.no_grad()
def _score_seed(pm: PrunableModel, windows: Sequence[torch.Tensor], score: Score, columns: int, cost: Cost,
                on_progress: Callable[..., None] | None = None, batch: int = 1,
                journal: Scope = NO_JOURNAL.scope("")) -> list[list[torch.Tensor]] | None:
    """Add `windows` to the score whose total bounds the others (a seed, an incumbent), and
    return the head-bound columns its logits choose there: per stage of `bound_stages` (N =
    `columns`), per window, on the head's device, as `_score_bounded` takes them; None where
    the bound is off (`columns` 0) or there are no windows."""
    stages = bound_stages(pm, columns) if columns and windows else None
    chosen: list = []  # per window, the columns at each stage
    _score_windows(pm, windows, [score], None, cost, on_progress, mass_stages=stages, columns=chosen, batch=batch,
                   journal=journal)
    if stages is None:
        return None
    device = get_path(pm.model, pm.adapter.lm_head).weight.device
    return [[per_window[k].to(device) for per_window in chosen] for k in range(len(stages))]


@torch.no_grad()
def score_incumbent(pm: PrunableModel, windows: Sequence[torch.Tensor], block: str, *,
                    head_bound: int = HEAD_BOUND_COLUMNS, cost: Cost | None = None, batch: int = 1,
                    journal: Scope = NO_JOURNAL.scope("")) -> tuple[Score, list | None]:
    """The model without `pm.removed` and `block` over every window, and the head-bound columns
    its logits choose per window (None where the bound is off): the total and the columns that
    `score_against` bounds other removal sets with (the refinements' incumbent)."""
    score = Score(block)
    columns = _score_seed(pm, windows, score, usable_head_bound(pm, head_bound), cost if cost is not None else Cost(),
                          batch=batch, journal=journal)
    return score, columns


@torch.no_grad()
def score_against(pm: PrunableModel, windows: Sequence[torch.Tensor], candidates: Sequence[str], bound: float | None,
                  columns: list | None = None, *, early_stop: bool = True, cost: Cost | None = None,
                  on_progress: Callable[..., None] | None = None, batch: int = 1,
                  journal: Scope = NO_JOURNAL.scope("")) -> dict[str, Score]:
    """Each candidate's score on top of `pm.removed`, against a total known already (an
    incumbent's NLL on the same windows, `score_incumbent`): every candidate that can finish
    at or below `bound` is scored exactly; the others are stopped, or with `columns` (the
    incumbent's head-bound columns) cut by the head bound, as in `score_exact`'s third phase.
    Without `early_stop` (or a bound) every candidate is scored on every window."""
    cost = cost if cost is not None else Cost()
    scores = {c: Score(c) for c in candidates}
    live = list(scores.values())
    if not early_stop or bound is None:
        _score_windows(pm, windows, live, None, cost, on_progress, batch=batch, journal=journal)
    elif columns is not None:
        _score_bounded(pm, windows, live, bound, columns, cost, on_progress, batch=batch, journal=journal)
    else:
        _score_windows(pm, windows, live, bound, cost, on_progress, batch=batch, journal=journal)
    return scores
