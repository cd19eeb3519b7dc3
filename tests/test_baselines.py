"""Baselines and analyses against direct computations written out here.

References are independent of the package's state caching: forward hooks on a separately
built copy of the model (BI, RM), full HF forwards and an explicit float64 JS formula (JS),
brute-force removal + the model's own loss (perplexity methods).
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from blockpruner.blocks import PrunableModel, tie_order
from blockpruner.errors import UserError
from blockpruner.report import analyses
from blockpruner.search.baselines import METHODS, baseline_step, settings_for
from blockpruner.search.greedy import StepSettings
from blockpruner.steps import read_step, write_step
from blockpruner.search.importance import js_scores, js_to_dense, residual_metrics

from .conftest import tiny_model
from .test_export import tensor_names
from .test_search import hf_nll, windows

MID_NORM = {"llama": "post_attention_layernorm", "gemma3_text": "pre_feedforward_layernorm",
            "gemma2": "pre_feedforward_layernorm"}
BASELINES = [m for m in METHODS if m != "blockpruner"]
LAYER_METHODS = {"layer", "shortgpt", "relative-magnitude"}  # remove whole layers (attention + MLP) per step


# ---------------------------------------------------------------- references


@torch.no_grad()
def hook_metrics(model, wins, arch) -> dict[str, dict[str, float]]:
    """BI and RM of every block and layer from forward hooks on the HF model: layer input,
    the input of the MLP's pre-norm (= residual after attention) and layer output."""
    rec: dict = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def pre(mod, args, kwargs, i=i):
            rec[(i, "in")] = args[0] if args else kwargs["hidden_states"]

        def post(mod, args, kwargs, out, i=i):
            rec[(i, "out")] = out[0] if isinstance(out, tuple) else out

        def mid(mod, args, i=i):
            rec[(i, "mid")] = args[0]

        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True),
                    layer.register_forward_hook(post, with_kwargs=True),
                    getattr(layer, MID_NORM[arch]).register_forward_pre_hook(mid)]
    sums: dict = {}
    n = 0
    try:
        for w in wins:
            rec.clear()
            model(w.unsqueeze(0))
            for i in range(len(model.model.layers)):
                x, y = rec[(i, "in")].double(), rec[(i, "out")].double()
                m = rec.get((i, "mid"), rec[(i, "out")]).double()  # no MLP-norm call: MLP removed
                for unit, a, b in ((f"attn.{i}", x, m), (f"mlp.{i}", m, y), (f"layer.{i}", x, y)):
                    bi = (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).sum().item()
                    rm = ((b - a).norm(dim=-1) / b.norm(dim=-1)).sum().item()
                    s = sums.setdefault(unit, [0.0, 0.0])
                    s[0] += bi
                    s[1] += rm
            n += len(w)
    finally:
        for h in handles:
            h.remove()
    return {"bi": {u: s[0] / n for u, s in sums.items()}, "rm": {u: s[1] / n for u, s in sums.items()}}


@torch.no_grad()
def direct_js(pruned_model, dense_model, wins) -> float:
    """Mean over positions of JS(P_dense, P_pruned), written out in float64 probabilities."""
    total, n = 0.0, 0
    for w in wins:
        p = torch.softmax(dense_model(w.unsqueeze(0)).logits.double(), -1)
        q = torch.softmax(pruned_model(w.unsqueeze(0)).logits.double(), -1)
        m = (p + q) / 2
        js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
        total += js.sum().item()
        n += len(w)
    return total / n


def run_chain(pm, wins, method, k, candidates="all"):
    settings = settings_for(method, candidates)
    removed, prev, out = [], None, []
    for i in range(1, k + 1):
        rec = baseline_step(pm, wins, i, removed, settings, {}, prev=prev, progress=False)
        assert rec["removed"][: len(removed)] == removed
        removed, prev = rec["removed"], rec
        out.append(rec)
    return out


def make_identity(pm, i):
    """Zero layer i's attention output and MLP down projections: the layer returns its input."""
    with torch.no_grad():
        pm.layers[i].self_attn.o_proj.weight.zero_()
        pm.layers[i].mlp.down_proj.weight.zero_()


