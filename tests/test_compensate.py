"""Training-free compensation: the fit recovers what it can, folding is exact, exports keep it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from blockpruner.blocks import PrunableModel
from blockpruner.cli import main
from blockpruner.compensate.export import compensate
from blockpruner.compensate.fit import fit, plan_targets
from blockpruner.compensate.fold import applied, fold
from blockpruner.data.calibration import CalibrationSpec, load_calibration, sample_calibration
from blockpruner.data.sources import prepare_model
from blockpruner.model_dir import read_manifest
from blockpruner.errors import UserError
from blockpruner.modeling.pruned import load_pruned
from blockpruner.steps import write_step

from .conftest import tiny_model, word_tokenizer
from .test_export import remote_load, step_record

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = torch.tensor([[5, 9, 14, 3, 77, 21, 8, 60, 33, 12, 40, 41]])


def random_windows(n: int = 4, length: int = 24, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 96, (length,), generator=g) for _ in range(n)]


def logits(model, ids=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


class Echo(nn.Module):
    """A stand-in MLP whose output is an exact linear map of the previous attention block's output."""

    def __init__(self, source: nn.Module, mix: torch.Tensor):
        super().__init__()
        self.mix = mix
        self.last = None
        source.register_forward_hook(self.remember)

    def remember(self, module, args, out):
        self.last = out[0] if isinstance(out, tuple) else out

    def forward(self, x):
        return self.last @ self.mix if self.mix.dim() == 2 else self.last * self.mix


def test_targets_are_runs_with_their_anchor():
    names = ["attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2"]
    t = plan_targets(names, ["attn.0", "attn.1", "mlp.1", "mlp.2"])
    assert [(x.anchor, x.removed) for x in t] == [(None, ("attn.0",)), ("mlp.0", ("attn.1", "mlp.1")),
                                                   ("attn.2", ("mlp.2",))]


@pytest.mark.parametrize("method", ["scale", "linear"])
def test_exactly_linear_removed_block_is_recovered(method):
    """mlp.1 adds exactly a linear map of attn.1's output: removing it and folding the fitted
    correction (no ridge pull) into attn.1 gives the dense model's logits back."""
    model = tiny_model("llama")
    pm = PrunableModel.wrap(model)
    g = torch.Generator().manual_seed(3)
    mix = 0.5 * torch.randn(32, 32, generator=g) if method == "linear" else 1 + 0.5 * torch.randn(32, generator=g)
    pm.layers[1].mlp = Echo(pm.layers[1].self_attn, mix)
    dense = logits(model)
    corrections = fit(pm, random_windows(), ["mlp.1"], method, alpha=0.0)
    assert corrections[0].summary["residual_after"] < 1e-8 * corrections[0].summary["residual_before"]
    pm.remove(["mlp.1"])
    assert (logits(model) - dense).abs().max() > 1e-2  # the removal matters ...
    fold(pm, corrections)
    torch.testing.assert_close(logits(model), dense, atol=1e-4, rtol=1e-4)  # ... and is undone


@pytest.mark.parametrize("arch,method", [("llama", "scale"), ("llama", "linear"), ("gemma3_text", "scale"),
                                         ("phi3", "linear")])
def test_consistency_folded_weights_equal_the_run_time_correction(arch, method):
    """A consistency check between two of the package's paths (hooks at run time, weights
    folded); the correction's own value is checked independently by
    test_exactly_linear_removed_block_is_recovered."""
    model = tiny_model(arch, num_hidden_layers=4)
    pm = PrunableModel.wrap(model)
    removed = ["attn.0", "attn.1", "mlp.1", "mlp.3"]  # attn.0 has no anchor: skipped and recorded
    corrections = fit(pm, random_windows(), removed, method)
    assert [c.target.anchor for c in corrections] == [None, "mlp.0", "attn.3"]
    assert "skipped" in corrections[0].summary and corrections[0].factor is None
    pm.remove(removed)
    plain = logits(model)
    with applied(pm, corrections):
        hooked = logits(model)
    assert (hooked - plain).abs().max() > 1e-4  # the correction changes something
    fold(pm, corrections)
    torch.testing.assert_close(logits(model), hooked, atol=1e-5, rtol=1e-5)


