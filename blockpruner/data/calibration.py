"""Calibration data: read records, sample them reproducibly, tokenize into windows.

Sources are a hub data set (`tatsu-lab/alpaca`, `wikitext` + config) or a local
.json / .jsonl / .parquet / .txt file. A record's text is its `text` field, or, for Alpaca
records with only `instruction` / `input` / `output`, the Alpaca prompt template -- the
same string the hub's `text` column holds. Empty and whitespace-only records are dropped
before sampling; samples are drawn with `random.Random(seed).sample`, which gives the same
indices on every machine and Python version for an integer seed.

Sampling:
- `all`: draw from every non-empty record of the source.
- `official-split` (the paper's): the official code splits Alpaca's 52,002 rows with
  `train_test_split(test_size=0.2, seed=42)`, splits that 20% again 0.5/0.5 with seed 42 and
  draws from the first half (5,200 rows). The split is recomputed here from the row count
  alone (numpy's generator, as `datasets` does), so a local copy of the full set gives the
  same slice as the hub.

Modes:
- `concat` (the reference code's): join the sampled texts with a blank line, tokenize once,
  cut into `seqlen` windows, drop the remainder.
- `per-sample`: one sequence per sample, truncated to `seqlen`; sequences are stored padded
  with their lengths, and the scoring engine runs each at its own length, so padding never
  enters a forward pass or the loss.

The artifact is `tokens.safetensors` (input_ids [N, T], lengths [N]) plus `manifest.json`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import atomic_write, read_json, sha256_file, sha256_text, write_json
from ..errors import UserError

FORMAT = "blockpruner.calibration/1"
MODES = ("concat", "per-sample")
SAMPLINGS = ("all", "official-split")
ALPACA_ROWS = 52_002  # tatsu-lab/alpaca's train split, which the official split is defined on
OFFICIAL_SPLIT_SEED = 42
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt", ".raw")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)


@dataclass(frozen=True)
class CalibrationSpec:
    source: str  # local path or hub data set id
    nsamples: int = 256
    seed: int = 42
    seqlen: int = 2048
    mode: str = "concat"
    hub_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    max_windows: int | None = None  # keep only the first N windows (quick runs, CI); None = all
    sampling: str = "all"  # all | official-split

    def validate(self) -> None:
        for key in ("nsamples", "seqlen"):
            if getattr(self, key) <= 0:
                raise UserError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.max_windows is not None and self.max_windows <= 0:
            raise UserError(f"max_windows must be a positive integer or unset, got {self.max_windows}")
        if self.seqlen < 2:
            raise UserError(f"seqlen must be at least 2 tokens, got {self.seqlen}")
        if self.mode not in MODES:
            raise UserError(f"unknown calibration mode {self.mode!r}; use one of: {', '.join(MODES)}")
        if self.sampling not in SAMPLINGS:
            raise UserError(f"unknown calibration sampling {self.sampling!r}; use one of: {', '.join(SAMPLINGS)}")
        if is_local(self.source) and not Path(self.source).exists():
            raise UserError(f"calibration file not found: {self.source}; check the path (or give a hub data set id)")


def is_local(source: str) -> bool:
    return Path(source).exists() or source.startswith((".", "/", "~")) or source.endswith(LOCAL_SUFFIXES)


def render(record: dict, text_field: str = "text") -> str:
    """A record's calibration text: its text field, or the Alpaca template."""
    if isinstance(record.get(text_field), str):
        return record[text_field]
    if "instruction" in record and "output" in record:
        fmt = ALPACA_WITH_INPUT if (record.get("input") or "").strip() else ALPACA_NO_INPUT
        return fmt.format(instruction=record["instruction"], input=record.get("input") or "", output=record["output"])
    raise UserError(
        f"calibration record has neither a {text_field!r} field nor Alpaca's instruction/output "
        f"(fields: {sorted(record)}); pass --text-field with the right column"
    )


