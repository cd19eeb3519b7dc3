"""SliceGPT: exact at full width, the parameter formula, the written directory, refusals, and a
real slicing of a small trained model where the PCA has to be right."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from blockpruner.compress import slicegpt
from blockpruner.data.calibration import CalibrationSpec, load_calibration, sample_calibration
from blockpruner.model_dir import load_model_dir, read_manifest
from blockpruner.data.sources import prepare_model
from blockpruner.errors import UserError

from .conftest import tiny_config, tiny_model, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SLICEABLE = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"]
IDS = torch.tensor([[5, 9, 14, 3, 77, 21, 8, 60, 33, 12, 40, 41], [7, 7, 50, 61, 2, 19, 88, 4, 30, 30, 31, 90]])


def random_windows(n: int = 4, length: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (length,), generator=g) for _ in range(n)]


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", SLICEABLE)
def test_full_width_rotation_keeps_logits(arch):
    """Fusing the norms and rotating every block by its PCA basis changes no output."""
    model = tiny_model(arch)
    dense = logits(model)
    sliced = slicegpt.slice_model(copy.deepcopy(model), random_windows(), model.config.hidden_size)
    torch.testing.assert_close(logits(sliced), dense, atol=1e-4, rtol=0)
    assert sliced.model.layers[1].attn_shortcut_Q.shape == (32, 32)


def test_full_width_with_sliced_head_and_tied_embeddings_keeps_logits():
    model = tiny_model("llama", tie_word_embeddings=True)
    dense = logits(model)
    sliced = slicegpt.slice_model(copy.deepcopy(model), random_windows(), 32, slice_head=True)
    torch.testing.assert_close(logits(sliced), dense, atol=1e-4, rtol=0)
    assert sliced.lm_head.weight.data_ptr() != sliced.model.embed_tokens.weight.data_ptr()


def count_by_hand(arch: str, k: int, slice_head: bool) -> int:
    """The tiny config: d=32, vocab 96, 3 layers, intermediate 48, 4 heads of 8, 2 KV heads."""
    d, vocab, layers, inter, q, kv = 32, 96, 3, 48, 4 * 8, 2 * 8
    out = k if slice_head else d  # what the last layer writes and the head reads
    attn = (q + 2 * kv) * k + q * k + k * k  # q/k/v readers, o_proj writer, shortcut
    if arch == "qwen2":
        attn += q + 2 * kv  # q/k/v biases: added after the projection, unchanged by slicing
    if arch == "qwen3":
        attn += 2 * 8  # q_norm, k_norm on head_dim
    mlp = 2 * inter * k + inter * k + k * k  # gate/up readers, down_proj writer, shortcut
    last_mlp = 2 * inter * k + inter * out + k * out
    return vocab * k + layers * attn + (layers - 1) * mlp + last_mlp + vocab * out


@pytest.mark.parametrize("arch", SLICEABLE)
@pytest.mark.parametrize("slice_head", [False, True])
def test_parameter_count_formula(arch, slice_head):
    model = tiny_model(arch)
    assert slicegpt.parameter_count(model.config, None) == sum(p.numel() for p in model.parameters())
    sliced = slicegpt.slice_model(model, random_windows(), 24, slice_head=slice_head)
    n = sum(p.numel() for p in sliced.parameters())
    assert n == slicegpt.parameter_count(tiny_config(arch), 24, slice_head=slice_head) == count_by_hand(arch, 24, slice_head)


def test_dense_count_of_tied_model():
    model = tiny_model("llama", tie_word_embeddings=True)
    assert slicegpt.parameter_count(model.config, None) == sum(p.numel() for p in model.parameters()) == 29408 - 96 * 32


def test_width_for_ratio():
    config = tiny_config("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=4)
    dense = slicegpt.parameter_count(config, None)
    for ratio in (0.1, 0.25, 0.3):
        width = slicegpt.sliced_width(config, ratio)
        assert width % 8 == 0
        got = 1 - slicegpt.parameter_count(config, width) / dense
        for other in range(8, 65, 8):  # no other multiple of 8 comes closer
            assert abs(got - ratio) <= abs(1 - slicegpt.parameter_count(config, other) / dense - ratio)
        assert slicegpt.slicing_for_ratio(config, ratio) == 1 - width / 64
    assert slicegpt.sliced_width(config, 0.25) == 40
    fine = slicegpt.sliced_width(config, 0.25, round_to=1)
    assert fine == min(range(64, 0, -1), key=lambda k: abs(1 - slicegpt.parameter_count(config, k) / dense - 0.25))
    with pytest.raises(UserError, match="ratio"):
        slicegpt.sliced_width(config, 1.0)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "gemma3"])
def test_sandwich_norm_gemmas_refused(arch):
    with pytest.raises(UserError) as e:
        slicegpt.slice_model(tiny_model(arch), random_windows(), 24)
    assert "\n" not in str(e.value) and "sandwich" in str(e.value) and "rotation invariance" in str(e.value)


@pytest.mark.parametrize("settings, fix", [({"round": 8}, "unknown SliceGPT setting"), ({"round_to": 0}, "round_to"),
                                           ({"calibration_windows": -1}, "calibration_windows"),
                                           ({"dtype_pca": "float32"}, "float64"), ({"slice_head": "yes"}, "slice_head")])
def test_bad_settings_refused(settings, fix):
    with pytest.raises(UserError, match=fix):
        slicegpt.resolve_settings(settings)


# -- the written directory ---------------------------------------------------------------------
@pytest.fixture(scope="module", params=["qwen2", "phi3", "gemma"])
def compressed(request, tmp_path_factory):
    """A tiny model (Qwen2: biases; Phi-3: fused projections; Gemma: scaled embeddings, tied head)
    prepared like a real source, calibration windows sampled from text, and its SliceGPT
    directory at 15% of the parameters."""
    root = tmp_path_factory.mktemp(f"slicegpt-{request.param}")
    torch.set_num_threads(1)
    model = tiny_model(request.param)
    model.save_pretrained(root / "src")
    tok = word_tokenizer(whitespace=True)
    tok.save_pretrained(root / "src")
    prepare_model(str(root / "src"), root / "prepared")
    g = torch.Generator().manual_seed(1)
    text = root / "calib.txt"
    text.write_text("\n".join(" ".join(f"t{i}" for i in torch.randint(4, 96, (40,), generator=g).tolist())
                              for _ in range(12)) + "\n", encoding="utf-8")
    sample_calibration(CalibrationSpec(str(text), nsamples=12, seqlen=32), tok, root / "calib")
    manifest = slicegpt.compress(root / "prepared", root / "calib", root / "sliced", ratio=0.15,
                                 settings={"calibration_windows": 8})
    return root, manifest


def test_manifest_records_the_slicing(compressed):
    root, manifest = compressed
    assert manifest == read_manifest(root / "sliced")
    arch = manifest["model_type"]
    width = {"qwen2": 24, "phi3": 24, "gemma": 16}[arch]  # Gemma's dense count has one tied embedding
    assert width == slicegpt.sliced_width(tiny_config(arch), 0.15)
    assert manifest["method"] == "slicegpt" and manifest["sliced_size"] == width and manifest["slicing"] == 1 - width / 32
    assert manifest["params_dense"] == read_manifest(root / "prepared")["parameters"]
    assert manifest["params_pruned"] == manifest["parameters"] == count_by_hand(arch, width, False)
    assert manifest["ratio"] == pytest.approx(1 - manifest["params_pruned"] / manifest["params_dense"])
    assert manifest["calibration_hash"] == load_calibration(root / "calib").hash and manifest["calibration_windows"] == 8
    assert manifest["settings"] == {"calibration_windows": 8, "round_to": 8, "slice_head": False, "dtype_pca": "float64"}
    assert not list(root.glob(".sliced*"))  # no temporary directory left


def test_consistency_saved_directory_reloads_to_the_in_memory_logits(compressed):
    """A consistency check between the in-memory slicing and its three loaders; the slicing is
    checked independently by the full-width rotation tests and against the official code
    (../shared/notes/measurements.md)."""
    from transformers import AutoModelForCausalLM

    root, manifest = compressed
    windows = load_calibration(root / "calib").windows[:8]
    dense, _, _ = load_model_dir(root / "prepared", dtype="fp32", tokenizer=False)
    in_memory = logits(slicegpt.slice_model(dense, windows, manifest["sliced_size"]))
    remote = AutoModelForCausalLM.from_pretrained(root / "sliced", trust_remote_code=True, dtype=torch.float32).eval()
    assert type(remote).__name__ == "SlicedForCausalLM"
    torch.testing.assert_close(logits(remote), in_memory, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(slicegpt.load_sliced(root / "sliced")), in_memory, atol=1e-5, rtol=0)
    prepared_loader, _, _ = load_model_dir(root / "sliced", tokenizer=False)  # manifest trusts its own modeling file
    torch.testing.assert_close(logits(prepared_loader), in_memory, atol=1e-5, rtol=0)


def test_blockpruner_perplexity_runs_the_sliced_forward(compressed):
    """The evaluation stages wrap models in PrunableModel; the sliced layers keep their forward."""
    from blockpruner.blocks import PrunableModel
    from blockpruner.eval.wikitext import perplexity

    root, _ = compressed
    model = slicegpt.load_sliced(root / "sliced")
    windows = load_calibration(root / "calib").windows[:3]
    got = perplexity(PrunableModel.wrap(model), windows, progress=False)["ppl"]
    with torch.no_grad():
        nll = [model(w[None], labels=w[None]).loss.item() for w in windows]
    assert got == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_generation_with_kv_cache_matches_full_forward(compressed):
    root, _ = compressed
    model = slicegpt.load_sliced(root / "sliced")
    out = model.generate(IDS[:1], max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    ids = IDS[:1]
    for _ in range(6):  # greedy without cache
        ids = torch.cat([ids, logits(model, ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


def test_output_must_not_be_the_source(compressed):
    root, _ = compressed
    with pytest.raises(UserError, match="source model directory"):
        slicegpt.compress(root / "prepared", root / "calib", root / "prepared", ratio=0.1, settings={})


# -- a trained model -----------------------------------------------------------------------------
def cyclic_text(gen: torch.Generator, n: int, length: int = 64) -> torch.Tensor:
    """Sequences following one of 4 fixed cycles of 12 tokens, 10% of tokens replaced at random."""
    cycles = torch.randperm(92, generator=torch.Generator().manual_seed(1))[:48].view(4, 12) + 4
    which, start = torch.randint(0, 4, (n,), generator=gen), torch.randint(0, 12, (n,), generator=gen)
    x = cycles[which[:, None], (start[:, None] + torch.arange(length)[None]) % 12]
    noise = torch.rand(n, length, generator=gen) < 0.1
    return torch.where(noise, torch.randint(4, 96, (n, length), generator=gen), x)


def test_trained_model_sliced_by_pca_beats_slicing_without_rotation():
    """A 2-layer d=64 Llama trained for a few seconds, sliced to ~25% fewer parameters: the PCA
    bases keep its perplexity within a few percent; dropping the same number of coordinates in
    the model's own basis (identity instead of PCA) costs many times more."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(100):
        x = cyclic_text(g, 16)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = cyclic_text(torch.Generator().manual_seed(99), 16)
    calib = list(cyclic_text(torch.Generator().manual_seed(7), 16))

    def ppl(m) -> float:
        with torch.no_grad():
            return math.exp(m(test, labels=test).loss.item())

    dense = ppl(model)
    width = slicegpt.sliced_width(config, 0.25)
    assert width == 40
    pca = ppl(slicegpt.slice_model(copy.deepcopy(model), calib, width))
    identity = ppl(slicegpt.slice_model(copy.deepcopy(model), calib, width,
                                        basis=lambda signals: torch.eye(64, dtype=torch.float64)))
    assert dense < 4.0  # it learned the cycles
    assert pca < 1.05 * dense
    assert identity > 1.08 * dense
    assert identity - dense > 5 * (pca - dense)
