"""Refinement beyond greedy (`blockpruner.search.refine`): on a tiny Llama built so that greedy
is suboptimal at K = 2, swap refinement and the evolutionary search find the best pair that
a brute force over every pair finds, with NLLs from transformers' own forward (the removed
blocks' output projections zeroed: their residual branches add nothing); refinement never
raises calibration perplexity; the head bound and early stopping do not change the result;
rounds resume; the CLI refuses bad input before loading the model."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

from blockpruner.blocks import PrunableModel, block_names, parse_block
from blockpruner.search.greedy import StepSettings, search_step
from blockpruner.search.refine import RefineSettings, mutate, refine, rounds_dir

from .conftest import ROOT, tiny_model

A, B, C = "mlp.1", "mlp.2", "mlp.3"  # A and B cancel; C is the cheapest single block


def cancelling_model():
    """4 layers, every block scaled so that it matters: mlp.2 is mlp.1 with its output negated
    (removing both changes the model far less than removing either), mlp.3 is weak (greedy's
    first choice), every other block strong. The premises are checked by brute force in
    `test_the_model_makes_greedy_suboptimal`."""
    model = tiny_model("llama", seed=0, num_hidden_layers=4)
    layers = model.model.layers
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.o_proj.weight.mul_(6.0)
            layer.mlp.gate_proj.weight.mul_(12.0)
            layer.mlp.up_proj.weight.mul_(12.0)
            layer.mlp.down_proj.weight.mul_(2.0)
        layers[2].mlp.load_state_dict(layers[1].mlp.state_dict())
        layers[2].mlp.down_proj.weight.neg_()
        layers[2].post_attention_layernorm.weight.copy_(layers[1].post_attention_layernorm.weight)
        layers[1].mlp.down_proj.weight.mul_(0.75 / 2.0)
        layers[2].mlp.down_proj.weight.mul_(0.75 / 2.0)
        layers[3].mlp.down_proj.weight.mul_(0.2 / 2.0)
        model.lm_head.weight.mul_(30.0)
    return model


@torch.no_grad()
def sampled_windows(model, n: int = 4, t: int = 16, seed: int = 3) -> list[torch.Tensor]:
    """Windows drawn from the dense model itself, so that it predicts them well and removing a
    block that matters costs NLL."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, model.config.vocab_size, (1, 1), generator=g)
        for _ in range(t - 1):
            p = torch.softmax(model(ids).logits[0, -1].double(), -1)
            ids = torch.cat([ids, torch.multinomial(p, 1, generator=g).view(1, 1)], 1)
        out.append(ids[0])
    return out


def hf_nll(model, wins, removed) -> float:
    """Summed next-token NLL from transformers' forward with the removed blocks' output
    projections zeroed (independent of the package's engine)."""
    assert not any(layer.bp_removed for layer in model.model.layers if hasattr(layer, "bp_removed"))
    saved = {}
    with torch.no_grad():
        for b in removed:
            kind, i = parse_block(b)
            proj = model.model.layers[i].self_attn.o_proj if kind == "attn" else model.model.layers[i].mlp.down_proj
            saved[b] = proj.weight.clone()
            proj.weight.zero_()
        try:
            total = 0.0
            for w in wins:
                logits = model(w.unsqueeze(0)).logits[0, :-1].double()
                total += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
        finally:
            for b, weight in saved.items():
                kind, i = parse_block(b)
                proj = model.model.layers[i].self_attn.o_proj if kind == "attn" else model.model.layers[i].mlp.down_proj
                proj.weight.copy_(weight)
    return total


def greedy(pm, wins, k) -> dict:
    removed, prev = [], None
    for step in range(1, k + 1):
        prev = search_step(pm, wins, step, removed, StepSettings(), {"model_hash": "m", "calibration_hash": "c"},
                           progress=False, prev=prev)
        removed = prev["removed"]
    return prev


def best_same_kinds(model, wins, like: list[str]) -> tuple[list[str], float]:
    """Brute force: the set with as many attention and MLP blocks as `like` with the lowest NLL."""
    kinds = sorted(parse_block(b)[0] for b in like)
    sets = [s for s in itertools.combinations(block_names(len(model.model.layers)), len(like))
            if sorted(parse_block(b)[0] for b in s) == kinds]
    nll = {s: hf_nll(model, wins, s) for s in sets}
    best = min(nll, key=nll.get)
    return sorted(best), nll[best]


@pytest.fixture(scope="module")
def built():
    model = cancelling_model()
    wins = sampled_windows(model)
    pm = PrunableModel.wrap(model)
    start = greedy(pm, wins, 2)
    pm.set_removed([])  # the brute force runs the dense model with weights zeroed
    best, best_nll = best_same_kinds(model, wins, start["removed"])
    return model, wins, start, best, best_nll


