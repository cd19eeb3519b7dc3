"""Materialise a search result: a model directory with the removed blocks physically gone.

`materialize(model_dir, step_json, out_dir)` writes a standard transformers directory
(safetensors, config.json, tokenizer, generation_config, manifest.json) in which

- the K removed blocks have no tensors at all, and a layer whose two blocks are both removed
  is dropped; the kept layers are renumbered 0..N-1 (`config.pruned_layers[j]` names the
  source layer and the blocks it still has) and per-layer config lists such as Gemma 3's
  `layer_types` follow them;
- attention modules are renumbered among the remaining attention blocks, so the KV cache has
  one slot per remaining attention block (see `modeling.pruned_modeling`);
- the directory carries its own modeling code (`modeling_blockpruner.py`, named in
  config.json's `auto_map`), so `AutoModelForCausalLM.from_pretrained(dir,
  trust_remote_code=True)` loads it anywhere, and `modeling.pruned.load_pruned(dir)` loads it with no remote
  code from the base transformers class plus the recorded pruning (it never imports the
  directory's Python, so a tampered `modeling_blockpruner.py` does not run);
- config.json's `pruning` records the source, the removed blocks in removal order, the method
  and K, and whether the blocks were searched (a step artifact) or given (`removed=[...]`,
  `blockpruner materialize --blocks`);
- README.md is the model card (`model_card`): base model, removed blocks, ratio, method,
  calibration data and how to load the directory.

`decilm.to_decilm(pruned_dir, out_dir)` rewrites such a directory in the Nemotron-NAS layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..adapters import Adapter, adapter_for
from ..artifacts import atomic_dir
from ..blocks import KINDS, PrunableModel, parse_block
from ..engine.cost import Cost
from ..errors import UserError
from ..modeling import pruned_modeling
from ..modeling.pruned import FORMAT, MODELING_FILE, load_pruned, modeling_source
from ..steps import read_step, step_record
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class KeptLayer:
    """One decoder layer of the pruned model: where it came from and which blocks it has."""

    source_layer: int
    attn: bool
    mlp: bool


def plan_layers(num_layers: int, removed: list[str]) -> list[KeptLayer]:
    """Kept layers in order; a layer with both blocks removed is left out."""
    gone = set(removed)
    if len(gone) != len(removed):
        raise UserError(f"the removed block list names a block twice: {removed}")
    for name in removed:
        if parse_block(name)[1] >= num_layers:
            raise UserError(f"block {name!r} does not exist: the model has {num_layers} layers")
    plan = [KeptLayer(i, f"attn.{i}" not in gone, f"mlp.{i}" not in gone) for i in range(num_layers)]
    plan = [k for k in plan if k.attn or k.mlp]
    if not plan:
        raise UserError("every block is removed; nothing is left to materialise")
    return plan


def given_blocks(blocks: str | list[str], num_layers: int) -> list[str]:
    """An explicit block list ("attn.5,mlp.6" or a list), checked against a model of `num_layers`
    layers: valid names, each once, within the layers, not every block. Order is kept."""
    names = [b.strip() for b in blocks.split(",")] if isinstance(blocks, str) else [str(b).strip() for b in blocks]
    if not names or not all(names):
        raise UserError(f"the given block list {blocks!r} has an empty entry; list blocks separated by commas, "
                        "e.g. attn.5,mlp.6")
    seen: set[str] = set()
    for name in names:
        try:
            kind, layer = parse_block(name)
        except UserError:
            raise UserError(f"the given block list names {name!r}, not a block; write attn.<layer> or mlp.<layer>, "
                            "e.g. attn.5,mlp.6") from None
        if name != f"{kind}.{layer}":
            raise UserError(f"the given block list names {name!r}; write it as {kind}.{layer}")
        if layer >= num_layers:
            raise UserError(f"the given block list names {name}, but the model has {num_layers} layers "
                            f"(attn.0 .. mlp.{num_layers - 1}); use layer numbers below {num_layers}")
        if name in seen:
            raise UserError(f"the given block list names {name} twice; list each block once")
        seen.add(name)
    if len(names) == 2 * num_layers:
        raise UserError(f"the given block list removes all {2 * num_layers} blocks; nothing would be left")
    return names


def base_classes(model) -> tuple[type, type]:
    """The model's own transformers config and model classes (the pruned classes' bases)."""
    import transformers

    model_cls, config_cls = type(model), type(model.config)
    if issubclass(model_cls, pruned_modeling.PrunedModelMixin):
        raise UserError("the model is already materialised; materialise from the prepared dense model")
    for cls in (model_cls, config_cls):
        if getattr(transformers, cls.__name__, None) is not cls:
            raise UserError(f"{cls.__name__} is not a transformers class (remote code); only architectures built "
                            "into transformers can be materialised")
    return config_cls, model_cls


# -- the pruned config and tensors -------------------------------------------------------------
def structure_record(adapter: Adapter, model) -> dict:
    """What the pruned modeling code needs to know about the architecture, from the adapter."""
    return {
        "layers_path": adapter.layers,
        "layer_returns_tuple": adapter.layer_returns_tuple,
        "branches": {kind: {**asdict(adapter.branch(kind)), "parts": adapter.branch(kind).parts()} for kind in KINDS},
        "base_architecture": type(model).__name__,
        "base_config": type(model.config).__name__,
    }


def pruned_config(model, adapter: Adapter, plan: list[KeptLayer], pruning: dict):
    """The pruned model's config: the source config with the kept layers' entries only."""
    config_cls, model_cls = base_classes(model)
    d = model.config.to_dict()
    dec = d[adapter.text_config] if adapter.text_config else d
    num_layers = dec["num_hidden_layers"]
    dec["num_hidden_layers"] = len(plan)
    for name in adapter.per_layer_lists:
        values = dec.get(name)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != num_layers:
            raise UserError(f"config.{name} = {values!r} is not a list with one entry per layer ({num_layers})")
        dec[name] = [values[k.source_layer] for k in plan]
    d["pruned_layers"] = [asdict(k) for k in plan]
    d["pruning"] = {"format": FORMAT, **pruning, **structure_record(adapter, model)}
    d["architectures"] = ["BlockPrunerForCausalLM"]
    d["auto_map"] = {"AutoConfig": f"{MODELING_FILE[:-3]}.BlockPrunerConfig",
                     "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.BlockPrunerForCausalLM"}
    cfg_cls, _ = pruned_modeling.make_classes(config_cls, model_cls)
    return cfg_cls.from_dict(d)


def pruned_tensors(model, adapter: Adapter, plan: list[KeptLayer]) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of the pruned model under their new names, and counts of what was left out.

    Tied weights are stored once, under the name they are tied to (as save_pretrained does), and
    re-tied on load.
    """
    prefix = adapter.layers + "."
    new_index = {k.source_layer: j for j, k in enumerate(plan)}
    kept_kind = {k.source_layer: {"attn": k.attn, "mlp": k.mlp} for k in plan}
    part_kind = {part: kind for kind in KINDS for part in adapter.branch(kind).parts()}
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    dropped = {"tensors": 0, "params": 0}
    targets = set(getattr(model, "all_tied_weights_keys", None) or {})  # names re-tied on load
    for name, t in sorted(model.state_dict().items(), key=lambda kv: kv[0] in targets):  # stable: targets last
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if key is not None and key in seen:
            continue  # a tied duplicate (lm_head = embed_tokens)
        if name.startswith(prefix):
            layer, rest = name[len(prefix):].split(".", 1)
            src = int(layer)
            kind = part_kind.get(rest.split(".", 1)[0])
            if src not in new_index or (kind and not kept_kind[src][kind]):
                dropped["tensors"] += 1
                dropped["params"] += t.numel()
                continue
            name = f"{prefix}{new_index[src]}.{rest}"
        if key is not None:
            seen.add(key)
        out[name] = t.detach().contiguous()
    return out, dropped


