"""Faster search: exact early stopping, sharded steps, screened mode, cost / FLOP accounting
and the search-speed benchmark -- each against the plain computation it replaces."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from blockpruner.blocks import PrunableModel
from blockpruner.cli import main
from blockpruner.data.calibration import CalibrationSpec, load_calibration, sample_calibration
from blockpruner.model_dir import write_manifest
from blockpruner.errors import UserError
from blockpruner.report.search_speed import tiny_windows
from blockpruner.search.greedy import StepSettings, gather_shards, load_previous, parse_shard, search_step
from blockpruner.steps import read_step, write_step
from blockpruner.engine.cost import Cost, FlopModel, causal_pairs
from blockpruner.search.exact import score_candidates
from blockpruner.search.importance import layer_influence

from .conftest import ROOT, tiny_model
from .test_calibration import CharTokenizer
from .test_search import brute_force_greedy, windows

# Fields allowed to differ between a gathered and an unsharded step.
SHARD_ONLY = {"cost", "timing", "shards", "checksum"}


def markov_windows(n=10, t=16, vocab=96, seed=1):
    """Token windows from a random first-order Markov chain (learnable structure)."""
    return tiny_windows(n, t, vocab, seed=seed, successors=2, follow=0.9)


def trained_tiny(wins, arch="gemma3_text", layers=4, steps=40, seed=0):
    """A tiny model fitted for a few Adam steps to `wins`: unlike a random one, its blocks
    differ in importance (some are critical), as a trained LLM's do."""
    model = tiny_model(arch, seed=seed, num_hidden_layers=layers)
    x = torch.stack(list(wins))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def run_steps(pm, wins, k, settings=None, early_stop=True):
    removed, prev, recs = [], None, []
    for step in range(1, k + 1):
        rec = search_step(pm, wins, step, removed, settings or StepSettings(), {}, progress=False, prev=prev,
                          early_stop=early_stop)
        recs.append(rec)
        removed, prev = rec["removed"], rec
    return recs


def total(recs, key):
    return sum(r["cost"][key] for r in recs)


@pytest.fixture(scope="module")
def trained():
    wins = markov_windows()
    return PrunableModel.wrap(trained_tiny(wins)), wins


# ------------------------------------------------------------------------ early stopping


def test_early_stop_same_sequence_fewer_forwards(trained):
    pm, wins = trained
    fast = run_steps(pm, wins, 3)
    plain = run_steps(pm, wins, 3, early_stop=False)
    assert [r["removed_block"] for r in fast] == [r["removed_block"] for r in plain]
    assert [r["removed_block"] for r in fast] == brute_force_greedy(pm.model, wins, 3)
    for f, p in zip(fast, plain):
        full = {s["block"]: s for s in p["scores"]}
        assert f["scores"][0]["block"] == f["removed_block"] and f["scores"][0]["status"] == "done"
        assert f["nll_sum"] == p["nll_sum"] and f["ppl"] == p["ppl"] and f["params"] == p["params"]
        for s in f["scores"]:
            if s["status"] == "done":  # every finished score is bit-identical
                assert s["nll_sum"] == full[s["block"]]["nll_sum"] and s["tokens"] == full[s["block"]]["tokens"]
            else:  # stopped with a partial NLL already above the winner's total
                assert s["status"] == "stopped" and s["ppl"] is None
                assert f["nll_sum"] < s["nll_sum"] <= full[s["block"]]["nll_sum"]
                assert s["tokens"] < full[s["block"]]["tokens"]
        assert f["search"]["early_stop"] and f["search"]["bound"] >= f["nll_sum"]
    assert fast[0]["search"]["seed_from"] == "first window"
    for prev, cur in zip(fast, fast[1:]):  # the seed: the previous step's best finished candidate left, else the first window
        left = [s["block"] for s in prev["scores"] if s["status"] == "done" and s["block"] != prev["removed_block"]]
        want = ("previous step", left[0]) if left else ("first window", cur["search"]["seed"])
        assert (cur["search"]["seed_from"], cur["search"]["seed"]) == want
    assert sum(s["status"] == "stopped" for r in fast for s in r["scores"]) > 0
    assert total(fast, "block_forwards") < total(plain, "block_forwards")
    assert total(fast, "head_tokens") < total(plain, "head_tokens")
    assert total(fast, "flops") < total(plain, "flops")
    assert not plain[0]["search"]["early_stop"] and all(s["status"] == "done" for s in plain[0]["scores"])


