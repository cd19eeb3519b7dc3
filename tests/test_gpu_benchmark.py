"""The GPU benchmark's smoke mode (benchmarks/gpu/run.py --smoke): the same code on tiny configs
of the four real architectures, on the CPU, checked against independent counts."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from .conftest import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-smoke")
    return load_script().main(["--smoke", "--out", str(out)]), out


def test_every_model_searched_and_decoded_and_the_workflow_ran(smoke):
    res, out = smoke
    rows = res["rows"]
    names = [m for m, _, _ in load_script().MODELS]
    for name in names:
        search = [r for r in rows if r["model"] == name and r["part"] == "search"]
        assert [r["case"].split()[0] for r in search] == ["plain", "exact", "bounded"], name
        assert all(r["note"].startswith("same sequence as plain") for r in search), search
        plain, exact = search[0], search[1]
        assert exact["block_forwards"] < plain["block_forwards"]  # prefix reuse
        decode = [r for r in rows if r["model"] == name and r["part"] == "decode"]
        assert [r["case"].split(",")[0].split()[0] for r in decode] == ["dense", "dense", "pruned", "pruned"]
    flow = [r for r in rows if r["part"] == "workflow"]
    assert len(flow) == 1 and flow[0]["note"].startswith("exit 0"), flow
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == len(rows)
    assert (out / "table.md").read_text().count("\n| ") == len(rows) + 1  # header and a line per row


def test_pruned_kv_cache_is_the_kept_attention_layers(smoke):
    """KV MiB of the pruned decode = dense x kept attention layers / layers (every layer of the
    smoke configs caches the same width), counted from each config."""
    res, _ = smoke
    script = load_script()
    for name, file, _ in script.MODELS:
        config = script.real_config(file, smoke=True)
        layers = config.num_hidden_layers
        kept = layers - len(script.pruned_blocks(layers))
        decode = {r["case"]: r for r in res["rows"] if r["model"] == name and r["part"] == "decode"}
        dense = decode["dense, batch 16"]["kv_mib"]
        pruned = next(r for c, r in decode.items() if c.startswith("pruned") and c.endswith("batch 16"))["kv_mib"]
        head_dim = config.head_dim
        want = 2 * config.num_key_value_heads * head_dim * 4 * layers * 16 * (8 + 4) / 2**20  # fp32, batch 16, 8 + 4 positions
        assert dense == pytest.approx(want)
        assert pruned == pytest.approx(dense * kept / layers)


def test_bytes_per_decode_step_are_the_weights_read():
    """With no KV cache, a dense step reads every parameter once, except an untied embedding
    (only the batch's rows): counted here from the model's own parameters."""
    from blockpruner.blocks import PrunableModel

    script = load_script()
    for file, tied in (("llama-3.2-1b.json", True), ("llama-2-7b.json", False)):
        config = script.real_config(file, smoke=True)
        model = script.random_model(config, torch.device("cpu"), torch.float32)
        pm = PrunableModel.wrap(model)
        total = sum(p.numel() for p in model.parameters())  # a tied embedding counted once
        embedding = 0 if tied else model.get_input_embeddings().weight.numel()
        assert script.decode_bytes(pm, [], 0, 1, 0) == (total - embedding) * 4
        removed = script.pruned_blocks(config.num_hidden_layers)
        attn = sum(p.numel() for i in range(config.num_hidden_layers // 2, config.num_hidden_layers)
                   for p in model.model.layers[i].self_attn.parameters())
        norms = sum(model.model.layers[i].input_layernorm.weight.numel()
                    for i in range(config.num_hidden_layers // 2, config.num_hidden_layers))
        assert script.decode_bytes(pm, removed, 0, 1, 0) == (total - embedding - attn - norms) * 4


def test_bandwidth_bound_counts_the_bytes_a_step_reads(smoke):
    """The decode rows' bound = batch x copy bandwidth / bytes per step, the bytes counted here
    from the model's parameters (kept blocks, final norm, head; an untied embedding reads only
    the batch's rows) and the KV cache from the config, over the mean context of the run."""
    res, _ = smoke
    script = load_script()
    prompt, new = 8, 4  # --smoke's decode
    for name, file, _ in script.MODELS:
        config = script.real_config(file, smoke=True)
        model = script.random_model(config, torch.device("cpu"), torch.float32)
        layers = config.num_hidden_layers
        removed = range(layers - layers // 2, layers)
        embedding = 0 if config.tie_word_embeddings else model.get_input_embeddings().weight.numel()
        gone = sum(p.numel() for i in removed for n, p in model.model.layers[i].named_parameters()
                   if n.startswith("self_attn.") or n in ("input_layernorm.weight", "post_attention_layernorm.weight")
                   and config.model_type.startswith("gemma"))
        if not config.model_type.startswith("gemma"):
            gone += sum(model.model.layers[i].input_layernorm.weight.numel() for i in removed)
        weights = 4 * (sum(p.numel() for p in model.parameters()) - embedding)
        kv_layer = 2 * config.num_key_value_heads * config.head_dim * 4  # fp32 K and V, one position
        rows = {r["case"]: r for r in res["rows"] if r["model"] == name and r["part"] == "decode"}
        for case, row in rows.items():
            pruned = case.startswith("pruned")
            batch = int(case.rsplit(" ", 1)[1])
            attention = layers - (len(removed) if pruned else 0)
            step = weights - (4 * gone if pruned else 0) + kv_layer * attention * batch * (prompt + new / 2)
            assert row["bound_tokens_per_s"] == pytest.approx(batch * res["bandwidth"] / step, rel=1e-9), (name, case)
