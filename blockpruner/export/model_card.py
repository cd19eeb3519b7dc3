"""The model card (README.md) of every exported model directory.

Hugging Face reads a model's README.md: YAML front matter (`base_model`, `license`,
`library_name`, `pipeline_tag`, `tags`) and a Markdown body. Each writer (`materialize`, the
compensated export, SliceGPT, LaCo; the Nemotron-NAS rewrite through `layout="nemotron-nas"`)
fills a `ModelCard` and calls `write_model_card(dir, card)`. The body says what was removed
(the blocks in removal order, K), how much (parameters before and after, the ratio), how the
blocks were chosen (method, calibration data, settings; or that the list was given), the
study's evaluation figures when passed in, and how to load the directory.

Nothing is guessed: `base_model` is written only when the source was a Hub id, `license` only
when the source states one (its README front matter or config.json, or a `license` field of
the prepared model's manifest); otherwise the text says "Licence: see the base model". The
text depends on its inputs only (no dates, no machine names), so a rerun writes the same file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from ..errors import UserError

CARD_FILE = "README.md"
LAYOUTS = ("blockpruner", "nemotron-nas", "slicegpt", "laco", "gguf")
LAYOUT_TAGS = {"blockpruner": (), "nemotron-nas": ("nemotron-nas",), "slicegpt": ("slicegpt",), "laco": ("laco",),
               "gguf": ("gguf", "llama.cpp")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LICENSE_KEYS = ("license", "license_name", "license_link")

# what a reader on the Hub needs to know about each block-removal method (search.baselines' names)
METHOD_TEXT = {
    "blockpruner": "BlockPruner (Zhong et al., ACL Findings 2025): greedy search that removes, one at a time, the "
                   "attention or MLP block whose removal gives the lowest calibration perplexity",
    "oneshot": "block calibration perplexities measured once on the dense model, lowest removed first (the paper's "
               "'- search' ablation)",
    "layer": "greedy whole-layer calibration-perplexity search (the paper's '- block' ablation)",
    "shortgpt": "ShortGPT (Men et al., 2024): the layers with the lowest Block Influence on the dense model",
    "relative-magnitude": "Relative Magnitude (Samragh et al., 2023): the layers with the lowest ||f(x)|| / "
                          "||x + f(x)|| on the dense model",
    "bi-block": "iterative block-level Block Influence (BlockPruner paper, Figure 6)",
    "rm-block": "iterative block-level relative magnitude (BlockPruner paper, Figure 6)",
    "js": "iterative block-level Jensen-Shannon divergence to the dense model (BlockPruner paper, Appendix D)",
    "given": "an explicit block list given to `blockpruner materialize --blocks` (for example a published removal "
             "order or another tool's result), not searched by this package",
}
# a set refined at the same K after its search (`blockpruner refine`; the step's settings.refine)
REFINE_TEXT = {
    "swap": "rounds of swaps of a removed block for a kept one of the same kind, each round taking the swap that "
            "lowers the calibration perplexity most (`blockpruner refine --method swap`)",
    "evolution": "an EvoPress-style (1 + lambda) evolutionary search seeded with that set, judged by calibration "
                 "perplexity (`blockpruner refine --method evolution`)",
}


@dataclass(frozen=True)
class ModelCard:
    """What the card says; every field is plain data (stored in a pruned directory's manifest)."""

    source: str  # the dense model as prepared: hub id, local directory, .gguf file or pypi:<package>
    method: str  # the name recorded in config.json (blockpruner, given, shortgpt, slicegpt, laco, ...)
    params_before: int
    params_after: int
    base_model: str | None = None  # the source's Hub id, when it was one
    license: dict | None = None  # license (+ license_name, license_link) as the source states it
    search_method: str | None = None  # the step's settings.method (what chose the blocks)
    source_of_removals: str | None = None  # searched | given (block removal); None for compression
    removed: list[str] = field(default_factory=list)  # blocks in removal order
    k: int | None = None
    source_layers: int | None = None
    layers: int | None = None
    attention_layers: int | None = None
    ratio_no_embed: float | None = None
    calibration: dict | None = None  # calibration data: path, checksum and what the artifact says about itself
    settings: dict | None = None  # the search step's settings
    compensation: dict | None = None  # a folded correction: method, alpha, guard, kept of fitted, windows
    details: list[str] = field(default_factory=list)  # method-specific lines (SliceGPT, LaCo)
    layout: str = "blockpruner"
    evaluation: dict | None = None

    def record(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_record(cls, d: Mapping) -> "ModelCard":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# -- facts about the source -------------------------------------------------------------------------
def hub_id(source: str) -> str | None:
    """`source` when it names a Hub model (org/name, not a path here, not pypi: or .gguf), else None."""
    if source.startswith(("pypi:", ".", "/", "~")) or source.endswith(".gguf") or not _HUB_ID.match(source):
        return None
    return None if Path(source).expanduser().exists() else source


def front_matter(text: str) -> dict:
    """The YAML front matter of a README (empty when there is none or it does not parse)."""
    m = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.S)
    if not m:
        return {}
    try:
        d = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return d if isinstance(d, dict) else {}


def _license_of(d: Mapping) -> dict | None:
    if not isinstance(d.get("license"), str) or not d["license"].strip():
        return None
    return {k: d[k] for k in _LICENSE_KEYS if isinstance(d.get(k), str) and d[k].strip()}


def find_license(source: str, prepared_dir: str | Path, manifest: Mapping | None = None) -> dict | None:
    """The licence as the source states it: the manifest's `license` field, else the front
    matter of README.md or config.json's `license` in the source directory (a local source) or
    the prepared directory. None when none says; the card then points at the base model."""
    found = _license_of(manifest or {})
    if found:
        return found
    dirs = [Path(prepared_dir)]
    src = Path(source).expanduser()
    if not source.startswith("pypi:") and src.is_dir():
        dirs.insert(0, src)
    for d in dirs:
        readme, config = d / CARD_FILE, d / "config.json"
        candidates = []
        if readme.is_file():
            candidates.append(front_matter(readme.read_text(encoding="utf-8", errors="replace")))
        if config.is_file():
            try:
                candidates.append(json.loads(config.read_text(encoding="utf-8")))
            except ValueError:
                pass
        for c in candidates:
            found = _license_of(c) if isinstance(c, dict) else None
            if found:
                return found
    return None


def source_facts(prepared_dir: str | Path, manifest: Mapping) -> dict:
    """source, base_model and license of a prepared model (its manifest's `source`)."""
    source = str(manifest["source"])
    return {"source": source, "base_model": hub_id(source), "license": find_license(source, prepared_dir, manifest)}


def calibration_facts(path: str | Path | None, checksum: str | None, **extra) -> dict | None:
    """The calibration data as its artifact describes it (data source, sampling, windows), when the
    artifact at `path` is still there and is the one recorded (same checksum); path and checksum otherwise."""
    if path is None:
        return None
    d = {"path": str(path), "checksum": checksum, **extra}
    f = Path(path) / "manifest.json" if Path(path).is_dir() else Path(path)
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return d
    if checksum is None or m.get("checksum") == checksum:
        for k in ("source", "hub_config", "split", "sampling", "mode", "nsamples", "seed", "seqlen", "windows", "tokens"):
            if m.get(k) is not None and k not in extra:
                d[k] = m[k]
        if extra.get("windows") is not None and m.get("windows") not in (None, extra["windows"]):
            d["windows_total"] = m["windows"]  # only the first windows were used: their tokens are not the total
            d.pop("tokens", None)
    return d


# -- evaluation figures ----------------------------------------------------------------------------
def evaluation_from_files(model: Sequence[str | Path], dense: Sequence[str | Path] = ()) -> dict:
    """Evaluation rows from the study's eval artifacts (`eval-ppl` / `eval-tasks` JSON) of this
    model and, optionally, of the dense model: {metric: {"model": x, "dense": y}}."""
    from ..artifacts import read_json

    rows: dict[str, dict] = {}
    for role, files in (("model", model), ("dense", dense)):
        for f in files:
            r = read_json(f)
            if r.get("format", "").startswith("blockpruner.eval_ppl"):
                rows.setdefault(f"WikiText-2 perplexity ({r['seqlen']}-token windows)", {})[role] = r["ppl"]
            elif r.get("format", "").startswith("blockpruner.eval_tasks"):
                for name, t in r["tasks"].items():
                    rows.setdefault(f"{name} ({t['metric']})", {})[role] = t["value"]
                rows.setdefault("zero-shot average", {})[role] = r["average"]
            else:
                raise UserError(f"{f}: not an eval-ppl or eval-tasks result; give those artifacts")
    return rows


def _num(x) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    return f"{x:,.2f}" if abs(x) >= 10 else f"{x:.4f}"


def _evaluation_table(evaluation: Mapping) -> list[str]:
    rows = {k: (v if isinstance(v, Mapping) else {"model": v}) for k, v in evaluation.items()}
    with_dense = any("dense" in v for v in rows.values())
    head = "| metric | this model |" + (" dense model |" if with_dense else "")
    out = [head, "| --- | ---: |" + (" ---: |" if with_dense else "")]
    for name, v in rows.items():
        line = f"| {name} | {_num(v['model']) if 'model' in v else '–'} |"
        if with_dense:
            line += f" {_num(v['dense']) if 'dense' in v else '–'} |"
        out.append(line)
    return out


# -- the text ---------------------------------------------------------------------------------------
def _tags(card: ModelCard, layout: str, extra: Sequence[str]) -> list[str]:
    tags = ["pruned", "blockpruner", *LAYOUT_TAGS[layout]]
    if card.compensation:
        tags.append("compensated")
    tags += list(extra)
    return list(dict.fromkeys(tags))


def _header(card: ModelCard, layout: str, tags: Sequence[str]) -> str:
    meta: dict = {}
    if card.base_model:
        meta["base_model"] = card.base_model
    if card.license:
        meta |= {k: card.license[k] for k in _LICENSE_KEYS if k in card.license}
    meta |= {"library_name": "gguf" if layout == "gguf" else "transformers", "pipeline_tag": "text-generation",
             "tags": _tags(card, layout, tags)}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False) + "---\n"