def test_the_model_makes_greedy_suboptimal(built):
    model, wins, start, best, best_nll = built
    assert sorted(start["removed"]) != best, "the construction must defeat greedy at K = 2"
    assert set(best) == {A, B}
    assert start["removed"][0] == C
    assert best_nll < hf_nll(model, wins, start["removed"]) - 1.0  # by 3.5 nats when this was written


@pytest.mark.parametrize("early_stop,bound", [(True, 8), (True, 0), (False, 0)])
def test_swap_finds_the_brute_force_best(built, tmp_path, early_stop, bound):
    model, wins, start, best, best_nll = built
    pm = PrunableModel.wrap(model)
    settings = RefineSettings("swap", head_bound_columns=bound, early_stop=early_stop)
    record = refine(pm, wins, start, settings, {"model_hash": "m", "calibration_hash": "c"}, tmp_path / "k2.json",
                    rounds=5, kinds=("attn", "mlp"), progress=False)
    assert sorted(record["removed"]) == best
    assert record["nll_sum"] == pytest.approx(best_nll, rel=1e-5)
    assert record["nll_sum"] < start["nll_sum"]
    rounds = record["search"]["rounds"]
    assert rounds[-1]["stop"] and rounds[-1]["after"] is None  # ended because nothing improved
    # the round's incumbent is greedy's set, scored the same way greedy scored it
    first = json.loads((rounds_dir(tmp_path / "k2.json") / "round_1.json").read_text())
    assert first["incumbent"]["nll_sum"] == start["nll_sum"]
    assert len(first["tried"]) == 2 * 2  # each of the two removed MLPs against the two kept ones
    finished = [t for t in first["tried"] if t["status"] == "done"]
    for t in finished:  # every finished swap is exact
        swapped = [t["in"] if b == t["out"] else b for b in start["removed"]]
        assert t["nll_sum"] == pytest.approx(hf_nll(model, wins, swapped), rel=1e-5)
    statuses = {t["status"] for r in sorted(rounds_dir(tmp_path / "k2.json").glob("round_*.json"))
                for t in json.loads(r.read_text())["tried"]}
    if not early_stop:
        assert len(finished) == len(first["tried"]) and statuses == {"done"}
    elif bound:  # 8 head columns of 96 (a vocabulary of 2N or more)
        assert "bounded" in statuses
    else:
        assert statuses <= {"done", "stopped"}


def test_evolution_finds_the_best_and_never_rises(built, tmp_path):
    model, wins, start, best, best_nll = built
    pm = PrunableModel.wrap(model)
    settings = RefineSettings("evolution", offspring=4, selection=((1, 2),), seed=0)
    record = refine(pm, wins, start, settings, {"model_hash": "m", "calibration_hash": "c"}, tmp_path / "k2.json",
                    rounds=6, kinds=("attn", "mlp"), progress=False)
    assert sorted(record["removed"]) == best
    assert record["nll_sum"] == pytest.approx(best_nll, rel=1e-5)
    nlls = [r["incumbent_nll_sum"] for r in record["search"]["rounds"]]
    assert nlls == sorted(nlls, reverse=True) and nlls[0] == start["nll_sum"]
    for r in record["search"]["rounds"]:  # a generation keeps the kinds' counts
        after = r["after"] or r["before"]
        assert sorted(parse_block(b)[0] for b in after) == sorted(parse_block(b)[0] for b in start["removed"])


def test_rounds_resume_and_refuse_other_settings(built, tmp_path):
    model, wins, start, best, _ = built
    pm = PrunableModel.wrap(model)
    out = tmp_path / "k2.json"
    one = refine(pm, wins, start, RefineSettings("swap"), {}, out, rounds=1, kinds=("attn", "mlp"), progress=False)
    assert len(one["search"]["rounds"]) == 1
    again = refine(pm, wins, start, RefineSettings("swap"), {}, out, rounds=5, kinds=("attn", "mlp"), progress=False)
    assert sorted(again["removed"]) == best
    first = json.loads((rounds_dir(out) / "round_1.json").read_text())
    assert again["search"]["rounds"][0]["cost"] == first["cost"]  # round 1 was read, not run again
    from blockpruner.errors import UserError
    with pytest.raises(UserError, match="--fresh"):
        refine(pm, wins, start, RefineSettings("swap", holdout_windows=1), {}, out, rounds=5, kinds=("attn", "mlp"),
               progress=False)


