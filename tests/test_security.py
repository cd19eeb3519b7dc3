"""A model's own Python runs only when the user trusts it.

The "remote" model here is a local directory whose config.json names its own classes
(`auto_map`); importing its files writes a marker file, so a test sees whether they ran. It is
Baichuan-like: model_type "baichuan" (unknown to transformers, known to the adapter table),
Llama's module names, and decoder layers that return tuples as Baichuan 2's do.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from blockpruner.artifacts import write_json
from blockpruner.cli import main
from blockpruner.model_dir import FORMAT, load_model_dir, load_tokenizer, read_manifest
from blockpruner.data.sources import prepare_model
from blockpruner.errors import UserError

from .conftest import tiny_model, word_tokenizer

CONFIG_PY = '''\
import pathlib
with pathlib.Path({marker!r}).open("a") as f:
    f.write("configuration\\n")

from transformers import LlamaConfig


class TinyBaichuanConfig(LlamaConfig):
    model_type = "baichuan"
'''

MODELING_PY = '''\
import pathlib
with pathlib.Path({marker!r}).open("a") as f:
    f.write("modeling\\n")

import torch
from transformers import LlamaForCausalLM, LlamaModel
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from .configuration_tinybc import TinyBaichuanConfig


class TinyBaichuanLayer(LlamaDecoderLayer):
    def forward(self, hidden_states, **kwargs):
        return (super().forward(hidden_states, **kwargs),)  # a tuple, as Baichuan 2's layers return


class TinyBaichuanModel(LlamaModel):
    config_class = TinyBaichuanConfig

    def __init__(self, config):
        super().__init__(config)
        self.layers = torch.nn.ModuleList(TinyBaichuanLayer(config, i) for i in range(config.num_hidden_layers))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask, cache=None,
                                  position_ids=position_ids)
        rotary = self.rotary_emb(h, position_ids=position_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)[0]
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h))


class TinyBaichuanForCausalLM(LlamaForCausalLM):
    config_class = TinyBaichuanConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = TinyBaichuanModel(config)
        self.post_init()
'''

AUTO_MAP = {"AutoConfig": "configuration_tinybc.TinyBaichuanConfig",
            "AutoModelForCausalLM": "modeling_tinybc.TinyBaichuanForCausalLM"}
REFUSAL = ("ships its own modeling code (model_type 'baichuan' is not built into transformers; auto_map in "
           "config.json: configuration_tinybc.TinyBaichuanConfig, modeling_tinybc.TinyBaichuanForCausalLM); "
           "it runs only if you trust it: pass --trust-remote-code (workflow: models.<name>.trust_remote_code: true)")


pytestmark = pytest.mark.usefixtures("one_thread")


def remote_source(root: Path, marker: Path, layers: int = 4) -> tuple[Path, torch.nn.Module]:
    """A Baichuan-like model directory with its own code; (directory, the Llama it was written from)."""
    src = root / f"tinybc_{uuid.uuid4().hex[:8]}"  # a fresh module name for transformers' module cache
    model = tiny_model("llama", num_hidden_layers=layers)
    model.save_pretrained(src)
    word_tokenizer(whitespace=True).save_pretrained(src)
    (src / "configuration_tinybc.py").write_text(CONFIG_PY.format(marker=str(marker)), encoding="utf-8")
    (src / "modeling_tinybc.py").write_text(MODELING_PY.format(marker=str(marker)), encoding="utf-8")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config.update(model_type="baichuan", architectures=["TinyBaichuanForCausalLM"], auto_map=AUTO_MAP)
    (src / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return src, model


# -- refused without trust -------------------------------------------------------------------------
def test_cli_refuses_untrusted_remote_code_before_loading(tmp_path, capsys):
    marker = tmp_path / "ran"
    src, _ = remote_source(tmp_path, marker)
    capsys.readouterr()
    assert main(["prepare-model", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"blockpruner: error: model {src} {REFUSAL}"
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_auto_map_of_a_known_type_is_refused_too(tmp_path):
    """A Llama whose config names its own classes: untrusted, neither they nor the built-in Llama is loaded."""
    marker = tmp_path / "ran"
    src, _ = remote_source(tmp_path, marker)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}), encoding="utf-8")
    with pytest.raises(UserError, match=r"ships its own modeling code \(auto_map in config.json: .*--trust-remote-code"):
        prepare_model(str(src), tmp_path / "out")
    assert not marker.exists()


def test_hub_id_is_refused_from_its_config_file_alone(tmp_path, monkeypatch):
    """For a hub id only config.json is fetched; no weights, no tokenizer, no code."""
    import transformers
    import transformers.utils.hub

    marker = tmp_path / "ran"
    src, _ = remote_source(tmp_path, marker)
    fetched = []

    def fake_cached_file(repo, filename, **kw):
        fetched.append((repo, filename))
        return str(src / filename)

    def no_load(*a, **kw):
        raise AssertionError("loaded before the refusal")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_load)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_load)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    # last: the lines above import transformers' auto modules, which must keep the real cached_file
    monkeypatch.setattr(transformers.utils.hub, "cached_file", fake_cached_file)
    with pytest.raises(UserError) as e:
        prepare_model("someorg/tiny-baichuan", tmp_path / "out")
    assert str(e.value) == f"model someorg/tiny-baichuan {REFUSAL}"
    assert fetched == [("someorg/tiny-baichuan", "config.json")]
    assert not marker.exists()


def test_tokenizer_code_is_refused_too(tmp_path):
    """A built-in architecture whose tokenizer is the repository's own class: refused before the weights."""
    marker = tmp_path / "ran"
    src = tmp_path / f"tok_{uuid.uuid4().hex[:8]}"
    tiny_model("llama").save_pretrained(src)
    word_tokenizer(whitespace=True).save_pretrained(src)
    (src / "tokenization_x.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass XTokenizer(PreTrainedTokenizerFast):\n    pass\n",
        encoding="utf-8")
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(tokenizer_class="XTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_x.XTokenizer"]})
    (src / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(UserError) as e:
        prepare_model(str(src), tmp_path / "out")
    assert str(e.value) == (f"model {src}: its tokenizer ships its own code (auto_map in tokenizer_config.json); it runs "
                            "only if you trust it: pass --trust-remote-code (workflow: models.<name>.trust_remote_code: true)")
    assert not marker.exists() and not (tmp_path / "out").exists()
    prepare_model(str(src), tmp_path / "out", trust_remote_code=True)
    assert marker.exists()
    marker.unlink()
    assert type(load_tokenizer(tmp_path / "out")).__name__ == "XTokenizer"  # the manifest trusts it
    assert marker.exists()


# -- trusted ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trusted(tmp_path_factory):
    """The remote model prepared with trust: (root, source dir, prepared dir, marker, Llama it came from)."""
    root = tmp_path_factory.mktemp("trusted")
    marker = root / "ran"
    src, model = remote_source(root, marker)
    prepare_model(str(src), root / "prepared", trust_remote_code=True)
    return root, src, root / "prepared", marker, model


def test_trusted_prepare_runs_the_code_and_records_the_choice(trusted):
    _, _, prepared, marker, model = trusted
    assert "modeling" in marker.read_text().split()
    manifest = read_manifest(prepared)
    assert manifest["trust_remote_code"] is True
    assert manifest["model_type"] == "baichuan" and manifest["architecture"] == "TinyBaichuanForCausalLM"
    assert json.loads((prepared / "config.json").read_text())["auto_map"] == AUTO_MAP
    loaded, tok, _ = load_model_dir(prepared)  # no flag: the manifest trusts it
    assert type(loaded).__name__ == "TinyBaichuanForCausalLM" and tok("t5 t9").input_ids == [5, 9]
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_cli_trust_flag_prepares(tmp_path):
    marker = tmp_path / "ran"
    src, _ = remote_source(tmp_path, marker)
    assert main(["prepare-model", str(src), str(tmp_path / "out"), "--trust-remote-code"]) == 0
    assert marker.exists()
    assert read_manifest(tmp_path / "out")["trust_remote_code"] is True


def test_later_stages_follow_the_manifest(trusted, capsys):
    """Calibration, a search step and perplexity on the trusted Baichuan-like model, no flag passed again."""
    from blockpruner.data.calibration import CalibrationSpec, sample_calibration

    root, _, prepared, _, _ = trusted
    text = root / "calib.txt"
    g = torch.Generator().manual_seed(1)
    text.write_text("\n".join(" ".join(f"t{i}" for i in torch.randint(3, 96, (12,), generator=g).tolist())
                              for _ in range(8)) + "\n", encoding="utf-8")
    sample_calibration(CalibrationSpec(str(text), nsamples=8, seqlen=16), load_tokenizer(prepared), root / "calib")
    common = ["--model", str(prepared), "--calib", str(root / "calib"), "--device", "cpu"]
    assert main(["step", *common, "--k", "1", "--out", str(root / "step_1.json"), "--no-progress"]) == 0
    step = json.loads((root / "step_1.json").read_text())
    assert step["k"] == 1 and step["removed"] == [step["removed_block"]]
    capsys.readouterr()
    assert main(["perplexity", *common, "--remove", step["removed_block"], "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"] > 1


def test_untrusted_manifest_refuses_later_loads(trusted, tmp_path):
    """A prepared directory whose manifest does not trust its code is refused before anything is imported."""
    import shutil

    _, _, prepared, _, _ = trusted
    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    write_json(copy / "manifest.json", {**read_manifest(copy), "trust_remote_code": False}, FORMAT)
    marker = tmp_path / "ran"  # the copied files would write the trusted fixture's marker; point them here
    for name in ("configuration_tinybc.py", "modeling_tinybc.py"):
        f = copy / name
        f.write_text(f.read_text().replace(str(prepared.parent / "ran"), str(marker)))
    message = (f"model {copy} ships its own modeling code (model_type 'baichuan' is not built into transformers; auto_map "
               "in config.json: configuration_tinybc.TinyBaichuanConfig, modeling_tinybc.TinyBaichuanForCausalLM) but "
               "its manifest.json does not trust it; prepare it again with --trust-remote-code "
               "(workflow: models.<name>.trust_remote_code: true)")
    for load in (load_model_dir, load_tokenizer):
        with pytest.raises(UserError) as e:
            load(copy)
        assert str(e.value) == message
    assert not marker.exists()


def test_remote_base_cannot_be_materialised(trusted):
    """Pruned directories load only with built-in base classes; a remote-code base is refused in one line."""
    from blockpruner.export.materialize import materialize
    from blockpruner.steps import write_step

    root, _, prepared, _, _ = trusted
    manifest = read_manifest(prepared)
    write_step(root / "step_x.json", {
        "k": 1, "removed_block": "mlp.1", "ppl": 1.0, "nll_sum": 0.0, "tokens": 1, "removed": ["mlp.1"],
        "attn_removed": 0, "mlp_removed": 1, "params": {"remaining": 0}, "scores": [], "settings": {"method": "blockpruner"},
        "inputs": {"model": str(prepared), "model_hash": manifest["content_hash"], "calibration": None,
                   "calibration_hash": None, "previous_step": None}})
    with pytest.raises(UserError, match="is not a transformers class \\(remote code\\)"):
        materialize(prepared, root / "step_x.json", root / "pruned")


# -- ordinary models ------------------------------------------------------------------------------
def test_ordinary_model_same_with_or_without_trust(tmp_path):
    """Trust changes nothing for a model without code of its own, except the manifest's record of it."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "src")
    word_tokenizer(whitespace=True).save_pretrained(tmp_path / "src")
    a = prepare_model(str(tmp_path / "src"), tmp_path / "a")
    b = prepare_model(str(tmp_path / "src"), tmp_path / "b", trust_remote_code=True)
    assert a["trust_remote_code"] is False and b["trust_remote_code"] is True
    def same(m: dict) -> dict:
        return {k: v for k, v in m.items() if k not in ("trust_remote_code", "checksum")}

    assert same(a) == same(b)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# -- pruned directories never run their own code -------------------------------------------------
def test_load_pruned_never_runs_the_directory_code(tmp_path):
    from blockpruner.blocks import PrunableModel
    from blockpruner.model_dir import load_model_dir
    from blockpruner.modeling.pruned import MODELING_FILE, load_pruned
    from blockpruner.export.materialize import materialize
    from blockpruner.steps import write_step

    model = tiny_model("llama", num_hidden_layers=4)
    model.save_pretrained(tmp_path / "src")
    word_tokenizer(whitespace=True).save_pretrained(tmp_path / "src")
    prepare_model(str(tmp_path / "src"), tmp_path / "prepared")
    removed = ["attn.1", "mlp.2"]
    manifest = read_manifest(tmp_path / "prepared")
    write_step(tmp_path / "step_2.json", {
        "k": 2, "removed_block": removed[-1], "ppl": 1.0, "nll_sum": 0.0, "tokens": 1, "removed": removed,
        "attn_removed": 1, "mlp_removed": 1, "params": PrunableModel.wrap(model).param_summary(removed), "scores": [],
        "settings": {"method": "blockpruner"},
        "inputs": {"model": str(tmp_path / "prepared"), "model_hash": manifest["content_hash"], "calibration": None,
                   "calibration_hash": None, "previous_step": None}})
    pruned = tmp_path / "pruned"
    materialize(tmp_path / "prepared", tmp_path / "step_2.json", pruned)
    assert read_manifest(pruned)["trust_remote_code"] is False
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_pruned(pruned)(ids).logits

    marker = tmp_path / "ran"
    with (pruned / MODELING_FILE).open("a", encoding="utf-8") as f:
        f.write(f"\n\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('tampered code ran')\n")
    with torch.no_grad():
        for loaded in (load_pruned(pruned), load_model_dir(pruned)[0], load_model_dir(pruned, tokenizer=False)[0]):
            torch.testing.assert_close(loaded(ids).logits, want, atol=0, rtol=0)
    load_tokenizer(pruned)
    assert not marker.exists()

    # the documented trusting loader does run it, so the test can see tampering
    from transformers import AutoModelForCausalLM

    remote = AutoModelForCausalLM.from_pretrained(str(pruned), trust_remote_code=True).eval()
    assert marker.read_text() == "tampered code ran"
    with torch.no_grad():  # and computes what load_pruned does, bit for bit (evaluations of pruned dirs moved to it)
        torch.testing.assert_close(remote(ids).logits, want, atol=0, rtol=0)