# ---------------------------------------------------------------- metrics


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_identity_layer_has_zero_bi_and_rm(arch):
    pm = PrunableModel.wrap(tiny_model(arch, num_hidden_layers=4))
    make_identity(pm, 2)
    m = residual_metrics(pm, windows(n=2))
    for unit in ("layer.2", "attn.2", "mlp.2"):
        assert abs(m["bi"][unit].value) < 1e-6 and abs(m["rm"][unit].value) < 1e-6, unit
    for unit in ("layer.0", "layer.1", "layer.3", "mlp.1"):
        assert m["bi"][unit].value > 1e-5 and m["rm"][unit].value > 1e-3, unit
    # every layer-level and block-level method removes the identity first
    for method in ("shortgpt", "relative-magnitude"):
        assert run_chain(pm, windows(n=2), method, 1)[0]["removed"] == ["attn.2", "mlp.2"]
    for method in ("bi-block", "rm-block", "js"):
        assert run_chain(pm, windows(n=2), method, 1)[0]["removed_block"] in ("attn.2", "mlp.2")


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_bi_rm_equal_forward_hook_reference(arch):
    wins = windows(n=3, t=10, seed=4)
    pm = PrunableModel.wrap(tiny_model(arch, seed=1, num_hidden_layers=3))
    got = residual_metrics(pm, wins)
    want = hook_metrics(tiny_model(arch, seed=1, num_hidden_layers=3), wins, arch)  # an unwrapped copy
    assert set(got["bi"]) == set(want["bi"]) == {f"{k}.{i}" for k in ("attn", "mlp", "layer") for i in range(3)}
    for metric in ("bi", "rm"):
        for unit, value in want[metric].items():
            assert got[metric][unit].value == pytest.approx(value, rel=1e-5, abs=1e-7), (metric, unit)
    # with a block removed, the metrics describe the model as it stands (hooks on the wrapped model)
    pm.remove(["attn.1"])
    got = residual_metrics(pm, wins)
    want = hook_metrics(pm.model, wins, arch)
    from blockpruner.search.importance import layer_influence  # the search's BI screening agrees

    assert layer_influence(pm, wins) == pytest.approx({i: got["bi"][f"layer.{i}"].value for i in range(3)}, rel=1e-9)
    assert abs(got["bi"]["attn.1"].value) < 1e-12  # removed: output = input
    for unit in ("mlp.1", "layer.1", "attn.2", "layer.2"):
        assert got["bi"][unit].value == pytest.approx(want["bi"][unit], rel=1e-5), unit
        assert got["rm"][unit].value == pytest.approx(want["rm"][unit], rel=1e-5), unit


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: final logit soft-capping
def test_js_zero_on_dense_and_equal_to_direct(arch):
    wins = windows(n=2, t=9, seed=2)
    pm = PrunableModel.wrap(tiny_model(arch, seed=6, num_hidden_layers=3))
    dense = tiny_model(arch, seed=6, num_hidden_layers=3)
    assert abs(js_to_dense(pm, wins).value) < 1e-9
    with pm.without(["attn.1"]):
        want = direct_js(pm.model, dense, wins)
        assert js_to_dense(pm, wins).value == pytest.approx(want, rel=1e-5)
    assert want > 1e-6
    assert js_scores(pm, wins, ["attn.1"])["attn.1"].value == pytest.approx(want, rel=1e-5)
    # on a pruned model a candidate is compared with the DENSE model, not the current one
    pm.remove(["mlp.0"])
    with pm.without(["mlp.2"]):
        want2 = direct_js(pm.model, dense, wins)
    got = js_scores(pm, wins, ["attn.1", "mlp.2"])
    assert got["mlp.2"].value == pytest.approx(want2, rel=1e-5)
    assert pm.removed == ["mlp.0"]


# ---------------------------------------------------------------- methods


def test_oneshot_is_the_sorted_dense_single_removal_ranking():
    model = tiny_model("llama", seed=3, num_hidden_layers=4)
    wins = windows(n=3, t=10, seed=1)
    pm = PrunableModel.wrap(model)
    dense = {}
    for b in pm.names:
        with pm.without([b]):
            dense[b] = hf_nll(model, wins)
    want = sorted(pm.names, key=lambda b: (dense[b], tie_order(b)))
    steps = run_chain(pm, wins, "oneshot", 5)
    assert [s["block"] for s in steps[0]["scores"]] == want
    for k, s in enumerate(steps, 1):
        assert s["removed"] == want[:k] and s["removed_block"] == want[k - 1]
        assert s["scores"] == steps[0]["scores"]  # one ranking, carried along
        pm.set_removed(s["removed"])
        assert s["nll_sum"] == pytest.approx(hf_nll(model, wins), rel=1e-5)  # ppl of the pruned model itself
    pm.set_removed([])
    assert steps[0]["nll_sum"] == pytest.approx(dense[want[0]], rel=1e-5)
    # steps after the first score nothing: one pass of the pruned model for its perplexity
    assert steps[1]["cost"]["head_tokens"] == 3 * 9 and steps[1]["timing"]["select_s"] == 0.0
    assert steps[4]["timing"]["pruning_s"] == steps[0]["timing"]["pruning_s"]
    # candidate sets: only MLP blocks ranked
    mlp = run_chain(pm, wins, "oneshot", 2, "mlp")
    assert [s["block"] for s in mlp[0]["scores"]] == [b for b in want if b.startswith("mlp")]
    assert mlp[1]["removed"] == [b for b in want if b.startswith("mlp")][:2]