@pytest.mark.parametrize("method", ["swap", "evolution"])
def test_a_round_stopped_midway_resumes_from_its_journal(built, tmp_path, monkeypatch, caplog, method):
    """A round killed after some units of work reruns from its journal: the same rounds, the
    units recorded before the kill not scored again."""
    from blockpruner.search import journal as journal_module

    model, wins, start, _, _ = built
    pm = PrunableModel.wrap(model)
    settings = RefineSettings(method, offspring=4, selection=((1, 2),))
    whole = refine(pm, wins, start, settings, {}, tmp_path / "whole.json", rounds=2, kinds=("attn", "mlp"),
                   progress=False)
    put, seen = journal_module.Journal.put, []

    def killed(self, unit, state):
        put(self, unit, state)
        seen.append(unit)
        if len(seen) == 6:
            raise KeyboardInterrupt  # as a kill -9 would leave it: the units so far on disk

    monkeypatch.setattr(journal_module.Journal, "put", killed)
    out = tmp_path / "k2.json"
    with pytest.raises(KeyboardInterrupt):
        refine(pm, wins, start, settings, {}, out, rounds=2, kinds=("attn", "mlp"), progress=False)
    monkeypatch.undo()
    assert (rounds_dir(out) / "round_1.json.journal").exists() and not (rounds_dir(out) / "round_1.json").exists()
    with caplog.at_level("INFO", logger="blockpruner.search"):
        again = refine(pm, wins, start, settings, {}, out, rounds=2, kinds=("attn", "mlp"), progress=False)
    assert "6 units of work recorded" in caplog.text
    assert not (rounds_dir(out) / "round_1.json.journal").exists()
    for j in (1, 2):
        a, b = (json.loads((rounds_dir(p) / f"round_{j}.json").read_text()) for p in (tmp_path / "whole.json", out))
        for r in (a, b):
            del r["timing"], r["cost"], r["checksum"]
        assert a == b
    assert again["removed"] == whole["removed"] and again["nll_sum"] == whole["nll_sum"]


def test_holdout_guard_judges_on_windows_it_did_not_select_on(built, tmp_path):
    model, wins, start, best, _ = built
    pm = PrunableModel.wrap(model)
    record = refine(pm, wins, start, RefineSettings("swap", holdout_windows=1), {}, tmp_path / "k2.json", rounds=5,
                    kinds=("attn", "mlp"), progress=False)
    first = json.loads((rounds_dir(tmp_path / "k2.json") / "round_1.json").read_text())
    judge, swap = first["judge"], first["best"]
    after = [swap["in"] if b == swap["out"] else b for b in start["removed"]]
    assert judge["before_nll_sum"] == pytest.approx(hf_nll(model, wins[3:], start["removed"]), rel=1e-5)
    assert judge["after_nll_sum"] == pytest.approx(hf_nll(model, wins[3:], after), rel=1e-5)
    assert judge["accepted"] == (judge["after_nll_sum"] < judge["before_nll_sum"])
    assert first["incumbent"]["tokens"] == 3 * 15  # the first three windows select
    assert record["tokens"] == 4 * 15  # the result is scored on every window, as a step is
    assert record["nll_sum"] == pytest.approx(hf_nll(model, wins, record["removed"]), rel=1e-5)


def test_mixed_swaps_never_grow_the_model(built):
    from blockpruner.search.refine import swap_candidates

    model, *_ = built
    pm = PrunableModel.wrap(model)
    removed = ["attn.1", "mlp.3"]
    floor = pm.param_summary(removed)["removed"]
    same = swap_candidates(pm, removed, "attn.1", ("attn", "mlp"), False, floor)
    mixed = swap_candidates(pm, removed, "attn.1", ("attn", "mlp"), True, floor)
    assert same == ["attn.0", "attn.2", "attn.3"]
    assert mixed == ["attn.0", "attn.2", "attn.3", "mlp.0", "mlp.1", "mlp.2"]  # an MLP block is larger here
    assert swap_candidates(pm, removed, "mlp.3", ("attn", "mlp"), True, floor) == ["mlp.0", "mlp.1", "mlp.2"]
    for c in mixed:
        assert pm.param_summary(["mlp.3", c])["removed"] >= floor


def test_mutation_keeps_kinds_and_flips_at_most_m():
    import random

    rng = random.Random(0)
    parent = ["attn.1", "mlp.2", "mlp.5"]
    for _ in range(200):
        child = mutate(parent, 8, ("attn", "mlp"), rng, 3)
        assert len(set(child)) == 3
        assert sorted(parse_block(b)[0] for b in child) == ["attn", "mlp", "mlp"]
        assert len(set(child) - set(parent)) <= 3
    assert all(parse_block(b)[0] == "mlp" or b == "attn.1" for b in mutate(parent, 8, ("mlp",), rng, 3))