def _base_text(card: ModelCard, long: bool = False) -> str:
    if card.base_model:
        return f"[{card.base_model}](https://huggingface.co/{card.base_model})"
    return f"`{card.source}`" + (" (as given to `blockpruner prepare-model`; not a Hub model id)" if long else "")


def _base_name(card: ModelCard) -> str:
    if card.base_model or card.source.startswith("pypi:"):
        return card.base_model or card.source
    return Path(card.source).name or card.source


def _licence_text(card: ModelCard, short: bool = False) -> str:
    if card.license:
        name = card.license.get("license_name") or card.license["license"]
        link = card.license.get("license_link")
        text = f"`{name}`" + (f" ({link})" if link else "")
        return text if short else f"{text}: the base model's licence, which the pruned weights keep"
    if short:
        return "see the base model"
    return ("Licence: see the base model. No licence was recorded with the source; the pruned weights are derived "
            "from the base model and keep its terms")


def _method_label(card: ModelCard) -> str:
    m = card.search_method or card.method
    return {"blockpruner": "BlockPruner", "given": "a given block list", "slicegpt": "SliceGPT", "laco": "LaCo"}.get(m, m)


def _ratio(card: ModelCard) -> str:
    removed = card.params_before - card.params_after
    text = f"{100 * removed / card.params_before:.2f}% of all parameters removed ({removed:,})"
    if card.ratio_no_embed is not None:
        text += f"; {100 * card.ratio_no_embed:.2f}% of the non-embedding parameters"
    return text


