"""The head bound: a lower bound on a candidate's NLL from a few LM-head columns, which cuts
candidates that cannot win without changing the chosen block or any finished NLL."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import blockpruner.search.exact as exact
from blockpruner.blocks import PrunableModel
from blockpruner.engine.cost import Cost, FlopModel
from blockpruner.engine.forward import head_nll
from blockpruner.engine.head_bound import BoundWindow, bound_columns, head_lower_bound, rounding_allowance
from blockpruner.search.exact import score_candidates
from blockpruner.search.greedy import StepSettings, gather_shards, search_step

from .conftest import tiny_model
from .test_search import brute_force_greedy
from .test_search_speed import SHARD_ONLY

VOCAB = 256


def wins(n=4, t=12, seed=0, vocab=VOCAB, lengths=None):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [t] * n
    return [torch.randint(3, vocab, (m,), generator=g) for m in lengths]


def model(arch, seed=0, layers=3):
    return PrunableModel.wrap(tiny_model(arch, seed=seed, num_hidden_layers=layers, vocab_size=VOCAB))


def run(pm, windows, k, columns, early_stop=True):
    removed, prev, recs = [], None, []
    for step in range(1, k + 1):
        rec = search_step(pm, windows, step, removed, StepSettings(head_bound_columns=columns), {}, progress=False,
                          prev=prev, early_stop=early_stop)
        recs.append(rec)
        removed, prev = rec["removed"], rec
    return recs


def same_results(a, b):
    """Same chosen blocks, and bit-identical NLLs of every candidate finished in both."""
    assert [r["removed_block"] for r in a] == [r["removed_block"] for r in b]
    finished_in_both = 0
    for x, y in zip(a, b):
        assert x["nll_sum"] == y["nll_sum"] and x["tokens"] == y["tokens"]
        other = {s["block"]: s for s in y["scores"]}
        for s in x["scores"]:
            if s["status"] == "done" and other[s["block"]]["status"] == "done":
                assert s["nll_sum"] == other[s["block"]]["nll_sum"] and s["tokens"] == other[s["block"]]["tokens"]
                finished_in_both += 1
    assert finished_in_both >= len(a)


# ------------------------------------------------------------------------ the bound itself


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: final logit softcapping 30
@pytest.mark.parametrize("scale", [1.0, 40.0])  # large hidden states: logits far beyond the softcap
def test_bound_never_exceeds_the_true_nll(arch, scale):
    pm = model(arch)
    head = pm.model.lm_head
    softcap = getattr(pm.model.config, "final_logit_softcapping", None)
    assert (softcap is not None) == (arch == "gemma2")
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        t = 9 + trial % 5
        ids = torch.randint(0, VOCAB, (1, t), generator=g)
        normed = torch.randn(1, t, 32, generator=g) * scale * (1 + trial % 3)
        # independent reference: full logits, softcap as the model's forward does it, cross_entropy
        logits = normed[0, :-1] @ head.weight.T
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        want = F.cross_entropy(logits.double(), ids[0, 1:], reduction="sum").item()
        computed = head_nll(pm, normed, ids, normed=True)[0][0]
        for n in (0, 1, 2, 8, 64, VOCAB):
            mass = torch.rand(VOCAB, generator=g)
            cols = bound_columns(mass, ids, n)
            assert set(ids[0, 1:].tolist()) <= set(cols.tolist()) and cols.tolist() == sorted(set(cols.tolist()))
            lower = head_lower_bound(pm, normed, ids, BoundWindow.of(head, cols))
            assert 0.0 <= lower <= want and lower <= computed, (trial, n, lower, want, computed)
            if n == VOCAB:  # every column: the bound is the NLL up to the rounding allowance
                z = normed[0, :-1].double() @ head.weight.double().T
                allowance = rounding_allowance(pm, normed[0, :-1], z, BoundWindow.of(head, cols)).sum().item()
                assert want - lower <= allowance + 1e-6 * (1 + want)  # want: float32 logits, rounded too


def test_softcapped_subset_bound_needs_the_cap_on_each_column():
    """Capped column by column, LSE over a subset <= LSE over all columns: a bound; the same
    subset without the cap is not a bound on the capped NLL (the transform must be the same)."""
    z = torch.tensor([[100.0, 99.0, 98.0, 97.0]])
    y, c = 3, 30.0
    capped = c * torch.tanh(z / c)
    nll = F.cross_entropy(capped, torch.tensor([y])).item()
    for subset in ([3], [0, 3], [1, 2, 3], [0, 1, 2, 3]):
        assert (torch.logsumexp(capped[0, subset], 0) - capped[0, y]).item() <= nll + 1e-6
    uncapped = (torch.logsumexp(z[0, [0, y]], 0) - z[0, y]).item()
    assert uncapped > nll + 1


def test_bound_cost_is_counted():
    pm = model("llama")
    ids = wins(1, t=10)[0][None]
    cols = bound_columns(torch.rand(VOCAB), ids, 20)
    cost = Cost()
    head_lower_bound(pm, torch.randn(1, 10, 32), ids, BoundWindow.of(pm.model.lm_head, cols), cost)
    assert cost.bound_columns == 9 * cols.numel() and cost.head_tokens == 0
    assert cost.flops == FlopModel.of(pm).bound(cost.bound_columns) == 2 * 32 * 9 * cols.numel()
    assert Cost.from_dict(cost.as_dict()) == cost


# ------------------------------------------------------------------------ exactness in the search


def test_weak_bound_gives_plain_greedy():
    """Two columns per window: a loose bound, still exactly plain greedy's choice and NLLs."""
    pm = model("llama", seed=3, layers=4)
    ws = wins(4, t=10, seed=1)
    want = brute_force_greedy(pm.model, ws, 3)
    weak = run(pm, ws, 3, columns=2)
    plain = run(pm, ws, 3, columns=0, early_stop=False)
    assert [r["removed_block"] for r in weak] == want
    same_results(weak, plain)
    assert all(r["settings"]["head_bound_columns"] == 2 for r in weak)
    assert weak[1]["search"]["head_bound_columns"] == 2 and weak[0]["cost"]["bound_columns"] > 0
    assert weak[0]["search"]["seed_from"] == "head bound" and weak[1]["search"]["seed_from"] == "previous step"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gemma3_text"])