def test_cli_refuses_bad_input_before_loading(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "blockpruner.cli", "refine", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True)

    p = run("--model", tmp_path / "nowhere", "--calib", tmp_path, "--step", tmp_path / "s.json", "--out", tmp_path / "o",
            "--selection", "1-4")
    assert p.returncode == 2 and "bad --selection" in p.stderr and "1:4,3:2" in p.stderr
    p = run("--model", tmp_path, "--calib", tmp_path, "--out", tmp_path / "o")
    assert p.returncode == 2 and "--step FILE" in p.stderr


# ---------------------------------------------------------------- in the workflow


def refine_study(tmp_path):
    """A workflow copy with a study of greedy, its swap refinement and its evolutionary
    refinement at K = 2 on the cancelling model, with calibration windows it predicts well."""
    import yaml

    from .test_workflow import copy_workflow

    model_dir = tmp_path / "cancel"
    model = cancelling_model()
    model.save_pretrained(model_dir)
    from .conftest import word_tokenizer
    word_tokenizer(whitespace=True).save_pretrained(model_dir)
    text = [" ".join(f"t{int(i)}" for i in w) for w in sampled_windows(model, n=4, t=24)]
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in text))
    main = copy_workflow(tmp_path / "wf")
    cfg = {
        "data_root": str(tmp_path), "device": "cpu",
        "models": {"tiny": {"source": str(model_dir), "dtype": "fp32"}},
        "calibration": {"c": {"path": str(calib), "nsamples": 4, "seed": 42, "seqlen": 16, "mode": "concat"}},
        "methods": {"bp": {"algorithm": "blockpruner"},
                    "bp-swap": {"refine": "swap", "from": "bp", "settings": {"rounds": 4}},
                    "bp-evo": {"refine": "evolution", "from": "bp",
                               "settings": {"rounds": 3, "offspring": 4, "selection": [[1, 2]]}}},
        "search": {"max_k": 2},
        "prunings": {"k": [2], "ratio": []},
        "analyses": {"enabled": False},
        "evaluate": {"dense": False, "perplexity": {"enabled": True, "path": str(calib), "seqlen": 16, "max_windows": 2},
                     "tasks": {"enabled": False}, "speed": {"enabled": False}},
    }
    (main / ".test" / "refine.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return main, ".test/refine.yaml"


def test_workflow_refines_materialises_and_summarises(tmp_path):
    import csv

    from blockpruner.steps import read_step

    from .test_workflow import run_snakemake

    main, cfg = refine_study(tmp_path)
    run_snakemake(main, "--cores", "2", "--resources", "gpu=0", "--configfile", cfg, timeout=900)
    res = main / "results"
    greedy = read_step(res / "search/tiny/c/bp/step_2.json")
    rows = {r["method"]: r for r in csv.DictReader(open(res / "summary.csv"))}
    assert set(rows) == {"bp", "bp-swap", "bp-evo"}
    for method in ("bp-swap", "bp-evo"):
        refined = read_step(res / f"refine/tiny/c/{method}/k2.json")
        assert refined["k"] == 2 and refined["ppl"] <= greedy["ppl"]
        assert rows[method]["removed_blocks"] == " ".join(refined["removed"])
        assert rows[method]["k"] == "2" and float(rows[method]["ratio"]) == pytest.approx(greedy["params"]["ratio"])
        manifest = json.loads((res / f"pruned/tiny/c/{method}/k2/manifest.json").read_text())
        assert manifest["pruning"]["removed"] == refined["removed"]
        assert "then refined at the same number of blocks" in (res / f"pruned/tiny/c/{method}/k2/README.md").read_text()
        assert (main / f"logs/refine_set/tiny/c/{method}/k2.log").exists()
    # the rounds stay beside the refined set (not an output: a rerun of the job continues from them)
    assert sorted(p.name for p in (res / "refine/tiny/c/bp-evo/k2.json.rounds").iterdir()) == \
        ["round_1.json", "round_2.json", "round_3.json"]


@pytest.mark.parametrize("change,key,message", [
    (lambda m: m["bp-swap"].update({"from": "nothing"}), "methods.bp-swap.from", "one of: bp"),
    (lambda m: m["bp-swap"].update({"settings": {"offspring": 4}}), "methods.bp-swap.settings", "unknown offspring"),
    (lambda m: m["bp-swap"].update({"refine": "anneal"}), "refine", "'anneal' is not one of"),
    (lambda m: m["bp"].update({"from": "bp"}), "methods.bp.from", "only a refinement"),
])
def test_workflow_refuses_bad_refinements(tmp_path, change, key, message):
    import yaml

    from .test_workflow import run_snakemake

    main, cfg = refine_study(tmp_path)
    data = yaml.safe_load((main / cfg).read_text())
    change(data["methods"])
    (main / cfg).write_text(yaml.safe_dump(data, sort_keys=False))
    p = run_snakemake(main, "-n", "--configfile", cfg, check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and key in out and message in out, out[-3000:]