def test_guard_keeps_only_corrections_that_lower_the_calibration_nll():
    """Two corrections, one made harmful (its factor x 4): `guard` keeps, in forward order, each
    one whose addition lowers the pruned model's calibration NLL -- decided again here with
    full forwards of the model -- and drops the harmful one with its reason."""
    from blockpruner.compensate.guard import guard

    model = tiny_model("llama", num_hidden_layers=4)
    pm = PrunableModel.wrap(model)
    windows = random_windows()
    removed = ["attn.1", "mlp.3"]
    fitted = fit(pm, windows, removed, "scale")
    assert [c.target.anchor for c in fitted] == ["mlp.0", "attn.3"]
    fitted[1] = type(fitted[1])(fitted[1].target, "scale", fitted[1].factor * 4, fitted[1].summary)

    def nll(corrections):
        with pm.without(removed), applied(pm, corrections), torch.no_grad():
            return sum(model(w[None], labels=w[None]).loss.double().item() * (len(w) - 1) for w in windows)

    want, best = [], nll([])
    for c in fitted:
        if nll([*want, c]) < best:
            best = nll([*want, c])
            want.append(c)
    assert fitted[1] not in want  # four times the fitted scale hurts
    got = guard(pm, windows, removed, fitted)
    assert pm.removed == []
    assert [c.factor is not None for c in got] == [c in want for c in fitted]
    assert got[1].summary["skipped"] == "it raised the calibration NLL" and got[1].summary["guard"]["kept"] is False
    for c, g in zip(fitted, got):
        assert g.summary["guard"]["nll_with"] == pytest.approx(nll([*[w for w in want if fitted.index(w) < fitted.index(c)], c]),
                                                               rel=1e-5)


def test_linear_is_refused_on_post_norm_architectures():
    model = tiny_model("gemma3_text")
    pm = PrunableModel.wrap(model)
    with pytest.raises(Exception, match="post-norm"):
        fold(pm, fit(pm, random_windows(1), ["mlp.1"], "linear"))


# ---------------------------------------------------------------- export and reload


def prepared_with_calibration(root: Path, arch: str, layers: int = 4, **over) -> tuple[Path, Path, nn.Module]:
    model = tiny_model(arch, num_hidden_layers=layers, **over)
    model.save_pretrained(root / "src")
    word_tokenizer(whitespace=True).save_pretrained(root / "src")
    prepare_model(str(root / "src"), root / "prepared")
    g = torch.Generator().manual_seed(0)
    text = root / "calib.txt"
    text.write_text("\n".join(" ".join(f"t{i}" for i in torch.randint(4, 96, (30,), generator=g).tolist())
                              for _ in range(8)))
    from blockpruner.model_dir import load_tokenizer

    sample_calibration(CalibrationSpec(str(text), nsamples=8, seqlen=24), load_tokenizer(root / "prepared"),
                       root / "calib")
    return root / "prepared", root / "calib", model


@pytest.mark.parametrize("arch,method", [("llama", "linear"), ("gemma3_text", "scale")])
def test_export_and_reload_keep_the_correction(tmp_path, arch, method):
    prep, calib, model = prepared_with_calibration(tmp_path, arch)
    removed = ["attn.1", "mlp.1", "mlp.3"]  # layer 1 dropped entirely
    write_step(tmp_path / "step.json", step_record(model, prep, removed))
    s = compensate(prep, tmp_path / "step.json", calib, tmp_path / "out", method, guarded=False)  # every correction
    assert s["method"] == method and len(s["corrections"]) == 2 and s["guard"] is False

    pm = PrunableModel.wrap(model)
    corrections = fit(pm, load_calibration(calib).windows, removed, method)
    pm.remove(removed)
    fold(pm, corrections)
    expected = logits(model)
    for loaded in (load_pruned(tmp_path / "out"), remote_load(tmp_path / "out")):
        torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-5)

    manifest = read_manifest(tmp_path / "out")
    comp = manifest["compensation"]
    assert comp["method"] == method and comp["calibration_hash"] == load_calibration(calib).hash
    assert all(c["residual_after"] <= c["residual_before"] for c in comp["corrections"])
    assert manifest["pruning"]["removed"] == removed
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["pruning"]["compensation"]["method"] == method


def test_nemotron_nas_layout_keeps_the_folded_weights(tmp_path):
    from safetensors.torch import load_file

    from blockpruner.export import decilm

    # FFN width 256 with hidden 64: representable as a DeciLM ffn_mult
    prep, calib, model = prepared_with_calibration(tmp_path, "llama", hidden_size=64, intermediate_size=256)
    write_step(tmp_path / "step.json", step_record(model, prep, ["attn.1", "mlp.2"]))
    compensate(prep, tmp_path / "step.json", calib, tmp_path / "out", "linear")
    decilm.to_decilm(tmp_path / "out", tmp_path / "nas")
    comp, nas = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "nas" / "model.safetensors")
    folded = [k for k in comp if k.endswith(("o_proj.weight", "down_proj.weight"))]
    assert folded and all(torch.equal(comp[k], nas[k]) for k in folded)