# -- directories ---------------------------------------------------------------------------------
def given_step(pm: PrunableModel, removed: list[str], method: str = "given", inputs: dict | None = None) -> dict:
    """A step-like record for a block list that was given, not searched (`materialize --blocks`).

    The same record as a step's (`step_record`: removed blocks, attention / MLP counts, the
    parameter counts of `pm.param_summary`), with no perplexity, scores or calibration, and
    settings saying where the list came from. It is never written as a step artifact.
    """
    removed = pm.check(removed)
    if not removed:
        raise UserError("the given block list is empty; name at least one block, e.g. attn.5,mlp.6")
    settings = {"method": method, "source_of_removals": "given"}
    record = step_record(len(removed), removed[:-1], removed[-1], removed[-1:], 0.0, 1, pm.param_summary(removed), [],
                         settings, inputs or {}, Cost(), {})
    return record | {"ppl": None, "nll_sum": None, "tokens": None}


def materialize(model_dir: str | Path, step_json: str | Path | None, out_dir: str | Path, method: str | None = None,
                *, removed: str | list[str] | None = None, evaluation: dict | None = None) -> dict:
    """Write the pruned model of a step artifact, or of an explicit block list (`removed`, with
    `step_json=None`: a list given, not searched), as a self-contained directory with its model
    card (README.md; `evaluation` adds the study's figures to it); returns a summary.

    `method` is the name recorded in config.json: default blockpruner for a step, given for a list.
    """
    from safetensors.torch import save_file

    from ..data.sources import carry_tokenizer_files
    from ..model_dir import load_model_dir, read_manifest, write_manifest
    from .model_card import write_model_card

    model_dir, out = Path(model_dir), Path(out_dir)
    if (step_json is None) == (removed is None):
        raise UserError("give the removed blocks one way: a step artifact or an explicit block list, not both")
    if out.resolve() == model_dir.resolve():
        raise UserError(f"--out {out} is the source model directory; write the pruned model elsewhere")
    manifest = read_manifest(model_dir)
    if step_json is None:  # checked before the model is loaded
        removed = given_blocks(removed, manifest["num_layers"])
        method = method or "given"
        step = None
    else:
        step = read_step(step_json)
        if step["inputs"].get("model_hash") != manifest["content_hash"]:
            raise UserError(f"{step_json}: stale, made for another model than {model_dir} (content hash differs); "
                            "rerun the search for this model")
        removed = list(step["removed"])
        method = method or "blockpruner"
    plan = plan_layers(manifest["num_layers"], removed)

    model, tok, _ = load_model_dir(model_dir, device="cpu")
    adapter = adapter_for(model.config.model_type)
    if step is None:  # the same parameter counts as a search step's, from the in-memory model
        step = given_step(PrunableModel.wrap(model), removed, method,
                          {"model": str(model_dir), "model_hash": manifest["content_hash"], "calibration": None,
                           "calibration_hash": None, "previous_step": None})
    expected = f"{step_json} expects" if step_json is not None else "the given blocks' count is"
    pruning = {
        "method": method,
        "k": step["k"],
        "removed": removed,
        "source_of_removals": "searched" if step_json is not None else "given",
        "source_model": str(model_dir),
        "source_hash": manifest["content_hash"],
        "source_num_layers": manifest["num_layers"],
        "step": str(step_json) if step_json is not None else None,
        "params": step["params"],
    }
    config = pruned_config(model, adapter, plan, pruning)
    tensors, dropped = pruned_tensors(model, adapter, plan)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        (tmp / MODELING_FILE).write_text(modeling_source(*base_classes(model)), encoding="utf-8")
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        carry_tokenizer_files(model_dir, tmp)
        del model, tensors
        pruned = load_pruned(tmp)
        params = sum(p.numel() for p in pruned.parameters())
        if params != step["params"]["remaining"]:
            raise UserError(f"materialised model has {params} parameters, but {expected} "
                            f"{step['params']['remaining']}; the {'step' if step_json else 'list'} does not match this model")
        summary = {
            "k": step["k"], "method": method, "removed": removed,
            "layers": len(plan), "attention_layers": sum(k.attn for k in plan),
            "source_layers": manifest["num_layers"], "removed_tensors": dropped["tensors"],
            "removed_params": dropped["params"], "params": params, "params_before": manifest["parameters"],
        }
        card = pruning_card(model_dir, manifest, pruning, step, summary, evaluation)
        write_model_card(tmp, card)
        # the base's remote-code choice travels on: the tokenizer written above may be the base's own code
        write_manifest(tmp, pruned, source=str(model_dir), dtype=manifest["dtype"],
                       extra={"pruning": {**pruning, "summary": summary}, "model_card": card.record()},
                       trust_remote_code=manifest.get("trust_remote_code", False))
    return summary


def pruning_card(model_dir: Path, manifest: dict, pruning: dict, step: dict, summary: dict,
                 evaluation: dict | None = None):
    """The model card (`model_card.ModelCard`) of a materialised pruning: source facts from the
    prepared model, the rest from the step (or the given list's step-like record) and the
    materialised counts."""
    from . import model_card

    inputs = step.get("inputs") or {}
    searched = pruning["source_of_removals"] == "searched"
    return model_card.ModelCard(
        **model_card.source_facts(model_dir, manifest),
        method=pruning["method"],
        params_before=summary["params_before"],
        params_after=summary["params"],
        search_method=step["settings"].get("method") if searched else None,
        source_of_removals=pruning["source_of_removals"],
        removed=list(pruning["removed"]),
        k=pruning["k"],
        source_layers=summary["source_layers"],
        layers=summary["layers"],
        attention_layers=summary["attention_layers"],
        ratio_no_embed=step["params"].get("ratio_no_embed"),
        calibration=model_card.calibration_facts(inputs.get("calibration"), inputs.get("calibration_hash"))
        if searched else None,
        settings=dict(step["settings"]) if searched else None,
        evaluation=dict(evaluation) if evaluation else None,
    )


# -- loading without remote code ------------------------------------------------------------------