def _overview(card: ModelCard) -> list[str]:
    rows = [("Base model", _base_text(card, long=True)), ("Method", _method_label(card) + (
        f" (recorded as `{card.method}`)" if card.search_method and card.search_method != card.method else ""))]
    if card.source_of_removals is not None:
        n = 2 * card.source_layers if card.source_layers else None
        attn = sum(b.startswith("attn.") for b in card.removed)
        rows.append(("Blocks removed (K)", f"{card.k}" + (f" of {n}" if n else "") +
                     f" ({attn} attention, {len(card.removed) - attn} MLP)"))
        rows.append(("Removed blocks were", "searched" if card.source_of_removals == "searched" else
                     "given (not searched)"))
    if card.layers is not None and card.source_layers is not None:
        rows.append(("Decoder layers", f"{card.source_layers} → {card.layers}" + (
            f" ({card.attention_layers} with attention)" if card.attention_layers is not None else "")))
    rows.append(("Parameters", f"{card.params_before:,} → {card.params_after:,}"))
    rows.append(("Pruning ratio", _ratio(card)))
    if card.compensation:
        c = card.compensation
        rows.append(("Compensation", f"`{c['method']}` correction folded into the weights, "
                                     f"{c.get('kept', '?')} of {c.get('fitted', '?')} kept"))
    rows.append(("Licence", _licence_text(card, short=True)))
    return ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]


