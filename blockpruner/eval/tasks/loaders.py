"""Local data loaders for the `*_local` task YAMLs (referenced as `custom_dataset`).

lm-eval calls `custom_dataset(**metadata, **dataset_kwargs)`: `local_data` (the data folder)
comes from the TaskManager metadata, `data_files` ({split: path relative to local_data})
and any extra file keys from the YAML's `dataset_kwargs`. Every loader returns a
`DatasetDict` whose rows have the same fields as the Hub data set the built-in task reads,
so the YAMLs can copy the built-in `doc_to_text` / `doc_to_target` / `doc_to_choice`
verbatim. Rows are built with `Dataset.from_list` (no datasets cache, no network).

This file is loaded by path (lm-eval's `!function`), so it imports nothing from blockpruner.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


def _folder(local_data: str | None) -> Path:
    if not local_data:
        raise ValueError(
            "the *_local tasks need the data folder as TaskManager metadata 'local_data' "
            "(lm-eval CLI: --metadata '{\"local_data\": \"/path/to/evals\"}')"
        )
    return Path(local_data)


def _file(local_data: str | None, rel: str) -> Path:
    path = _folder(local_data) / rel
    if not path.is_file():
        raise FileNotFoundError(f"local eval data file not found: {path}")
    return path


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset_dict(splits: dict[str, list[dict]]):
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def _per_split(local_data, data_files: dict[str, str], convert) -> object:
    return _dataset_dict({split: [convert(r) for r in _jsonl(_file(local_data, rel))] for split, rel in data_files.items()})


def piqa(local_data: str | None = None, data_files: dict | None = None, labels_files: dict | None = None, **_):
    """PIQA: goal/sol1/sol2 from valid.jsonl joined with the 0/1 labels of valid-labels.lst (HF layout)."""
    splits = {}
    for split, rel in (data_files or {}).items():
        rows = _jsonl(_file(local_data, rel))
        labels = _file(local_data, labels_files[split]).read_text(encoding="utf-8").split()
        if len(labels) != len(rows):
            raise ValueError(f"PIQA {split}: {len(rows)} questions but {len(labels)} labels; the files do not belong together")
        splits[split] = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)} for r, y in zip(rows, labels)]
    return _dataset_dict(splits)


def winogrande(local_data: str | None = None, data_files: dict | None = None, **_):
    """WinoGrande 1.1 jsonl already has the HF fields (sentence, option1, option2, answer as "1"/"2")."""
    keys = ("sentence", "option1", "option2", "answer")
    return _per_split(local_data, data_files or {}, lambda r: {k: str(r[k]) for k in keys})


def _choices(question: dict) -> dict:
    return {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}


def arc(local_data: str | None = None, data_files: dict | None = None, **_):
    """Original ARC-V1 jsonl -> allenai/ai2_arc rows: id, question (the stem), choices{text,label}, answerKey."""
    return _per_split(local_data, data_files or {}, lambda r: {
        "id": r["id"], "question": r["question"]["stem"], "choices": _choices(r["question"]), "answerKey": r["answerKey"]})


def openbookqa(local_data: str | None = None, data_files: dict | None = None, **_):
    """Original OpenBookQA jsonl -> allenai/openbookqa 'main' rows: id, question_stem, choices{text,label}, answerKey."""
    return _per_split(local_data, data_files or {}, lambda r: {
        "id": r["id"], "question_stem": r["question"]["stem"], "choices": _choices(r["question"]), "answerKey": r["answerKey"]})


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess` (tasks/hellaswag/utils.py), applied on top of the file's own cleaning."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def read_hellaswag_text(path: Path) -> list[dict]:
    """The 6-lines-per-item text layout: "label: context", gold 0-3, four endings."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines, not a multiple of 6; not the HellaSwag 6-line text layout")
    items = []
    for i in range(0, len(lines), 6):
        ctx, gold, endings = lines[i], lines[i + 1].strip(), lines[i + 2 : i + 6]
        if gold not in ("0", "1", "2", "3"):
            raise ValueError(f"{path}: line {i + 2} should be a label 0-3, found {gold!r}")
        items.append({"ctx": ctx, "endings": endings, "label": gold})
    return items


def hellaswag(local_data: str | None = None, data_files: dict | None = None, **_):
    """HellaSwag rows already in the form lm-eval's process_docs gives: query, choices, gold (and label).

    The file holds "activity_label: ctx" rather than ctx_a and ctx_b, so lm-eval's
    `ctx_b.capitalize()` cannot be redone: scores are close to, not identical with, the Hub task's.
    """
    splits = {}
    for split, rel in (data_files or {}).items():
        splits[split] = [
            {"query": hellaswag_preprocess(it["ctx"]), "choices": [hellaswag_preprocess(e) for e in it["endings"]],
             "gold": int(it["label"]), "label": it["label"]}
            for it in read_hellaswag_text(_file(local_data, rel))
        ]
    return _dataset_dict(splits)