def test_layer_method_equals_brute_force_over_layers():
    model = tiny_model("gemma3_text", seed=5, num_hidden_layers=4)
    wins = windows(n=3, t=10, seed=3)
    pm = PrunableModel.wrap(model)
    removed = []
    for _ in range(2):  # greedy over whole layers, written out
        best = None
        for i in range(4):
            if f"attn.{i}" in removed:
                continue
            pm.set_removed(removed + [f"attn.{i}", f"mlp.{i}"])
            nll = hf_nll(model, wins)
            if best is None or nll < best[0]:
                best = (nll, i)
        removed += [f"attn.{best[1]}", f"mlp.{best[1]}"]
        last = best[0]
    pm.set_removed([])
    steps = run_chain(pm, wins, "layer", 2)
    assert steps[1]["removed"] == removed
    assert steps[0]["removed_block"] == f"layer.{removed[0][5:]}" and steps[0]["removed_blocks"] == removed[:2]
    assert steps[1]["nll_sum"] == pytest.approx(last, rel=1e-5)
    assert (steps[1]["attn_removed"], steps[1]["mlp_removed"]) == (2, 2)
    assert steps[1]["params"]["removed"] == sum(pm.block_params(b) for b in removed)
    assert len(steps[1]["scores"]) == 3 and steps[1]["timing"]["pruning_s"] >= steps[0]["timing"]["pruning_s"]


@pytest.mark.parametrize("method,metric", [("shortgpt", "bi"), ("relative-magnitude", "rm")])
def test_layer_metric_oneshot_ranks_dense_layers(method, metric):
    wins = windows(n=2, t=10, seed=7)
    pm = PrunableModel.wrap(tiny_model("llama", seed=2, num_hidden_layers=4))
    ref = hook_metrics(tiny_model("llama", seed=2, num_hidden_layers=4), wins, "llama")[metric]
    order = sorted(range(4), key=lambda i: ref[f"layer.{i}"])
    steps = run_chain(pm, wins, method, 3)
    assert [s["removed_block"] for s in steps] == [f"layer.{i}" for i in order[:3]]
    assert steps[2]["removed"] == [b for i in order[:3] for b in (f"attn.{i}", f"mlp.{i}")]
    for s in steps[0]["scores"]:
        assert s["value"] == pytest.approx(ref[s["block"]], rel=1e-5)
    pm.set_removed(steps[1]["removed"])
    assert steps[1]["nll_sum"] == pytest.approx(hf_nll(pm.model, wins), rel=1e-5)


@pytest.mark.parametrize("method,metric", [("bi-block", "bi"), ("rm-block", "rm")])
def test_iterative_block_metrics_rescore_the_current_model(method, metric):
    wins = windows(n=2, t=10, seed=8)
    model = tiny_model("llama", seed=4, num_hidden_layers=3)
    pm = PrunableModel.wrap(model)
    steps = run_chain(pm, wins, method, 3)
    removed = []
    for s in steps:  # each step: the lowest metric among remaining blocks, on the model as it stands
        pm.set_removed(removed)
        ref = hook_metrics(model, wins, "llama")[metric]
        left = [b for b in pm.names if b not in removed]
        assert s["removed_block"] == min(left, key=lambda b: (ref[b], tie_order(b)))
        assert {x["block"]: x["value"] for x in s["scores"]} == pytest.approx({b: ref[b] for b in left}, rel=1e-5)
        removed = s["removed"]
    attn = run_chain(pm, wins, method, 2, "attn")
    assert all(b.startswith("attn") for b in attn[1]["removed"])


