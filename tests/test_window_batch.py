"""Batched calibration windows (`--window-batch`): several windows per forward give the scores
of one window at a time to fp32 rounding, and the same chosen blocks."""

from __future__ import annotations

import math

import pytest
import torch

from blockpruner.blocks import PrunableModel
from blockpruner.errors import UserError
from blockpruner.search.greedy import StepSettings, search_step
from blockpruner.engine.forward import window_groups
from blockpruner.search.exact import score_candidates

from .conftest import BLOCK_ARCHS, tiny_model
from .test_search import brute_force_greedy, hf_nll

REL = 1e-5  # fp32 rounding of sums over a few hundred tokens, far below any gap the tests decide on


def windows(lengths, seed=0, vocab=96):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (t,), generator=g) for t in lengths]


def test_groups_are_consecutive_equal_length_and_at_most_the_batch():
    wins = windows([8, 8, 8, 5, 5, 8, 8, 8, 8, 8])
    groups = window_groups(wins, 2)
    assert [list(g) for g in groups] == [[0, 1], [2], [3, 4], [5, 6], [7, 8], [9]]
    assert [list(g) for g in window_groups(wins, 4, start=1)] == [[1, 2], [3, 4], [5, 6, 7, 8], [9]]
    assert [list(g) for g in window_groups(wins, 1)] == [[i] for i in range(10)]


@pytest.mark.parametrize("arch", BLOCK_ARCHS)
def test_batched_scores_equal_full_forwards(arch):
    """Every candidate's NLL with 3 windows per forward (a shorter last window on its own)
    against the model's own forward and loss with the block removed, window by window."""
    pm = PrunableModel.wrap(tiny_model(arch, num_hidden_layers=3))
    wins = windows([12, 12, 12, 12, 9])
    pm.remove(["attn.1"])
    cands = [n for n in pm.names if n != "attn.1"]
    batched = score_candidates(pm, wins, cands, batch=3)
    single = score_candidates(pm, wins, cands, batch=1)
    for c in cands:
        with pm.without([c]):
            want = hf_nll(pm.model, wins)
        assert batched[c].status == "done" and batched[c].windows_done == len(wins)
        assert batched[c].tokens == single[c].tokens == sum(len(w) - 1 for w in wins)
        assert math.isclose(batched[c].nll_sum, want, rel_tol=REL), (arch, c, batched[c].nll_sum, want)
        assert math.isclose(batched[c].nll_sum, single[c].nll_sum, rel_tol=REL)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("head_bound", [0, 8])
def test_batched_steps_choose_plain_greedys_blocks(arch, head_bound):
    """Three exact steps (early stopping, with and without the head bound) with 4 windows per
    forward: plain greedy's sequence, and every score finished in both runs equal to the
    one-window run's to fp32 rounding; the setting is recorded."""
    model = tiny_model(arch, seed=3, num_hidden_layers=4)
    wins = windows([10] * 7 + [6], seed=1)
    want = brute_force_greedy(model, wins, 3)
    pm = PrunableModel.wrap(model)
    runs = {}
    for batch in (1, 4):
        settings = StepSettings(head_bound_columns=head_bound, window_batch=batch)
        removed, prev, recs = [], None, []
        for k in (1, 2, 3):
            prev = search_step(pm, wins, k, removed, settings, inputs={}, progress=False, prev=prev)
            removed = prev["removed"]
            recs.append(prev)
        assert removed == want, (batch, removed, want)
        runs[batch] = recs
    for one, four in zip(runs[1], runs[4]):
        assert four["settings"]["window_batch"] == 4 and "window_batch" not in one["settings"]
        assert math.isclose(one["ppl"], four["ppl"], rel_tol=REL)
        a = {s["block"]: s for s in one["scores"] if s["status"] == "done"}
        b = {s["block"]: s for s in four["scores"] if s["status"] == "done"}
        assert a[one["removed_block"]] and b[four["removed_block"]]
        for block in a.keys() & b.keys():
            assert math.isclose(a[block]["nll_sum"], b[block]["nll_sum"], rel_tol=REL), block
            assert a[block]["tokens"] == b[block]["tokens"]


def test_a_stop_inside_a_batch_records_the_windows_before_it():
    """With a bound, a loser is stopped at the end of the window that crossed it: its record
    holds whole windows only, and each is the window's own NLL (the unbounded run's prefix)."""
    pm = PrunableModel.wrap(tiny_model("llama", seed=2, num_hidden_layers=4))
    wins = windows([12] * 6, seed=4)
    full = score_candidates(pm, wins, pm.names, batch=1)
    bound = 0.6 * min(s.nll_sum for s in full.values())  # crossed by every candidate before its last window
    per_window = {c: [score_candidates(pm, [w], [c])[c].nll_sum for w in wins] for c in pm.names}
    cut = score_candidates(pm, wins, pm.names, bound=bound, batch=3)
    stopped = [s.windows_done for s in cut.values() if s.status == "stopped"]
    assert len(stopped) == len(pm.names) and any(n % 3 for n in stopped), stopped  # some inside a batch
    for c, s in cut.items():
        if s.status == "done":
            assert math.isclose(s.nll_sum, full[c].nll_sum, rel_tol=REL)
            continue
        assert s.status == "stopped" and 1 <= s.windows_done < len(wins)
        assert s.tokens == s.windows_done * 11
        assert math.isclose(s.nll_sum, math.fsum(per_window[c][: s.windows_done]), rel_tol=REL)
        assert s.nll_sum > bound >= math.fsum(per_window[c][: s.windows_done - 1])


def test_window_batch_is_checked_before_work():
    with pytest.raises(UserError, match="window_batch must be a positive integer"):
        StepSettings(window_batch=0).validate()


def test_a_stop_between_head_chunks_covers_every_row_of_the_batch(monkeypatch):
    """Cut between head chunks, a batch's rows are all partial: the record holds the same
    number of positions of each row and no whole window."""
    import blockpruner.engine.forward as forward

    monkeypatch.setattr(forward, "head_chunk_tokens", lambda vocab, device=None: 6)  # 2 positions a chunk at B = 3
    pm = PrunableModel.wrap(tiny_model("llama", seed=2, num_hidden_layers=4))
    wins = windows([12] * 6, seed=4)
    full = score_candidates(pm, wins, pm.names)
    bound = 0.1 * min(s.nll_sum for s in full.values())  # crossed inside the first batch's head
    cut = score_candidates(pm, wins, pm.names, bound=bound, batch=3)
    for c, s in cut.items():
        assert s.status == "stopped" and s.windows_done == 0, (c, s)
        assert s.tokens % 3 == 0 and 0 < s.tokens < 3 * 11
        assert bound < s.nll_sum < full[c].nll_sum