def _calibration_lines(cal: Mapping) -> list[str]:
    data = cal.get("source") or cal["path"]
    if cal.get("hub_config"):
        data += f" ({cal['hub_config']}" + (f", {cal['split']} split)" if cal.get("split") else ")")
    parts = [f"data: `{data}`"]
    if cal.get("nsamples") is not None:
        how = [f"seed {cal['seed']}"] if cal.get("seed") is not None else []
        how += [f"{cal['sampling']} sampling"] if cal.get("sampling") else []
        parts.append(f"{cal['nsamples']} samples" + (f" ({', '.join(how)})" if how else ""))
    if cal.get("windows") is not None:
        windows = f"{cal['windows']}" + (f" of {cal['windows_total']}" if cal.get("windows_total") else "") + " windows"
        windows += f" of {cal['seqlen']} tokens" if cal.get("seqlen") else ""
        parts.append(windows + (f" ({cal['mode']})" if cal.get("mode") else ""))
    if cal.get("tokens") is not None:
        parts.append(f"{cal['tokens']:,} tokens")
    lines = ["- Calibration " + ", ".join(parts) + "."]
    lines.append(f"- Calibration artifact: `{cal['path']}`" + (f" (checksum `{cal['checksum'][:16]}…`)"
                                                               if cal.get("checksum") else "") + ".")
    return lines


def _how_chosen(card: ModelCard) -> list[str]:
    out = ["## How the blocks were chosen", ""]
    if card.source_of_removals == "given":
        out += [f"The list was given, not searched: {METHOD_TEXT['given']}. No calibration data was used to choose "
                "it; the blocks were removed in the order listed.", ""]
    else:
        m = card.search_method or card.method
        out += [f"Method: {METHOD_TEXT.get(m, f'`{m}`')}.", ""]
        if (refine := (card.settings or {}).get("refine")) is not None:
            out += [f"The set it reached was then refined at the same number of blocks: "
                    f"{REFINE_TEXT.get(refine, f'`{refine}`')}.", ""]
        lines = _calibration_lines(card.calibration) if card.calibration else []
        shown = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in (card.settings or {}).items() if k != "method")
        if shown:
            lines.append(f"- Search settings: {shown}.")
        out += lines + ([""] if lines else [])
    if card.compensation:
        c = card.compensation
        what = {"scale": "a per-channel scale", "linear": "a d × d linear map"}.get(c["method"], f"a `{c['method']}` correction")
        out += [f"After removal, {what} (ridge alpha {c.get('alpha')}) was fitted in closed form on the dense model's "
                "block outputs over the calibration windows below and folded into the nearest preceding kept block of "
                "each run of removed blocks: same tensor shapes as the plain pruned model. "
                + ("Only corrections that lowered the calibration loss were kept (the guard)."
                   if c.get("guard") else "Every fitted correction was kept (no guard)."), ""]
        if c.get("calibration"):
            out += _calibration_lines(c["calibration"]) + [""]
    return out


def _compression(card: ModelCard) -> list[str]:
    text = {"slicegpt": "SliceGPT (Ashkboos et al., ICLR 2024): the residual stream is rotated to its principal "
                        "components over calibration tokens and every weight matrix loses the rows and columns of the "
                        "trailing ones, so the model is narrower, not shallower.",
            "laco": "LaCo (Yang et al., 2024): runs of consecutive layers are merged into an earlier layer "
                    "(reserving differences while seeking common) while the final hidden states stay similar on "
                    "calibration samples; the merged layers are dropped."}[card.layout]
    out = ["## What was done", "", text, ""]
    out += [f"- {d}" for d in card.details]
    if card.calibration:
        out += _calibration_lines(card.calibration)
    return out + [""]