def test_js_method_removes_the_lowest_direct_js():
    wins = windows(n=2, t=9, seed=9)
    model = tiny_model("llama", seed=7, num_hidden_layers=3)
    dense = tiny_model("llama", seed=7, num_hidden_layers=3)
    pm = PrunableModel.wrap(model)
    steps = run_chain(pm, wins, "js", 2)
    pm.set_removed(steps[0]["removed"])
    ref = {}
    for b in [n for n in pm.names if n not in steps[0]["removed"]]:
        with pm.without([b]):
            ref[b] = direct_js(model, dense, wins)
    assert steps[1]["removed_block"] == min(ref, key=lambda b: (ref[b], tie_order(b)))
    assert steps[1]["metric"]["value"] == pytest.approx(ref[steps[1]["removed_block"]], rel=1e-5)


def test_settings_and_budget_errors():
    with pytest.raises(UserError, match="unknown method 'slicegpt'; use one of: blockpruner, oneshot, layer, shortgpt"):
        settings_for("slicegpt")
    with pytest.raises(UserError, match="takes --candidates all"):
        settings_for("shortgpt", "attn")
    with pytest.raises(UserError, match="unknown candidate set"):
        settings_for("bi-block", "ffn")
    assert settings_for("blockpruner") == StepSettings()
    pm = PrunableModel.wrap(tiny_model("llama", num_hidden_layers=2))
    wins = windows(n=1)
    with pytest.raises(UserError, match="no whole layers left"):
        baseline_step(pm, wins, 2, ["attn.0", "mlp.1"], settings_for("layer"), {}, progress=False)
    steps = run_chain(pm, wins, "shortgpt", 2)
    with pytest.raises(UserError, match="has only 2 removable units"):
        baseline_step(pm, wins, 3, steps[1]["removed"], settings_for("shortgpt"), {}, prev=steps[1], progress=False)


# ---------------------------------------------------------------- CLI and artifacts


@pytest.fixture
def study3(tmp_path):
    """A prepared 3-layer llama and a calibration artifact for it."""
    from blockpruner.data.calibration import CalibrationSpec, sample_calibration
    from blockpruner.model_dir import write_manifest

    from .conftest import word_tokenizer
    from .test_calibration import CharTokenizer

    model = tiny_model("llama", seed=2, num_hidden_layers=3)
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    word_tokenizer().save_pretrained(mdir)  # materialisation copies it
    write_manifest(mdir, model, source="test", dtype="fp32")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"line {i} of calibration text" for i in range(30)))
    sample_calibration(CalibrationSpec(str(text), nsamples=10, seqlen=24, max_windows=2), CharTokenizer(), tmp_path / "calib")
    return tmp_path


def cli(args, capsys):
    from blockpruner.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip()


def one_line_error(code, err, pattern):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("blockpruner: error:")]
    assert len(lines) == 1 and pattern in lines[0], err


def test_cli_every_method_chains_and_materialises(study3, capsys, monkeypatch):
    from blockpruner import load_pruned
    from blockpruner.data.calibration import load_calibration
    from blockpruner.export.materialize import materialize

    t = study3
    common = ["--model", t / "model", "--calib", t / "calib", "--device", "cpu", "--no-progress"]
    wins = load_calibration(t / "calib").windows
    for method in BASELINES:
        d = t / "search" / "m" / "c" / method
        assert cli(["baseline-step", *common, "--method", method, "--k", 1, "--out", d / "step_1.json"], capsys)[0] == 0
        assert cli(["baseline-step", *common, "--method", method, "--k", 2, "--prev", d / "step_1.json",
                    "--out", d / "step_2.json"], capsys)[0] == 0
        s1, s2 = read_step(d / "step_1.json"), read_step(d / "step_2.json")
        assert s1["settings"]["method"] == s2["settings"]["method"] == method
        assert s2["settings"]["metric"] == METHODS[method].metric
        assert s2["removed"][: len(s1["removed"])] == s1["removed"]
        assert len(s2["removed"]) == (4 if method in LAYER_METHODS else 2)
        assert s2["inputs"]["previous_step"] == str(d / "step_1.json")
        out = materialize(t / "model", d / "step_2.json", t / "pruned" / method, method=method)
        # which (attention, MLP) blocks each kept layer should still hold, from the removal list alone
        want = [(f"attn.{i}" not in s2["removed"], f"mlp.{i}" not in s2["removed"]) for i in range(3)]
        want = [kept for kept in want if any(kept)]
        # K = 2 is two whole layers for the layer-level methods, two blocks (at most one layer emptied) otherwise
        same_layer = len({b.split(".")[1] for b in s2["removed"]}) == 1
        assert len(want) == (1 if method in LAYER_METHODS else 2 if same_layer else 3)
        names = tensor_names(t / "pruned" / method)
        got = [(any(n.startswith(f"model.layers.{j}.self_attn.") for n in names),
                any(n.startswith(f"model.layers.{j}.mlp.") for n in names)) for j in range(4)]
        assert got == want + [(False, False)] * (4 - len(want))
        assert out["layers"] == len(want)
        # the step's calibration perplexity is the materialised model's
        pruned = load_pruned(t / "pruned" / method)
        assert s2["nll_sum"] == pytest.approx(hf_nll(pruned, wins), rel=1e-5)
    chains = analyses.Study([t / "search"]).chains
    assert sorted(k[2] for k in chains) == sorted(BASELINES)

    from .test_cli import forbid_model_loading

    forbid_model_loading(monkeypatch)
    d = t / "search" / "m" / "c"
    code, err = cli(["baseline-step", *common, "--method", "slicegpt", "--k", 1, "--out", t / "x.json"], capsys)
    one_line_error(code, err, "unknown method 'slicegpt'; use one of: blockpruner, oneshot, layer, shortgpt, "
                              "relative-magnitude, bi-block, rm-block, js")
    code, err = cli(["baseline-step", *common, "--method", "bi-block", "--k", 3, "--prev", d / "rm-block" / "step_2.json",
                     "--out", t / "x.json"], capsys)
    one_line_error(code, err, "made with settings")
    code, err = cli(["baseline-step", *common, "--method", "layer", "--candidates", "attn", "--k", 1, "--out", t / "x.json"],
                    capsys)
    one_line_error(code, err, "takes --candidates all")
    code, err = cli(["baseline-step", *common, "--method", "oneshot", "--k", 2, "--out", t / "x.json"], capsys)
    one_line_error(code, err, "needs --prev")
    assert not (t / "x.json").exists()