def test_cli_compensate_and_its_refusals(tmp_path, capsys, monkeypatch):
    prep, calib, model = prepared_with_calibration(tmp_path, "gemma3_text", layers=3)
    write_step(tmp_path / "step_1.json", step_record(model, prep, ["mlp.1"]))
    base = ["compensate", "--model", str(prep), "--step", str(tmp_path / "step_1.json"), "--calib", str(calib),
            "--out", str(tmp_path / "out")]
    assert main(base + ["--method", "scale"]) == 0
    assert read_manifest(tmp_path / "out")["compensation"]["corrections"][0]["folded_into"] == \
        "post_attention_layernorm.weight"

    def boom(*a, **k):
        raise AssertionError("loaded a model before refusing")

    monkeypatch.setattr("blockpruner.model_dir.load_model_dir", boom)
    monkeypatch.setattr("blockpruner.compensate.export.materialize", boom)
    capsys.readouterr()
    for extra, pattern in ((["--method", "ridge"], "unknown compensation method 'ridge'"),
                           (["--method", "linear"], "post-norm"),
                           (["--method", "scale", "--alpha", "-1"], "alpha")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and pattern in err, err


# ---------------------------------------------------------------- compensation-aware scoring


def test_compensation_aware_scores_equal_fitting_each_candidate_directly():
    from blockpruner.compensate.search import pair_sums, score_with_compensation
    from blockpruner.engine.forward import current_nll

    model = tiny_model("gemma3_text", num_hidden_layers=4)
    pm = PrunableModel.wrap(model)
    windows = random_windows(3)
    gram, tokens = pair_sums(pm, windows)
    pm.remove(["attn.2"])
    scores = score_with_compensation(pm, windows, ["mlp.2", "attn.0"], gram, tokens)
    assert pm.removed == ["attn.2"]  # candidates are put back
    for c in ("mlp.2", "attn.0"):
        pm.set_removed([])
        corrections = fit(pm, windows, ["attn.2", c], "scale")
        pm.set_removed(["attn.2", c])
        with applied(pm, corrections):
            direct = current_nll(pm, windows)
        assert abs(scores[c].nll_sum - direct.nll_sum) < 1e-4 * abs(direct.nll_sum), c
        pm.set_removed(["attn.2"])


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_compensation_aware_step_chooses_the_best_compensated_candidate(arch, tmp_path):
    """`step --compensation scale` removes the candidate whose folded, compensated model has the
    lowest calibration NLL, each computed here by fitting on a fresh copy, applying the
    correction at run time (hooks; folding equals it, tested above) and a full forward. mlp.1 echoes a per-channel scale of attn.1: on llama its loss is exactly recoverable,
    so the compensation-aware step removes it where the plain step does not."""
    from blockpruner.compensate.search import step_scorer
    from blockpruner.search.greedy import StepSettings, candidate_blocks, load_previous, search_step

    def make():
        model = tiny_model(arch, num_hidden_layers=3)
        model.model.layers[1].mlp = Echo(model.model.layers[1].self_attn,
                                         1 + 2 * torch.randn(32, generator=torch.Generator().manual_seed(5)))
        return model

    windows = random_windows(3)
    settings = StepSettings(candidates="mlp", compensation="scale", compensation_alpha=0.0)  # attn.1 feeds mlp.1: kept
    inputs = {"model_hash": "m", "calibration_hash": "c"}
    rec = search_step(PrunableModel.wrap(make()), windows, 1, [], settings, inputs, progress=False,
                      score_compensated=step_scorer(0.0))
    want = {}
    for c in candidate_blocks(3, [], "mlp"):
        pm = PrunableModel.wrap(make())
        corrections = fit(pm, windows, [c], "scale", alpha=0.0)
        pm.remove([c])
        with torch.no_grad(), applied(pm, corrections):
            want[c] = sum(pm.model(w[None], labels=w[None]).loss.double().item() * (len(w) - 1) for w in windows)
    best = min(want, key=want.get)
    assert rec["removed_block"] == best
    assert abs(rec["nll_sum"] - want[best]) < 1e-5 * want[best]
    assert {s["block"]: s["status"] for s in rec["scores"]} == dict.fromkeys(want, "done")
    if arch == "llama":  # mlp.1 compensated is the dense model again; removed plainly it is not
        with torch.no_grad():
            dense = sum(make()(w[None], labels=w[None]).loss.double().item() * (len(w) - 1) for w in windows)
        plain = search_step(PrunableModel.wrap(make()), windows, 1, [], StepSettings(candidates="mlp"), inputs,
                            progress=False, early_stop=False)
        aware = {s["block"]: s["nll_sum"] for s in rec["scores"]}
        assert abs(aware["mlp.1"] - dense) < 1e-5 * dense
        assert abs({s["block"]: s["nll_sum"] for s in plain["scores"]}["mlp.1"] - dense) > 5e-5 * dense
    assert rec["settings"]["compensation"] == "scale" and rec["settings"]["compensation_alpha"] == 0.0
    assert "compensation" not in StepSettings().as_dict()  # plain steps record what they always did
    write_step(tmp_path / "step_1.json", rec)
    with pytest.raises(UserError, match="made with settings"):  # a plain search does not continue it
        load_previous(tmp_path / "step_1.json", 2, "m", "c", StepSettings(candidates="mlp"))
    assert load_previous(tmp_path / "step_1.json", 2, "m", "c", settings)[0] == rec["removed"]


def test_summary_puts_compensated_rows_beside_their_pruning(tmp_path):
    from blockpruner.eval.wikitext import write_ppl
    from blockpruner.report.summary import collect

    paths = []
    for variant, ppl in (("dense", 20.0), ("alpaca/bp/k4", 40.0), ("alpaca/bp/k4+scale", 38.0), ("alpaca/bp/k8", 60.0)):
        paths.append(tmp_path / "eval" / "m" / variant / "ppl.json")
        write_ppl(paths[-1], {"ppl": ppl})
    rows, _, _ = collect(paths)
    assert [(r["pruning"], r["k"], r["compensation"], r["wikitext2_ppl"]) for r in rows] == [
        ("dense", 0, "none", 20.0), ("k4", 4, "none", 40.0), ("k4+scale", 4, "scale", 38.0), ("k8", 8, "none", 60.0)]


def test_summary_judges_the_compensated_average_on_the_same_items(tmp_path):
    """The paired change of the task average and its standard error, against the per-item
    differences written out here; the verdict compares the change with twice that error."""
    import statistics

    from blockpruner.eval.zeroshot import write_tasks
    from blockpruner.report.summary import collect, markdown

    rng = __import__("random").Random(0)
    piqa = [rng.random() < 0.6 for _ in range(80)]
    arc = [rng.random() < 0.5 for _ in range(60)]
    flipped = {"piqa": [x if i % 10 else not x for i, x in enumerate(piqa)], "arc_easy": arc[:-6] + [True] * 6}
    paths = []
    for variant, items in (("alpaca/bp/k4", {"piqa": piqa, "arc_easy": arc}), ("alpaca/bp/k4+scale", flipped)):
        tasks = {t: {"value": sum(c) / len(c), "correct": [int(x) for x in c]} for t, c in items.items()}
        paths.append(tmp_path / "eval" / "m" / variant / "tasks.json")
        write_tasks(paths[-1], {"tasks": tasks, "average": statistics.mean(t["value"] for t in tasks.values())})
    rows, tasks, _ = collect(paths)
    comp = next(r for r in rows if r["compensation"] == "scale")
    d = {t: [int(y) - int(x) for x, y in zip(c, flipped[t])] for t, c in (("piqa", piqa), ("arc_easy", arc))}
    want = statistics.mean(statistics.mean(v) for v in d.values())
    se = math.sqrt(sum(statistics.variance(v) / len(v) for v in d.values())) / 2
    assert comp["average_change"] == pytest.approx(want) and comp["average_change_se"] == pytest.approx(se)
    assert comp["average_change"] == pytest.approx(comp["average"] - next(r for r in rows if r["pruning"] == "k4")["average"])
    verdict = "within noise" if abs(want) <= 2 * se else ("higher" if want > 0 else "lower")
    line = next(x for x in markdown(rows, tasks, "all").splitlines() if x.startswith("| m | bp | k4+scale |"))
    assert f"{want * 100:+.2f} ± {2 * se * 100:.2f}" in line and verdict in line
