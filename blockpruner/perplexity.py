"""Token NLL from final hidden states, in chunks, and plain perplexity over windows.

Perplexity is exp(total NLL / predicted tokens) over all windows: each window of T tokens
predicts T - 1 of them. The LM head is applied a few hundred positions at a time and the
log-softmax is taken in fp32 per chunk, so Gemma's 262k-entry vocabulary never needs fp32
logits for a whole window at once. Sums are kept per window in float64 and added in window
order, which makes the result independent of the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .adapters import get_path
from .blocks import PrunableModel

LOGIT_BYTES_PER_CHUNK = 64 * 2**20  # fp32 logits held at once by the head


def head_chunk_tokens(vocab_size: int) -> int:
    return max(16, LOGIT_BYTES_PER_CHUNK // (4 * vocab_size))


def window_nll(pm: PrunableModel, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[float]:
    """Summed next-token NLL of each row of a (B, T) batch from its last hidden states."""
    return head_nll(pm, get_path(pm.model, pm.adapter.final_norm)(hidden), input_ids)


def head_nll(pm: PrunableModel, normed: torch.Tensor, input_ids: torch.Tensor) -> list[float]:
    """Summed next-token NLL per row from final-normed hidden states.

    Applies the LM head and any final logit soft-capping exactly as the model's own forward.
    """
    head = get_path(pm.model, pm.adapter.lm_head)
    softcap = getattr(pm.decoder_config, "final_logit_softcapping", None)
    normed = normed[:, :-1]
    labels = input_ids[:, 1:].to(normed.device)
    b, t = labels.shape
    step = max(1, head_chunk_tokens(head.out_features) // b)
    sums = torch.zeros(b, dtype=torch.float64, device=normed.device)
    for s in range(0, t, step):
        logits = head(normed[:, s : s + step]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        nll = F.cross_entropy(logits.flatten(0, 1), labels[:, s : s + step].flatten(), reduction="none")
        sums += nll.view(b, -1).double().sum(dim=1)
    return sums.tolist()


def perplexity_of(nll_sum: float, tokens: int) -> float:
    mean = nll_sum / tokens
    return math.exp(mean) if math.isfinite(mean) and mean < 700 else math.inf


@torch.no_grad()
def perplexity(pm: PrunableModel, windows: Iterable[torch.Tensor], batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of the model as it stands (removed blocks skipped) over token windows.

    `windows` yields 1-D token tensors; equal-length windows are batched `batch_size` at a time.
    """
    from tqdm.auto import tqdm

    windows = list(windows)
    device = next(pm.model.parameters()).device
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
        for s in head_nll(pm, hidden, ids):  # the decoder output is already final-normed
            total += s
        tokens += len(batch) * (n - 1)
        i += len(batch)
        bar.update(len(batch))
    bar.close()
    return {"nll_sum": total, "tokens": tokens, "ppl": perplexity_of(total, tokens), "windows": len(windows)}