def test_cli_layer_budget_refused_before_loading(study3, capsys, monkeypatch):
    from .test_cli import forbid_model_loading

    t = study3
    common = ["--model", t / "model", "--calib", t / "calib", "--device", "cpu", "--no-progress"]
    for k in (1, 2, 3):
        prev = ["--prev", t / f"step_{k - 1}.json"] if k > 1 else []
        assert cli(["baseline-step", *common, "--method", "shortgpt", "--k", k, *prev, "--out", t / f"step_{k}.json"],
                   capsys)[0] == 0
        assert cli(["baseline-step", *common, "--method", "layer", "--k", k, *[str(x).replace("step_", "layer_") for x in prev],
                    "--out", t / f"layer_{k}.json"], capsys)[0] == 0
    forbid_model_loading(monkeypatch)
    code, err = cli(["baseline-step", *common, "--method", "layer", "--k", 4, "--prev", t / "layer_3.json",
                     "--out", t / "layer_4.json"], capsys)
    one_line_error(code, err, "no whole layers left to remove (the model has 3 layers)")
    code, err = cli(["baseline-step", *common, "--method", "shortgpt", "--k", 4, "--prev", t / "step_3.json",
                     "--out", t / "step_4.json"], capsys)
    one_line_error(code, err, "has only 3 removable units")
    # an edited ranking is caught by the checksum before anything else
    s = json.loads((t / "step_3.json").read_text())
    s["scores"].reverse()
    (t / "edited.json").write_text(json.dumps(s))
    code, err = cli(["baseline-step", *common, "--method", "shortgpt", "--k", 4, "--prev", t / "edited.json",
                     "--out", t / "step_4.json"], capsys)
    one_line_error(code, err, "checksum mismatch")


# ---------------------------------------------------------------- analyses


def fake_step(k, removed, attn, ratio_per_block, method, elapsed=1.0, pruning=None, ppl=None):
    rec = {"k": k, "removed_block": removed[-1], "ppl": ppl if ppl is not None else 10.0 + k, "removed": removed,
           "attn_removed": attn, "mlp_removed": len(removed) - attn,
           "params": {"ratio": ratio_per_block * len(removed), "ratio_no_embed": 2 * ratio_per_block * len(removed),
                      "removed": len(removed), "total": 100, "remaining": 100 - len(removed), "total_no_embed": 50},
           "scores": [], "settings": {"method": method, "metric": "ppl", "candidates": "all", "mode": "exact"},
           "inputs": {}, "cost": {"block_forwards": 10, "head_tokens": 5, "window_passes": 1},
           "timing": {"elapsed_s": elapsed} | ({"pruning_s": pruning} if pruning is not None else {})}
    return rec