def _removed_table(card: ModelCard) -> list[str]:
    out = ["## Removed blocks, in removal order", "",
           "A block is one residual branch of a decoder layer: its attention block (`attn.<layer>`) or its MLP block "
           "(`mlp.<layer>`); layer numbers are the base model's. A removed block's weights are deleted, a layer "
           "whose two blocks are both removed is dropped, and the kept layers are renumbered (`pruned_layers` in "
           "config.json maps them back).", "", "| # | block | kind | layer of the base model |", "| ---: | --- | --- | ---: |"]
    for i, b in enumerate(card.removed, 1):
        kind, layer = b.split(".")
        out.append(f"| {i} | `{b}` | {'attention' if kind == 'attn' else 'MLP'} | {layer} |")
    return out + [""]


def _auto_classes(remote_code: bool) -> list[str]:
    """A code block loading DIR with transformers' Auto classes."""
    trust = ", trust_remote_code=True" if remote_code else ""
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"model = AutoModelForCausalLM.from_pretrained(DIR{trust})", "tokenizer = AutoTokenizer.from_pretrained(DIR)",
            "```"]


def _loading(layout: str) -> list[str]:
    out = ["## How to load", ""]
    if layout == "blockpruner":
        out += ["The directory carries its own modeling code (`modeling_blockpruner.py`, named in config.json's "
                "`auto_map`) for the pruned shapes:", "", *_auto_classes(True), "",
                "Without `trust_remote_code=True` transformers would build the unpruned base architecture, so "
                "always pass it. With the `blockpruner` package installed, no code from the directory runs:", "",
                "```python", "import blockpruner", "model = blockpruner.load_pruned(DIR)  # the model only; the "
                "tokenizer as above", "```", "",
                "`DIR` is this directory (for a Hub copy, its id with `from_pretrained`; `load_pruned` reads a local "
                "directory, e.g. from `huggingface_hub.snapshot_download`). Generate with the KV cache as usual: only "
                "the remaining attention blocks have cache entries. For llama.cpp (Llama-family models): "
                "`blockpruner export-gguf DIR OUT.gguf --outtype q8_0`."]
    elif layout == "nemotron-nas":
        out += ["Nemotron-NAS layout (`DeciLMForCausalLM`): each layer is an optional attention block and an optional "
                "FFN (`block_configs`, `no_op`), the kept blocks packed in forward order. Zero-weight placeholders "
                "(`pruning.decilm_layers` in config.json) stand where llama.cpp's deci graph needs a block: they add "
                "exactly zero.", "",
                "- llama.cpp: `convert_hf_to_gguf.py DIR` converts it for a SentencePiece vocabulary (Llama 2 / "
                "Mistral style; checked against the pruned model in llama.cpp) and refuses other BPE vocabularies "
                "than Llama 3's (that one was not run); for any vocabulary, `blockpruner export-gguf PRUNED_DIR "
                "OUT.gguf` writes the GGUF directly (checked in llama.cpp).",
                "- vLLM / SGLang (`vllm serve DIR`): written for their Nemotron-NAS readers; not run by blockpruner.",
                "- transformers: NVIDIA's DeciLM code, named in config.json's `auto_map` only when exported with "
                "`--nemotron-nas-auto-map` (`from_pretrained(DIR, trust_remote_code=True)`); not run by blockpruner. "
                "The pruned directory this was written from loads with `blockpruner.load_pruned`."]
    elif layout == "gguf":
        out += ["GGUF files for llama.cpp (`model-<type>.gguf`: f32, or f16 / bf16 / q8_0 / q4_k_m made by llama.cpp's own "
                "quantiser), written by `blockpruner export-gguf` in llama.cpp's `deci` architecture: the kept blocks "
                "packed into (attention, MLP) layers, with zero-weight placeholders where llama.cpp's graph needs a "
                "block (they add exactly zero). Each f32 file was run in llama.cpp and its logits compared with the "
                "pruned model's before it was quantised; the checks ran through llama-cpp-python:", "",
                "```python", "from llama_cpp import Llama  # llama-cpp-python",
                "llm = Llama(model_path=\"model-q8_0.gguf\")", "```", "",
                "llama.cpp's own tools read the same file, e.g. `llama-cli -m model-q8_0.gguf`."]
    elif layout == "slicegpt":
        out += ["The directory carries its own modeling code (`modeling_slicegpt.py`, named in config.json's "
                "`auto_map`) for the sliced shapes:", "", *_auto_classes(True), "",
                "With the `blockpruner` package installed, no code from the directory runs:", "", "```python",
                "from blockpruner.compress.slicegpt import load_sliced", "model = load_sliced(DIR)", "```"]
    else:  # laco: a standard checkpoint with fewer layers
        out += ["A standard checkpoint of the base architecture with fewer layers; no extra code:", "",
                *_auto_classes(False)]
    return out + [""]