def test_bound_on_and_off_agree(arch):
    pm = model(arch, seed=2, layers=3)
    ws = wins(4, t=12, seed=4)
    on, off = run(pm, ws, 3, columns=16), run(pm, ws, 3, columns=0)
    same_results(on, off)
    assert sum(r["cost"]["bound_columns"] for r in on) > 0 and all(r["cost"]["bound_columns"] == 0 for r in off)
    same_results(on, run(pm, ws, 3, columns=0, early_stop=False))


def test_per_sample_windows_and_no_cache(monkeypatch):
    """Windows of different lengths (per-sample calibration), with and without kept states."""
    pm = model("gemma3_text", seed=1, layers=3)
    ws = wins(lengths=[12, 5, 16, 2, 9], seed=7)
    on, off = run(pm, ws, 2, columns=8), run(pm, ws, 2, columns=0)
    same_results(on, off)
    monkeypatch.setattr(exact, "BOUND_CACHE_BYTES", 0)  # survivors' blocks run again
    again = run(pm, ws, 2, columns=8)
    assert [r["scores"] for r in again] == [r["scores"] for r in on]
    assert sum(r["cost"]["block_forwards"] for r in again) >= sum(r["cost"]["block_forwards"] for r in on)


# ------------------------------------------------------------------------ cutting


@pytest.fixture(scope="module")
def trained():
    """A tiny Gemma 3 fitted to Markov windows over 256 tokens: its blocks differ in importance."""
    from blockpruner.report.search_speed import tiny_windows

    ws = tiny_windows(8, 16, VOCAB, seed=2, successors=2, follow=0.9)
    m = tiny_model("gemma3_text", seed=0, num_hidden_layers=4, vocab_size=VOCAB)
    x = torch.stack(ws)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    m.train()
    for _ in range(60):
        loss = m(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return PrunableModel.wrap(m.eval()), ws


def bounded_scores(on: list[dict], off: list[dict]) -> list[dict]:
    """The candidates the bound cut in `on`, each checked against its full NLL in `off`: the
    certified lower bound lies above the winner's total and at or below its true NLL, and
    its exact part covers fewer tokens."""
    cut = []
    for rec, full in zip(on, off):
        exact = {s["block"]: s for s in full["scores"]}
        for s in rec["scores"]:
            if s["status"] == "bounded":
                assert s["ppl"] is None and rec["search"]["bound"] < s["nll_lower_bound"] <= exact[s["block"]]["nll_sum"]
                assert s["nll_sum"] <= exact[s["block"]]["nll_sum"] and s["tokens"] < exact[s["block"]]["tokens"]
                cut.append(s)
    return cut


def test_bound_cuts_candidates_that_cannot_win(trained):
    pm, ws = trained
    on, off = run(pm, ws, 2, columns=32), run(pm, ws, 2, columns=0, early_stop=False)
    same_results(on, off)
    assert bounded_scores(on, off)
    assert sum(r["cost"]["head_tokens"] for r in on) < sum(r["cost"]["head_tokens"] for r in run(pm, ws, 2, columns=0))


def test_survivors_are_cut_window_by_window(trained, monkeypatch):
    """A bound at half strength (still a lower bound) lets more candidates past the first pass;
    those finishing with the full head are cut as soon as their exact NLL so far plus the
    lower bounds of the windows ahead exceeds the seed's total -- never one that could win."""
    pm, ws = trained
    true_bound = exact.head_lower_bound
    monkeypatch.setattr(exact, "head_lower_bound", lambda *a, **k: 0.5 * true_bound(*a, **k))
    on, off = run(pm, ws, 2, columns=32), run(pm, ws, 2, columns=0, early_stop=False)
    same_results(on, off)
    assert [s for s in bounded_scores(on, off) if s["tokens"] > 0]  # exact on some windows, bounded on the rest


def test_shards_with_the_bound_equal_unsharded(trained):
    pm, ws = trained
    recs = run(pm, ws, 2, columns=32)
    assert any(s["status"] == "bounded" for r in recs for s in r["scores"])
    for k, rec in enumerate(recs, start=1):
        prev = recs[k - 2] if k > 1 else None
        parts = [search_step(pm, ws, k, rec["removed"][:-1], StepSettings(head_bound_columns=32), {}, progress=False,
                             prev=prev, shard=(i, 3)) for i in (2, 0, 1)]
        gathered = gather_shards(parts)
        assert {a: b for a, b in gathered.items() if a not in SHARD_ONLY} == {a: b for a, b in rec.items() if a not in SHARD_ONLY}


def test_score_candidates_is_unchanged_by_the_bound_code(trained):
    """The plain engine (no bound) still equals a full forward's NLL per candidate."""
    pm, ws = trained
    scores = score_candidates(pm, ws[:2], ["attn.0", "mlp.3"])
    for c, s in scores.items():
        with pm.without([c]), torch.no_grad():
            want = sum(pm.model(w[None], labels=w[None]).loss.double().item() * (len(w) - 1) for w in ws[:2])
        assert math.isclose(s.nll_sum, want, rel_tol=1e-5)