@pytest.fixture
def fake_study(tmp_path):
    """Two searches (block-level bp: 1 block / step; layer-level sg: 2 blocks / step) on two
    calibration sets, with WikiText-2 and task evaluations of some K."""
    from blockpruner.artifacts import write_json
    from blockpruner.eval.wikitext import write_ppl
    from blockpruner.eval.zeroshot import write_tasks

    root = tmp_path / "results"
    bp = ["attn.3", "attn.2", "mlp.3", "attn.1"]
    sg = ["attn.3", "mlp.3", "attn.2", "mlp.2"]
    for calib, n in (("alpaca", 32), ("wiki", 128)):
        cdir = tmp_path / "calibs" / calib
        write_json(cdir / "manifest.json", {"source": f"/data/{calib}.json", "nsamples": n, "seqlen": 64, "windows": 2,
                                            "tokens": 128}, "blockpruner.calibration/1")
        for k in range(1, 5):
            rec = fake_step(k, bp[:k], sum(b.startswith("attn") for b in bp[:k]), 0.05, "blockpruner", elapsed=2.0,
                            ppl=10 + k + (n == 128))
            rec["inputs"] = {"calibration": str(cdir)}
            write_step(root / "search" / "m" / calib / "bp" / f"step_{k}.json", rec)
        for k in (1, 2):
            rec = fake_step(k, sg[: 2 * k], k, 0.05, "shortgpt", elapsed=0.5, pruning=3.0)
            rec["inputs"] = {"calibration": str(cdir)}
            write_step(root / "search" / "m" / calib / "sg" / f"step_{k}.json", rec)
    ev = root / "eval" / "m"
    write_ppl(ev / "dense" / "ppl.json", {"ppl": 9.0})
    write_tasks(ev / "dense" / "tasks.json", {"tasks": {"piqa": {"value": 0.7}, "arc_easy": {"value": 0.6}}, "average": 0.65})
    write_ppl(ev / "alpaca" / "bp" / "k2" / "ppl.json", {"ppl": 12.0})
    write_tasks(ev / "alpaca" / "bp" / "r0.2" / "tasks.json",  # -> K = 4 (ratio 0.2)
                {"tasks": {"piqa": {"value": 0.6}, "arc_easy": {"value": 0.5}}, "average": 0.55})
    write_ppl(ev / "alpaca" / "sg" / "k2" / "ppl.json", {"ppl": 20.0})
    write_ppl(ev / "wiki" / "bp" / "k4" / "ppl.json", {"ppl": 13.0})
    return tmp_path


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_match_budgets():
    steps = {"bp": [{"k": k, "params": {"ratio": 0.05 * k}} for k in range(1, 9)],
             "sg": [{"k": k, "params": {"ratio": 0.1 * k}} for k in range(1, 5)]}
    # Table 1's rule: the smallest K removing at least the target (never the nearest below it)
    assert analyses.match_budgets(steps, 0.26) == {"bp": 6, "sg": 3}
    assert analyses.match_budgets(steps, 0.25) == {"bp": 5, "sg": 3}
    assert analyses.match_budgets(steps, 0.36) == {"bp": 8, "sg": 4}
    assert analyses.match_budgets(steps, 0.41) == {}  # neither search reaches it: both left out
    with pytest.raises(UserError, match="between 0 and 1"):
        analyses.match_budgets(steps, 25)


def test_metrics_vs_ratio(fake_study):
    t = fake_study
    rows = analyses.metrics_vs_ratio([t / "results"], t / "r.csv", t / "r.png")
    got = read_csv(t / "r.csv")
    assert len(got) == len(rows) == 2 * (5 + 3)  # per calib: bp k=0..4, sg k=0..2
    by = {(r["calib"], r["method"], int(r["k"])): r for r in got}
    assert by[("alpaca", "bp", 2)]["wikitext2_ppl"] == "12.0" and by[("alpaca", "bp", 2)]["ratio"] == "0.1"
    assert by[("alpaca", "bp", 4)]["average"] == "0.55" and by[("alpaca", "bp", 4)]["piqa"] == "0.6"
    assert by[("alpaca", "bp", 3)]["wikitext2_ppl"] == ""
    assert by[("alpaca", "sg", 0)]["wikitext2_ppl"] == "9.0" and by[("alpaca", "sg", 0)]["calib_ppl"] == ""
    assert by[("alpaca", "sg", 2)]["wikitext2_ppl"] == "20.0" and by[("alpaca", "sg", 2)]["ratio"] == "0.2"
    assert by[("wiki", "bp", 4)]["wikitext2_ppl"] == "13.0"
    assert float(by[("alpaca", "bp", 3)]["pruning_s"]) == 6.0 and float(by[("alpaca", "sg", 1)]["pruning_s"]) == 3.0
    assert is_png(t / "r.png")


