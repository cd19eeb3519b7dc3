"""The evaluator and the greedy search against straightforward references."""

from __future__ import annotations

import math

import pytest
import torch

from blockpruner.blocks import PrunableModel, tie_order
from blockpruner.errors import UserError
from blockpruner.eval.wikitext import perplexity
from blockpruner.search.greedy import StepSettings, candidate_blocks, search_step
from blockpruner.steps import steps_to_ratio
from blockpruner.engine.cost import Cost
from blockpruner.engine.forward import current_nll
from blockpruner.search.exact import score_candidates

from .conftest import ARCHS, tiny_model


def windows(n=3, t=12, seed=0, vocab=96):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (t,), generator=g) for _ in range(n)]


def hf_nll(model, wins) -> float:
    """Reference: the model's own forward + its own loss (mean over T-1 tokens)."""
    total = 0.0
    with torch.no_grad():
        for w in wins:
            out = model(w.unsqueeze(0), labels=w.unsqueeze(0), use_cache=False)
            total += out.loss.double().item() * (len(w) - 1)
    return total


@pytest.mark.parametrize("arch", ARCHS)
def test_candidate_nll_equals_full_forward(arch):
    """Prefix reuse gives the NLL of a full forward with the block removed."""
    pm = PrunableModel.wrap(tiny_model(arch, num_hidden_layers=3))
    wins = windows()
    pm.remove(["mlp.0"])
    cands = [n for n in pm.names if n != "mlp.0"]
    scores = score_candidates(pm, wins, cands)
    for c in cands:
        with pm.without([c]):
            want = hf_nll(pm.model, wins)
        assert math.isclose(scores[c].nll_sum, want, rel_tol=1e-5), (arch, c, scores[c].nll_sum, want)
    assert pm.removed == ["mlp.0"]


def brute_force_greedy(model, wins, k):
    """Plain greedy written out: remove, full forward, restore; attn-before-mlp tie order."""
    pm = PrunableModel.wrap(model)
    removed = []
    for _ in range(k):
        best = None
        for c in sorted((n for n in pm.names if n not in removed), key=tie_order):
            pm.set_removed(removed + [c])
            nll = hf_nll(model, wins)
            if best is None or nll < best[0]:
                best = (nll, c)
        removed.append(best[1])
    pm.set_removed([])
    return removed


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_three_steps_equal_brute_force(arch):
    model = tiny_model(arch, seed=3, num_hidden_layers=4)
    wins = windows(n=4, t=10, seed=1)
    want = brute_force_greedy(model, wins, 3)
    pm = PrunableModel.wrap(model)
    removed = []
    for k in (1, 2, 3):
        rec = search_step(pm, wins, k, removed, StepSettings(), inputs={}, progress=False)
        assert rec["removed"][:-1] == removed
        removed = rec["removed"]
        assert math.isclose(rec["ppl"], math.exp(rec["nll_sum"] / rec["tokens"]))
        assert rec["scores"][0]["block"] == rec["removed_block"]
    assert removed == want


def test_prefix_reuse_saves_block_forwards():
    pm = PrunableModel.wrap(tiny_model("llama", num_hidden_layers=4))
    wins = windows(n=2)
    cost = Cost()
    score_candidates(pm, wins, pm.names, cost=cost)
    n = len(pm.names)
    plain = len(wins) * n * (n - 1)  # each candidate: a full forward minus itself
    assert cost.block_forwards == len(wins) * (n + sum(range(n)))  # prefix pass + suffixes
    assert plain / cost.block_forwards > 1.5
    assert cost.head_tokens == len(wins) * n * (len(wins[0]) - 1)


def test_bound_stops_losers_but_keeps_winner():
    pm = PrunableModel.wrap(tiny_model("llama", seed=5, num_hidden_layers=4))
    wins = windows(n=4)
    full = score_candidates(pm, wins, pm.names)
    best = min(full.values(), key=lambda s: s.nll_sum)
    bounded = score_candidates(pm, wins, pm.names, bound=best.nll_sum)
    assert bounded[best.block].status == "done" and bounded[best.block].nll_sum == best.nll_sum
    # stopped exactly where the running NLL passed the bound with work left; a candidate that
    # passes it only on its last window finishes (status done, its full NLL) and loses.  A
    # bound below half the candidates' NLL over the first 3 windows makes some stop early.
    before_last = score_candidates(pm, wins[:-1], pm.names)
    bound = sorted(s.nll_sum for s in before_last.values())[len(pm.names) // 2]
    bounded = score_candidates(pm, wins, pm.names, bound=bound)
    for c, s in bounded.items():
        if before_last[c].nll_sum > bound:
            assert s.status == "stopped" and bound < s.nll_sum < full[c].nll_sum, c
        else:
            assert s.status == "done" and s.nll_sum == full[c].nll_sum, c
    assert sum(s.status == "stopped" for s in bounded.values()) == sum(s.nll_sum > bound for s in before_last.values()) > 0


def test_nonfinite_candidate_is_never_chosen():
    model = tiny_model("llama", seed=2)
    pm = PrunableModel.wrap(model)
    with torch.no_grad():  # make the model blow up unless mlp.1 is removed
        pm.layers[1].mlp.down_proj.weight.fill_(float("inf"))
    rec = search_step(pm, windows(n=2), 1, [], StepSettings(), inputs={}, progress=False)
    assert rec["removed_block"] == "mlp.1"
    assert {s["status"] for s in rec["scores"][1:]} == {"nonfinite"}


def test_all_nonfinite_is_a_clear_error():
    pm = PrunableModel.wrap(tiny_model("llama", seed=2, num_hidden_layers=2))
    with torch.no_grad():
        get = pm.model.lm_head.weight
        get.fill_(float("nan"))
    with pytest.raises(UserError, match="every candidate gave a non-finite perplexity"):
        search_step(pm, windows(n=1), 1, [], StepSettings(), inputs={}, progress=False)


def test_perplexity_same_for_batch_sizes_and_matches_evaluator():
    pm = PrunableModel.wrap(tiny_model("gemma2"))
    wins = windows(n=5, t=16)
    pm.remove(["attn.1"])
    a = perplexity(pm, wins, batch_size=1, progress=False)
    b = perplexity(pm, wins, batch_size=2, progress=False)
    assert a["tokens"] == b["tokens"] == 5 * 15
    assert math.isclose(a["nll_sum"], b["nll_sum"], rel_tol=1e-9)
    c = current_nll(pm, wins)
    assert math.isclose(c.nll_sum, a["nll_sum"], rel_tol=1e-6)
    assert math.isclose(a["nll_sum"], hf_nll(pm.model, wins), rel_tol=1e-6)


def test_candidate_sets_and_budget():
    assert candidate_blocks(2, ["attn.0"], "all") == ["attn.1", "mlp.0", "mlp.1"]
    assert candidate_blocks(2, [], "mlp") == ["mlp.0", "mlp.1"]
    pm = PrunableModel.wrap(tiny_model("llama", num_hidden_layers=1))
    with pytest.raises(UserError, match="no attn blocks left"):
        search_step(pm, windows(n=1), 2, ["attn.0"], StepSettings(candidates="attn"), inputs={}, progress=False)


def test_steps_to_ratio():
    steps = [{"k": k, "params": {"ratio": r}} for k, r in [(1, 0.05), (2, 0.12), (3, 0.2)]]
    assert steps_to_ratio(steps, 0.1) == 2
    assert steps_to_ratio(steps, 0.2) == 3
    with pytest.raises(UserError, match="run more search steps"):
        steps_to_ratio(steps, 0.3)