def read_local(path: Path) -> list:
    """Records of a local file: dicts for json/jsonl/parquet, strings (one per line) for text."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict(orient="records")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not valid UTF-8 (byte {e.start}: {e.object[e.start:e.start + 4]!r}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name}`"
        ) from None
    if suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise UserError(f"{path}: a JSON object must hold exactly one list of records")
            data = lists[0]
        return data
    if suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return text.splitlines()


def official_split_rows(n: int, seed: int = OFFICIAL_SPLIT_SEED) -> np.ndarray:
    """Rows of the official code's Alpaca calibration slice among n rows.

    `Dataset.train_test_split(test_size=0.2, seed)` takes `default_rng(seed).permutation(n)`
    and keeps its first ceil(0.2 n) entries as "test"; that part is split again with
    test_size=0.5, and its "train" half (the entries after the first ceil(0.5 m)) is the
    slice the official search samples from.
    """
    held_out = np.random.default_rng(seed).permutation(n)[: math.ceil(0.2 * n)]
    m = len(held_out)
    return held_out[np.random.default_rng(seed).permutation(m)[math.ceil(0.5 * m):]]


def load_texts(spec: CalibrationSpec) -> tuple[list[tuple[int, str]], dict]:
    """The texts samples are drawn from, with their row indices in the source, and source info.

    `all`: every non-empty record. `official-split`: the official slice's rows in its order,
    empty ones included (the official code does not drop them).
    """
    if is_local(spec.source):
        path = Path(spec.source)
        records = read_local(path)
        info = {"source": str(path), "source_sha256": sha256_file(path)}
    else:
        records, info = _load_hub(spec)
    info["records"] = len(records)
    if spec.sampling == "official-split":
        if len(records) != ALPACA_ROWS:
            raise UserError(
                f"sampling official-split is defined on the full {ALPACA_ROWS:,}-row tatsu-lab/alpaca train split; "
                f"{spec.source} has {len(records):,} records: use the hub id or a full local copy, or sampling: all"
            )
        rows = official_split_rows(len(records)).tolist()
        info["slice_rows"] = len(rows)
        return [(i, _text(records[i], spec.text_field)) for i in rows], info
    texts = [_text(r, spec.text_field) for r in records]
    kept = [(i, t) for i, t in enumerate(texts) if t.strip()]
    info["nonempty_records"] = len(kept)
    return kept, info


def _text(record, text_field: str) -> str:
    return record if isinstance(record, str) else render(record, text_field)


def _load_hub(spec: CalibrationSpec) -> tuple[list[dict], dict]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.source, spec.hub_config, split=spec.split)
    except Exception as e:  # network, unknown id, missing config
        raise UserError(
            f"cannot load hub data set {spec.source!r} ({e.__class__.__name__}); offline, point the "
            "calibration source at a local copy (config key calibration.<name>.path, CLI --data PATH)"
        ) from None
    return list(ds), {"source": spec.source, "hub_config": spec.hub_config, "split": spec.split, "source_sha256": ds._fingerprint}


@dataclass
class Sample:
    """The drawn texts, their indices in the source, and where the source came from."""

    indices: list[int]
    texts: list[str]
    info: dict


def draw_samples(spec: CalibrationSpec) -> Sample:
    """Read the source and draw `nsamples` texts; cheap, so it runs before any model load.

    `random.Random(seed).sample(range(n), k)` is what the official code's
    `transformers.set_seed(seed); random.sample(range(n), k)` draws.
    """
    spec.validate()
    kept, info = load_texts(spec)
    if spec.nsamples > len(kept):
        what = "rows in the official slice" if spec.sampling == "official-split" else "non-empty records"
        raise UserError(f"nsamples={spec.nsamples} but {spec.source} has only {len(kept)} {what}; lower nsamples")
    picks = random.Random(spec.seed).sample(range(len(kept)), spec.nsamples)
    return Sample([kept[p][0] for p in picks], [kept[p][1] for p in picks], info)


def sample_calibration(spec: CalibrationSpec, tokenizer, out_dir: str | Path, sample: Sample | None = None) -> dict:
    """Sample, tokenize and write the calibration artifact; returns the manifest."""
    sample = sample or draw_samples(spec)
    indices, texts, info = sample.indices, sample.texts, sample.info
    if spec.mode == "concat":
        ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
        n = len(ids) // spec.seqlen
        if n == 0:
            raise UserError(
                f"the {spec.nsamples} samples give {len(ids)} tokens, fewer than one window of seqlen={spec.seqlen}; "
                "raise nsamples or lower seqlen"
            )
        input_ids = ids[: n * spec.seqlen].view(n, spec.seqlen).clone()
        lengths = torch.full((n,), spec.seqlen, dtype=torch.long)
    else:
        seqs = [tokenizer(t, return_tensors="pt", truncation=True, max_length=spec.seqlen).input_ids[0] for t in texts]
        seqs = [s for s in seqs if len(s) >= 2]
        if not seqs:
            raise UserError("no sample has two tokens or more; check the calibration source")
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        input_ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = s
    if spec.max_windows:
        input_ids, lengths = input_ids[: spec.max_windows], lengths[: spec.max_windows]
    out = Path(out_dir)
    tokens = out / "tokens.safetensors"
    from safetensors.torch import save_file

    atomic_write(tokens, lambda tmp: save_file({"input_ids": input_ids.contiguous(), "lengths": lengths}, tmp))
    manifest = {
        **info,
        "mode": spec.mode,
        "sampling": spec.sampling,
        "nsamples": spec.nsamples,
        "seed": spec.seed,
        "seqlen": spec.seqlen,
        "text_field": spec.text_field,
        "max_windows": spec.max_windows,
        "sampled_indices": indices,
        "windows": int(input_ids.shape[0]),
        "tokens": int(lengths.sum()),
        "predicted_tokens": int((lengths - 1).sum()),
        "tokenizer": {"name_or_path": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(tokenizer),
                      "vocab_sha256": sha256_text(json.dumps(tokenizer.get_vocab(), sort_keys=True))},
        "tokens_file": tokens.name,
        "tokens_sha256": sha256_file(tokens),
    }
    return write_json(out / "manifest.json", manifest, FORMAT)


@dataclass
class Calibration:
    """Loaded calibration windows, each a 1-D token tensor at its true length."""

    windows: list[torch.Tensor]
    manifest: dict

    @property
    def hash(self) -> str:
        return self.manifest["checksum"]


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration artifact (directory or its manifest), verifying the token file."""
    path = Path(path)
    manifest_path = path / "manifest.json" if path.is_dir() or not path.suffix else path
    manifest = read_json(manifest_path, FORMAT)
    tokens = manifest_path.parent / manifest["tokens_file"]
    if not tokens.exists() or sha256_file(tokens) != manifest["tokens_sha256"]:
        raise UserError(f"{tokens}: missing or does not match its manifest's sha256; delete {manifest_path.parent} and resample")
    from safetensors.torch import load_file

    data = load_file(tokens)
    windows = [row[:n] for row, n in zip(data["input_ids"], data["lengths"].tolist())]
    return Calibration(windows, manifest)