def test_attention_share_and_time(fake_study):
    t = fake_study
    rows = analyses.attention_share([t / "results" / "search", t / "results" / "search" / "m" / "wiki" / "bp" / "step_1.json"],
                                    t / "a.csv", t / "a.png")
    assert [(r["method"], r["k"], r["attn_share"]) for r in rows if r["calib"] == "alpaca"] == [
        ("bp", 1, 1.0), ("bp", 2, 1.0), ("bp", 3, 2 / 3), ("bp", 4, 0.75), ("sg", 1, 0.5), ("sg", 2, 0.5)]
    assert len(read_csv(t / "a.csv")) == 12 and is_png(t / "a.png")
    rows = analyses.pruning_time([t / "results" / "search"], t / "t.csv", t / "t.png", ratio=0.15)
    got = {(r["calib"], r["method"]): (r["k"], r["pruning_s"]) for r in rows}
    assert got[("alpaca", "bp")] == (3, 6.0)  # 3 search steps of 2 s
    assert got[("alpaca", "sg")] == (2, 3.0)  # ratio 0.1 is below 0.15 -> K = 2; the one ranking pass
    assert len(read_csv(t / "t.csv")) == 4 and is_png(t / "t.png")


def test_calibration_effect(fake_study):
    t = fake_study
    rows = analyses.calibration_effect([t / "results"], t / "c.csv", t / "c.png", ratio=0.2)
    got = read_csv(t / "c.csv")
    assert len(got) == len(rows) == 16
    matched = {(r["calib"], r["method"]): r for r in got if r["matched"] == "True"}
    assert set(matched) == {(c, m) for c in ("alpaca", "wiki") for m in ("bp", "sg")}
    assert matched[("wiki", "bp")]["k"] == "4" and matched[("wiki", "bp")]["nsamples"] == "128"
    assert matched[("alpaca", "sg")]["calib_source"] == "alpaca.json" and matched[("alpaca", "sg")]["seqlen"] == "64"
    assert is_png(t / "c.png")


def test_bad_chain_and_layout_are_clear_errors(fake_study):
    t = fake_study
    (t / "results" / "search" / "m" / "alpaca" / "bp" / "step_2.json").unlink()
    with pytest.raises(UserError, match="steps must be 1..K without gaps"):
        analyses.Study([t / "results" / "search"])
    with pytest.raises(UserError, match="not a step_<k>.json"):
        (t / "c.csv").write_text("x")
        analyses.Study([t / "results" / "search" / "m" / "wiki" / "bp" / "step_1.json", t / "c.csv"])


def test_bi_layer_vs_block_analysis(study3, capsys):
    t = study3
    assert cli(["analyze-bi", "--model", t / "model", "--calib", t / "calib", "--device", "cpu", "--csv", t / "bi.csv",
                "--png", t / "bi.png"], capsys)[0] == 0
    got = read_csv(t / "bi.csv")
    assert [int(r["layer"]) for r in got] == [0, 1, 2] and is_png(t / "bi.png")
    from blockpruner.data.calibration import load_calibration

    ref = hook_metrics(tiny_model("llama", seed=2, num_hidden_layers=3), load_calibration(t / "calib").windows, "llama")
    for r in got:
        for unit in ("layer", "attn", "mlp"):
            assert float(r[f"{unit}_bi"]) == pytest.approx(ref["bi"][f"{unit}.{r['layer']}"], rel=1e-5)
            assert float(r[f"{unit}_rm"]) == pytest.approx(ref["rm"][f"{unit}.{r['layer']}"], rel=1e-5)