def test_bound_also_stops_inside_a_window(monkeypatch):
    """Between head chunks: with 16-token chunks a window is stopped part-way, exactly."""
    import blockpruner.engine.forward as ev

    monkeypatch.setattr(ev, "head_chunk_tokens", lambda vocab, device=None: 4)
    pm = PrunableModel.wrap(tiny_model("llama", seed=5, num_hidden_layers=3))
    wins = windows(n=3, t=17)
    full = score_candidates(pm, wins, pm.names)
    best = min(full.values(), key=lambda s: s.nll_sum)
    bound = best.nll_sum * 0.5  # half of the best total: everyone stops in the middle of window 2
    cut = score_candidates(pm, wins, pm.names, bound=bound)
    for s in cut.values():
        assert s.status == "stopped" and bound < s.nll_sum < full[s.block].nll_sum
        assert s.tokens % 4 == 0 and s.tokens < 3 * 16 and s.windows_done == s.tokens // 16


# ------------------------------------------------------------------------ sharding


def strip(rec):
    return {k: v for k, v in rec.items() if k not in SHARD_ONLY}


def test_two_shards_equal_unsharded(trained):
    pm, wins = trained
    recs = run_steps(pm, wins, 2)
    for k, rec in enumerate(recs, start=1):
        removed = rec["removed"][:-1]
        prev = recs[k - 2] if k > 1 else None
        parts = [search_step(pm, wins, k, removed, StepSettings(), {}, progress=False, prev=prev, shard=(i, 2))
                 for i in (1, 0)]
        assert sorted(parts[0]["owned"] + parts[1]["owned"]) == sorted(parts[0]["candidates"])
        gathered = gather_shards(parts)
        assert strip(gathered) == strip(rec)
        assert [s["index"] for s in gathered["shards"]] == [0, 1]
        assert gathered["cost"]["block_forwards"] == sum(p["cost"]["block_forwards"] for p in parts)
    assert any(s["status"] == "stopped" for r in recs for s in r["scores"])
    with pytest.raises(UserError, match="need shards 0..1 exactly once"):
        gather_shards([parts[0], parts[0]])
    other = dict(parts[1], search=dict(parts[1]["search"], bound=1.0))
    with pytest.raises(UserError, match="'search' differs"):
        gather_shards([parts[0], other])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A prepared 4-layer model fitted to its own calibration windows, and the artifact."""
    t = tmp_path_factory.mktemp("speed")
    text = t / "t.txt"
    text.write_text("\n".join(f"row {i % 7} says {'ab' * (i % 3)} then {i % 5}" for i in range(60)))
    sample_calibration(CalibrationSpec(str(text), nsamples=40, seqlen=16, max_windows=10), CharTokenizer(), t / "calib")
    model = trained_tiny(load_calibration(t / "calib").windows)
    model.save_pretrained(t / "model")
    write_manifest(t / "model", model, source="test", dtype="fp32")
    return t


def cli(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cli_shards_and_gather_equal_unsharded_step(study, capsys):
    t = study
    common = ["--model", t / "model", "--calib", t / "calib", "--device", "cpu", "--no-progress"]
    for k in (1, 2):
        prev = ["--prev", t / f"step_{k - 1}.json"] if k > 1 else []
        assert cli(["step", *common, "--k", k, *prev, "--out", t / f"step_{k}.json"], capsys)[0] == 0
        for i in (0, 1):
            assert cli(["step", *common, "--k", k, *prev, "--shard", f"{i}/2", "--out", t / f"s{k}_{i}.json"], capsys)[0] == 0
        assert cli(["gather-step", "--shards", t / f"s{k}_0.json", t / f"s{k}_1.json", "--out", t / f"g{k}.json"],
                   capsys)[0] == 0
        full, gathered = read_step(t / f"step_{k}.json"), read_step(t / f"g{k}.json")
        assert strip(gathered) == strip(full)
        assert json.loads((t / f"s{k}_0.json").read_text())["format"] == "blockpruner.step-shard/1"
    # a shard is not a step: the next step refuses it as --prev
    code, err = cli(["step", *common, "--k", 2, "--prev", t / "s1_0.json", "--out", t / "x.json"], capsys)
    assert code == 2 and "not a blockpruner.step/1 artifact" in err
    code, err = cli(["step", *common, "--k", 1, "--shard", "2/2", "--out", t / "x.json"], capsys)
    assert code == 2 and "0 <= i < N" in err
    code, err = cli(["step", *common, "--k", 1, "--shard", "0/2", "--screen-windows", "1", "--confirm-top", "2",
                     "--out", t / "x.json"], capsys)
    assert code == 2 and "exact steps only" in err
    # --no-early-stop: same choice and finished scores, nothing stopped
    assert cli(["step", *common, "--k", 2, "--prev", t / "step_1.json", "--no-early-stop", "--out", t / "n2.json"],
               capsys)[0] == 0
    slow, fast = read_step(t / "n2.json"), read_step(t / "step_2.json")
    assert slow["removed"] == fast["removed"] and slow["nll_sum"] == fast["nll_sum"]
    assert all(s["status"] == "done" for s in slow["scores"]) and not slow["search"]["early_stop"]


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1) and parse_shard("3/4") == (3, 4)
    for bad in ("1", "a/b", "4/4", "-1/2", "0/0"):
        with pytest.raises(UserError):
            parse_shard(bad)


# ------------------------------------------------------------------------ screened mode


def test_screened_mode_is_recorded_and_never_mixed_with_exact(trained, tmp_path):
    pm, wins = trained
    settings = StepSettings.make(screen_windows=2, confirm_top=3)
    rec = search_step(pm, wins, 1, [], settings, {"model_hash": "m", "calibration_hash": "c"}, progress=False)
    assert rec["settings"] == {"method": "blockpruner", "metric": "ppl", "candidates": "all", "mode": "screened",
                               "screen_windows": 2, "confirm_top": 3, "bi_candidates": None, "head_bound_columns": 4096,
                               "numerics": "fp32"}
    status = [s["status"] for s in rec["scores"]]
    assert status.count("screened") == len(pm.names) - 3 and rec["scores"][0]["status"] == "done"
    screened = [s for s in rec["scores"] if s["status"] == "screened"]
    assert all(s["windows"] == 2 and s["ppl"] is None for s in screened)
    assert rec["search"]["mode"] == "screened" and len(rec["search"]["confirmed"]) == 3
    exact = search_step(pm, wins, 1, [], StepSettings(), {"model_hash": "m", "calibration_hash": "c"}, progress=False)
    assert exact["settings"] == {"method": "blockpruner", "metric": "ppl", "candidates": "all", "mode": "exact",
                                 "head_bound_columns": 4096, "numerics": "fp32"}
    write_step(tmp_path / "screened.json", rec)
    write_step(tmp_path / "exact.json", exact)
    with pytest.raises(UserError, match="made with settings"):
        load_previous(tmp_path / "screened.json", 2, "m", "c", StepSettings())
    with pytest.raises(UserError, match="made with settings"):
        load_previous(tmp_path / "exact.json", 2, "m", "c", settings)
    with pytest.raises(UserError, match="made with settings"):
        load_previous(tmp_path / "screened.json", 2, "m", "c", StepSettings.make(screen_windows=2, confirm_top=4))
    assert load_previous(tmp_path / "screened.json", 2, "m", "c", settings)[0] == rec["removed"]
    assert load_previous(tmp_path / "exact.json", 2, "m", "c", StepSettings())[0] == exact["removed"]
    # the head bound's size is recorded but never decides the result: a step may continue another size
    assert load_previous(tmp_path / "exact.json", 2, "m", "c", StepSettings(head_bound_columns=0))[0] == exact["removed"]


def test_screened_settings_are_checked():
    for kw, pattern in [(dict(screen_windows=2), "go together"), (dict(confirm_top=2), "go together"),
                        (dict(screen_windows=0, confirm_top=2), "positive integer"),
                        (dict(bi_candidates=0), "positive integer")]:
        with pytest.raises(UserError, match=pattern):
            StepSettings.make(**kw).validate()
    with pytest.raises(UserError, match="takes no screening options"):
        StepSettings(screen_windows=2, confirm_top=2).validate()
    StepSettings.make(bi_candidates=3).validate()


def test_candidates_by_block_influence(trained):
    pm, wins = trained
    bi = layer_influence(pm, wins)
    # reference: BI from the model's own hidden states (input of layer i and of layer i + 1)
    ref = {}
    for i in range(pm.num_layers - 1):  # the last entry of hidden_states is final-normed
        per_window = []
        for w in wins:
            with torch.no_grad():
                hs = pm.model(w[None], output_hidden_states=True).hidden_states
            cos = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1, eps=1e-12)
            per_window.append((1 - cos).sum().item())
        ref[i] = sum(per_window) / sum(len(w) for w in wins)
        assert math.isclose(bi[i], ref[i], rel_tol=1e-6, abs_tol=1e-9)
    rec = search_step(pm, wins, 1, [], StepSettings.make(bi_candidates=3), {}, progress=False)
    by_bi = sorted(pm.names, key=lambda b: (bi[int(b.split(".")[1])], b.startswith("mlp"), int(b.split(".")[1])))[:3]
    assert sorted(s["block"] for s in rec["scores"]) == sorted(by_bi) == sorted(rec["search"]["bi_kept"])
    assert rec["removed_block"] in by_bi and rec["settings"]["bi_candidates"] == 3


# ------------------------------------------------------------------------ cost and FLOPs


def test_cost_and_flops_match_a_hand_count():
    h, inter, heads, kv, hd, vocab, t = 32, 48, 4, 2, 8, 96, 12
    pm = PrunableModel.wrap(tiny_model("llama", num_hidden_layers=2))
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h  # q, k, v, o
    mlp = 3 * h * inter  # gate, up, down
    fm = FlopModel.of(pm)
    pairs = t * (t + 1) // 2
    a_flops = 2 * attn * t + 4 * heads * hd * pairs
    m_flops = 2 * mlp * t
    assert fm.block("attn.0", t) == a_flops and fm.block("mlp.1", t) == m_flops
    assert fm.head(t - 1) == 2 * h * vocab * (t - 1)
    cost = Cost()
    score_candidates(pm, windows(n=1, t=t), pm.names, cost=cost)
    # the walk runs attn.0, mlp.0, attn.1, mlp.1 once; the suffixes of attn.0 (mlp.0, attn.1, mlp.1),
    # mlp.0 (attn.1, mlp.1) and attn.1 (mlp.1): attn.0 x1, mlp.0 x2, attn.1 x3, mlp.1 x4
    assert cost.block_forwards == 1 + 2 + 3 + 4
    assert cost.head_tokens == 4 * (t - 1)
    assert cost.flops == (1 + 3) * a_flops + (2 + 4) * m_flops + 4 * 2 * h * vocab * (t - 1)
    assert cost.as_dict() == {"block_forwards": 10, "head_tokens": 44, "window_passes": 1, "flops": cost.flops,
                              "bound_columns": 0}
    rec = search_step(pm, windows(n=1, t=t), 1, [], StepSettings(), {}, progress=False, early_stop=False)
    assert rec["cost"] == cost.as_dict()


def test_sliding_window_attention_pairs():
    assert causal_pairs(10) == 55
    assert causal_pairs(10, 6) == sum(min(i + 1, 6) for i in range(10)) == 45
    assert causal_pairs(4, 6) == 10
    pm = PrunableModel.wrap(tiny_model("gemma3_text"))  # layers: sliding (6), full, sliding
    fm = FlopModel.of(pm)
    assert fm.window == {0: 6, 1: None, 2: 6}
    assert fm.block("attn.1", 10) - fm.block("attn.0", 10) == 4 * 4 * 8 * (55 - 45)


# ------------------------------------------------------------------------ the benchmark


def test_benchmark_runs_on_tiny(capsys):
    spec = importlib.util.spec_from_file_location("search_speed", ROOT / "benchmarks" / "search_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--tiny", "--layers", "4", "--hidden", "32", "--vocab", "64", "--windows", "4", "--seqlen", "12",
                      "--k", "2", "--methods", "plain,prefix,exact,bounded,screened", "--screen-windows", "1",
                      "--confirm-top", "2", "--head-bound-columns", "8"])
    out = capsys.readouterr().out
    m = res["methods"]
    assert m["exact"]["sequence"] == m["prefix"]["sequence"] == m["bounded"]["sequence"] == m["plain"]["sequence"]
    assert m["exact"]["equals_plain"] and m["bounded"]["equals_plain"] and res["exact_methods_equal_plain"]
    assert m["bounded"]["bound_columns"] > 0 and m["exact"]["bound_columns"] == m["plain"]["bound_columns"] == 0
    assert len(m["screened"]["sequence"]) == 2
    assert m["prefix"]["fewer_block_forwards"] > 1.2 and m["screened"]["fewer_head_tokens"] > 1
    assert m["plain"]["head_tokens"] == (8 + 7) * 4 * 11
    for name in m:
        assert f"| {name} |" in out
    assert "predicted" in out and "measured" in out and "bounded vs exact" in out


def test_benchmark_cli_writes_json_and_table(tmp_path, capsys):
    args = ["benchmark-search", "--tiny", "--layers", "3", "--hidden", "32", "--vocab", "64", "--windows", "2",
            "--seqlen", "8", "--k", "1", "--methods", "plain,exact"]
    assert main(args + ["--json", str(tmp_path / "b.json"), "--md", str(tmp_path / "b.md")]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["methods"]["exact"]["equals_plain"] and res["k"] == 1
    assert "| exact |" in (tmp_path / "b.md").read_text()
    capsys.readouterr()
    assert main(["benchmark-search", "--model", str(tmp_path)]) == 2
    assert "give --model DIR and --calib DIR" in capsys.readouterr().err
    assert main(args[:-1] + ["plain,fastest"]) == 2
    assert "unknown methods ['fastest']" in capsys.readouterr().err
