"""Removing a block skips its whole residual branch, on every supported architecture
(including the multimodal Gemma 3 and the remote-code Baichuan 2)."""

from __future__ import annotations

import copy

import pytest
import torch

from blockpruner.adapters import get_path
from blockpruner.blocks import PrunableModel, block_names, parse_block, tie_order
from blockpruner.errors import UserError

from .conftest import BLOCK_ARCHS, tiny_model

IDS = torch.tensor([[1, 5, 9, 14, 3, 77, 21, 8, 60, 33, 12, 4, 90, 7, 45, 2]])  # longer than the sliding windows


def logits(model) -> torch.Tensor:
    """Logits of IDS. Baichuan 2 runs without its tuple KV cache, as the search and perplexity
    code run every model: a wrapped tuple-returning layer hands back no cache entry."""
    kwargs = {"use_cache": False} if model.config.model_type == "baichuan" else {}
    with torch.no_grad():
        return model(IDS, **kwargs).logits


def zero_branch_reference(model, name: str):
    """Reference semantics via hooks on an *unpatched* copy: the branch's output is zero."""
    ref = copy.deepcopy(model)
    ad = PrunableModel.wrap(copy.deepcopy(model)).adapter  # adapter lookup only
    kind, i = parse_block(name)
    layer = get_path(ref, ad.layers)[i]
    module = getattr(layer, ad.branch(kind).module)

    def zero(_mod, _args, out):
        if isinstance(out, tuple):
            return (torch.zeros_like(out[0]),) + out[1:]
        return torch.zeros_like(out)

    module.register_forward_hook(zero)
    return logits(ref)


@pytest.mark.parametrize("arch", BLOCK_ARCHS)
def test_dense_forward_unchanged(arch):
    model = tiny_model(arch)
    want = logits(model)
    PrunableModel.wrap(model)
    torch.testing.assert_close(logits(model), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", BLOCK_ARCHS)
def test_removing_each_block_matches_zeroed_branch_and_never_runs_it(arch):
    model = tiny_model(arch)
    pm = PrunableModel.wrap(copy.deepcopy(model))
    for name in pm.names:
        want = zero_branch_reference(model, name)
        kind, i = parse_block(name)
        spec = pm.adapter.branch(kind)
        calls = []
        hooks = [getattr(pm.layers[i], part).register_forward_pre_hook(lambda *a, p=part: calls.append(p)) for part in spec.parts()]
        with pm.without([name]):
            got = logits(pm.model)
        for h in hooks:
            h.remove()
        assert calls == [], f"{name}: {calls} ran although the block is removed"
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"{arch} {name}")
    assert pm.removed == []  # `without` restored everything


def test_block_names_and_tie_order():
    names = block_names(2)
    assert names == ["attn.0", "mlp.0", "attn.1", "mlp.1"]
    assert sorted(names, key=tie_order) == ["attn.0", "attn.1", "mlp.0", "mlp.1"]
    with pytest.raises(UserError, match="bad block name"):
        parse_block("attention.1")


def test_remove_restore_and_bounds():
    pm = PrunableModel.wrap(tiny_model("llama"))
    pm.remove(["mlp.1", "attn.0"])
    assert pm.removed == ["attn.0", "mlp.1"]
    pm.restore(["attn.0"])
    assert pm.removed == ["mlp.1"]
    with pytest.raises(UserError, match="has 3 layers"):
        pm.remove(["attn.3"])


def test_param_summary_counts_branch_and_norms():
    pm = PrunableModel.wrap(tiny_model("gemma3_text"))
    layer = pm.layers[0]
    want = sum(p.numel() for m in (layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm) for p in m.parameters())
    assert pm.block_params("attn.0") == want
    s = pm.param_summary(["attn.0", "mlp.2"])
    assert s["removed"] == want + pm.block_params("mlp.2")
    assert s["total"] == sum(p.numel() for p in pm.model.parameters())
    assert 0 < s["ratio"] < s["ratio_no_embed"] < 1


def test_unsupported_architecture_lists_supported():
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UserError, match=r"unsupported architecture model_type='gpt2'; supported: .*llama.*adapters.py"):
        PrunableModel.wrap(model)