def test_analysis_cli(fake_study, capsys):
    t = fake_study
    for kind in ("ratio", "attention", "calibration", "time"):
        assert cli([f"analyze-{kind}", t / "results", "--csv", t / f"{kind}.csv", "--png", t / f"{kind}.png"], capsys)[0] == 0
        assert is_png(t / f"{kind}.png") and read_csv(t / f"{kind}.csv")
    from blockpruner.cli import main

    assert main(["match-budgets", str(t / "results"), "--ratio", "0.2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "m\talpaca\tbp\tK=4\tratio=0.2000" in out and "m\twiki\tsg\tK=2\tratio=0.2000" in out
    code, err = cli(["analyze-calibration", t / "results", "--calib-dir", "nodir", "--csv", t / "x.csv", "--png", t / "x.png"],
                    capsys)
    one_line_error(code, err, "expected NAME=DIR")


# ---------------------------------------------------------------- real Gemma 3 270M


@pytest.mark.gemma
def test_gemma_shortgpt_vs_relative_magnitude(gemma_dir, tmp_path, capsys):
    """ShortGPT and relative magnitude for K = 1, 2 on one 64-token Alpaca window, then the
    comparison at a matched budget and the ratio plot."""
    from transformers import AutoTokenizer

    from blockpruner.data.calibration import CalibrationSpec, sample_calibration

    from .conftest import ALPACA, require_shared

    require_shared()
    calib = tmp_path / "results" / "calib"
    sample_calibration(CalibrationSpec(str(ALPACA), nsamples=8, seqlen=64, max_windows=1),
                       AutoTokenizer.from_pretrained(gemma_dir), calib)
    common = ["--model", gemma_dir, "--calib", calib, "--device", "cpu", "--no-progress"]
    steps = {}
    for method in ("shortgpt", "relative-magnitude"):
        d = tmp_path / "results" / "search" / "gemma3-270m" / "alpaca" / method
        for k in (1, 2):
            prev = ["--prev", d / f"step_{k - 1}.json"] if k > 1 else []
            assert cli(["baseline-step", *common, "--method", method, "--k", k, *prev, "--out", d / f"step_{k}.json"],
                       capsys)[0] == 0
        steps[method] = [read_step(d / f"step_{k}.json") for k in (1, 2)]
        s1, s2 = steps[method]
        assert len(s1["scores"]) == 18 and all(s["status"] == "done" for s in s1["scores"])
        assert s2["removed"][:2] == s1["removed"] and len(s2["removed"]) == 4
        assert s1["removed_block"] != s2["removed_block"] and s2["removed_block"].startswith("layer.")
        assert 0 < s1["params"]["ratio"] < s2["params"]["ratio"] < 0.2
        assert math.isfinite(s2["ppl"]) and s2["ppl"] > 1
        values = [s["value"] for s in s1["scores"]]
        assert values == sorted(values) and 0 < values[0]
    # a budget just above one layer's share: Table 1's rule matches both methods at K = 2
    target = max(s[0]["params"]["ratio"] for s in steps.values()) + 1e-6
    rows = analyses.budget_table([tmp_path / "results" / "search"], target, tmp_path / "table.csv")
    assert sorted((r["method"], r["k"]) for r in rows) == [("relative-magnitude", 2), ("shortgpt", 2)]
    assert len(read_csv(tmp_path / "table.csv")) == 2
    analyses.metrics_vs_ratio([tmp_path / "results" / "search"], tmp_path / "ratio.csv", tmp_path / "ratio.png")
    assert is_png(tmp_path / "ratio.png") and len(read_csv(tmp_path / "ratio.csv")) == 6
    # Figure 1 on the same window: its layer BI / RM orders are the one-shot rankings
    from blockpruner.data.calibration import load_calibration
    from blockpruner.model_dir import load_model_dir

    pm = PrunableModel.wrap(load_model_dir(gemma_dir, device="cpu", tokenizer=False)[0])
    fig1 = analyses.bi_layer_vs_block(pm, load_calibration(calib).windows, tmp_path / "bi.csv", tmp_path / "bi.png")
    assert len(fig1) == 18 and len(read_csv(tmp_path / "bi.csv")) == 18 and is_png(tmp_path / "bi.png")
    for method, metric in (("shortgpt", "bi"), ("relative-magnitude", "rm")):
        order = sorted(fig1, key=lambda r: (r[f"layer_{metric}"], r["layer"]))
        assert [f"layer.{r['layer']}" for r in order] == [s["block"] for s in steps[method][0]["scores"]]
    attn_lower = sum(r["attn_bi"] < r["mlp_bi"] for r in fig1)
    print(f"gemma BI: attention block below MLP block in {attn_lower}/18 layers; lowest layer BI "
          f"{min(r['layer_bi'] for r in fig1):.4f}, highest {max(r['layer_bi'] for r in fig1):.4f}")
    for method, (s1, s2) in steps.items():
        print(f"gemma {method}: {s1['removed_block']} ({s1['metric']['value']:.4f}), {s2['removed_block']} "
              f"({s2['metric']['value']:.4f}); calib ppl {s1['ppl']:.2f} -> {s2['ppl']:.2f}; ratio "
              f"{100 * s2['params']['ratio']:.2f}%; pruning {s2['timing']['pruning_s']:.2f}s")
    for r in rows:
        print(f"gemma matched @8%: {r['method']} K={r['k']} ratio={100 * r['ratio']:.2f}% calib ppl={r['calib_ppl']:.2f}")