def model_card_text(card: ModelCard | Mapping, *, layout: str | None = None, tags: Sequence[str] = (),
                    evaluation: Mapping | None = None) -> str:
    """The README.md text: YAML front matter, then the body. `layout` (default: the card's) picks the
    tags and the loading instructions (blockpruner, nemotron-nas, slicegpt, laco); `tags` are added
    to the front matter's; `evaluation` ({metric: number or {"model": x, "dense": y}}) replaces the
    card's figures."""
    card = card if isinstance(card, ModelCard) else ModelCard.from_record(card)
    layout = layout or card.layout
    if layout not in LAYOUTS:
        raise UserError(f"unknown model card layout {layout!r}; use one of: {', '.join(LAYOUTS)}")
    evaluation = card.evaluation if evaluation is None else evaluation
    base = _base_name(card)
    if card.source_of_removals is not None:
        title = f"{base}, {card.k} blocks removed ({_method_label(card)})"
        lead = f"This is {_base_text(card)} with {card.k} of its residual blocks removed and nothing retrained"
        if card.compensation:
            kept = card.compensation.get("kept")
            lead += (f", with {kept} fitted correction(s) folded into the kept weights" if kept else
                     ", compensation fitted but none kept (the weights are the plain pruned model's)")
        lead += "."
    else:
        title = f"{base}, compressed with {_method_label(card)}"
        lead = f"This is {_base_text(card)} compressed by {_method_label(card)} without retraining."
    if layout == "nemotron-nas":
        title += ", Nemotron-NAS layout"
    elif layout == "gguf":
        title += ", GGUF for llama.cpp"
    body = [f"# {title}", "", lead + " It was written by the `blockpruner` package (a BlockPruner implementation); "
            "its config.json and manifest.json record the same facts as this card.", "", *_overview(card), ""]
    if card.source_of_removals is not None:
        body += _removed_table(card) + _how_chosen(card)
    else:
        body += _compression(card)
    if evaluation:
        body += ["## Evaluation", "", "Figures of the study that produced this model (same data and settings for both "
                 "columns):", "", *_evaluation_table(evaluation), ""]
    body += _loading(layout)
    body += ["## Licence", "", _licence_text(card) + ".", ""]
    return _header(card, layout, tags) + "\n" + "\n".join(body).rstrip() + "\n"


def write_model_card(out_dir: str | Path, card: ModelCard | Mapping, **kw) -> Path:
    """Write `out_dir/README.md` (atomically); keyword arguments as `model_card_text`."""
    from ..artifacts import atomic_write_text

    return atomic_write_text(Path(out_dir) / CARD_FILE, model_card_text(card, **kw))


def card_from_dir(model_dir: str | Path) -> ModelCard:
    """The card of a directory written by `materialize` or the compensated export (its manifest's
    `model_card` record), e.g. to write it again in another layout or with evaluation figures."""
    f = Path(model_dir) / "manifest.json"
    try:
        record = json.loads(f.read_text(encoding="utf-8"))["model_card"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{model_dir}: no model card record in manifest.json; materialise the model again") from None
    return ModelCard.from_record(record)


def with_evaluation(card: ModelCard, evaluation: Mapping | None) -> ModelCard:
    return replace(card, evaluation=dict(evaluation) if evaluation else None)
