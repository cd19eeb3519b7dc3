"""WikiText-2 perplexity of a (pruned) model.

The standard recipe the BlockPruner paper (and GPTQ, SliceGPT, ShortGPT ...) reports: join the
test split's rows with "\\n\\n", tokenize once, cut the stream into non-overlapping `seqlen`
windows, drop the remainder, and take exp(total NLL / predicted tokens). Only the Hub rows
joined exactly so give the published figures; the local file `test.rows.jsonl` holds those
rows byte for byte. The model runs its own forward; the NLL is the search's `head_nll`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..adapters import get_path
from ..artifacts import sha256_file, write_json
from ..blocks import PrunableModel
from ..errors import UserError
from ..engine.forward import head_nll, model_device, perplexity_of

FORMAT_PPL = "blockpruner.eval_ppl/1"


# ---------------------------------------------------------------- WikiText-2 perplexity


def load_wikitext_rows(data: str, hub_config: str | None = "wikitext-2-raw-v1", split: str = "test") -> tuple[list[str], dict]:
    """The split's rows and where they came from.

    `data` is a local file -- .jsonl/.json/.parquet records with a `text` field (one Hub row
    each, empty rows included), or .txt/.raw with one row a line (line ends dropped, so not
    byte-identical to the Hub rows) -- or a hub data set id loaded with `datasets`.
    """
    from ..data.calibration import is_local, read_local

    if is_local(data):
        path = Path(data).expanduser()
        if not path.is_file():
            raise UserError(f"WikiText file not found: {data}; check evaluate.perplexity.path / --data")
        records = read_local(path)
        rows = []
        for r in records:
            if isinstance(r, str):
                rows.append(r)
            elif isinstance(r, dict) and isinstance(r.get("text"), str):
                rows.append(r["text"])
            else:
                raise UserError(f"{path}: records need a 'text' field (one WikiText row each); found {type(r).__name__}"
                                f"{' with fields ' + str(sorted(r)) if isinstance(r, dict) else ''}")
        return rows, {"data": str(path), "data_sha256": sha256_file(path)}
    import datasets

    try:
        ds = datasets.load_dataset(data, hub_config, split=split)
    except Exception as e:  # network, unknown id, missing config
        raise UserError(
            f"cannot load hub data set {data!r} ({e.__class__.__name__}); offline, point the WikiText source at a "
            "local copy, e.g. test.rows.jsonl (config key evaluate.perplexity.path, CLI --data PATH)"
        ) from None
    if "text" not in ds.column_names:
        raise UserError(f"hub data set {data!r} has no 'text' column (columns: {ds.column_names}); give a WikiText copy")
    return list(ds["text"]), {"data": data, "hub_config": hub_config, "split": split, "data_sha256": ds._fingerprint}


def wikitext_windows(tokenizer, rows: list[str], seqlen: int, max_windows: int | None = None) -> tuple[list, int]:
    """Non-overlapping `seqlen` windows of the "\\n\\n"-joined rows -> (windows, stream length).

    The whole stream is tokenized once with the tokenizer's defaults (a BOS only at its start,
    as the reference code does); the remainder after the last full window is dropped.
    """
    ids = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
    n = len(ids) // seqlen
    if n == 0:
        raise UserError(f"the WikiText text gives {len(ids)} tokens, fewer than one window of seqlen={seqlen}; lower seqlen")
    if max_windows is not None:
        n = min(n, max_windows)
    return list(ids[: n * seqlen].view(n, seqlen)), len(ids)


def _check_ppl_args(seqlen: int, max_windows: int | None, batch_size: int) -> None:
    if seqlen < 2:
        raise UserError(f"seqlen must be at least 2 tokens, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"max_windows must be a positive integer (or unset for all windows), got {max_windows}")
    if batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size}")


def wikitext_perplexity(model_dir: str | Path, data: str, seqlen: int = 2048, max_windows: int | None = None,
                        hub_config: str | None = "wikitext-2-raw-v1", split: str = "test", device: str = "auto",
                        dtype: str | None = None, batch_size: int = 1, progress: bool = True,
                        numerics: str = "fp32") -> dict:
    """WikiText-2 perplexity of a prepared (or pruned) model directory.

    Returns the eval_ppl record: `tokens` = windows x seqlen tokens scored, `predicted_tokens`
    = windows x (seqlen - 1) (each window predicts all but its first token), `stream_tokens` =
    length of the whole tokenized test stream, and ppl = exp(nll_sum / predicted_tokens).
    """
    from ..model_dir import load_model_dir, load_tokenizer, read_manifest
    from ..numerics import Numerics

    _check_ppl_args(seqlen, max_windows, batch_size)
    mode = Numerics(numerics)
    dtype = mode.load_dtype(dtype)
    manifest = read_manifest(model_dir)
    rows, info = load_wikitext_rows(data, hub_config, split)
    windows, stream = wikitext_windows(load_tokenizer(model_dir, manifest), rows, seqlen, max_windows)
    model, _, _ = load_model_dir(model_dir, dtype, device, tokenizer=False)
    result = perplexity(mode.apply(PrunableModel.wrap(model)), windows, batch_size=batch_size, progress=progress)
    return {
        "model": str(model_dir),
        "model_hash": manifest["content_hash"],
        **info,
        "seqlen": seqlen,
        "max_windows": max_windows,
        "windows": result["windows"],
        "tokens": result["windows"] * seqlen,
        "predicted_tokens": result["tokens"],
        "stream_tokens": stream,
        "dtype": dtype or manifest["dtype"],
        "numerics": numerics,
        "nll_sum": result["nll_sum"],
        "ppl": result["ppl"],
    }


def write_ppl(path: str | Path, record: dict) -> dict:
    return write_json(path, record, FORMAT_PPL)


# ---------------------------------------------------------------- perplexity of a model over windows


@torch.no_grad()
def perplexity(pm: PrunableModel, windows: Iterable[torch.Tensor], batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of the model as it stands (removed blocks skipped) over token windows.

    `windows` yields 1-D token tensors; equal-length windows are batched `batch_size` at a time.
    """
    from tqdm.auto import tqdm

    windows = list(windows)
    device = model_device(pm)
    decoder = get_path(pm.model, pm.adapter.decoder)
    total, tokens = 0.0, 0
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    i = 0
    while i < len(windows):
        n = len(windows[i])
        batch = [windows[i]]
        while len(batch) < batch_size and i + len(batch) < len(windows) and len(windows[i + len(batch)]) == n:
            batch.append(windows[i + len(batch)])
        ids = torch.stack(batch).to(device)
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        for s in head_nll(pm, hidden, ids, normed=True)[0]:  # the decoder output is already final-normed
            total += s
        tokens += len(batch) * (n - 1)
        i += len(batch)
        bar.update(len(batch))
    bar.close()
    return {"nll_sum": total, "tokens": tokens, "ppl": perplexity_of(total, tokens), "windows": len(windows)}
