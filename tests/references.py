"""References computed without the package's evaluation code, for the tests that check its
figures on real models: transformers' own loss, and lm-eval's metrics by hand."""

from __future__ import annotations

import math
from pathlib import Path


def reference_model(model_dir: Path):
    """A model directory loaded by transformers alone (a pruned one through its shipped modeling
    code), for the references below."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def reference_wikitext_ppl(model, tok, rows: list[str], seqlen: int, windows: int) -> float:
    """exp(mean NLL) by transformers' own loss (labels=) over the first `windows` windows of
    `seqlen` tokens of the "\\n\\n"-joined rows."""
    import torch

    ids = tok("\n\n".join(rows), return_tensors="pt").input_ids[0]
    total = 0.0
    with torch.no_grad():
        for w in range(windows):
            x = ids[w * seqlen:(w + 1) * seqlen][None]
            total += model(x, labels=x).loss.double().item() * (seqlen - 1)
    return math.exp(total / (windows * (seqlen - 1)))


def reference_piqa_acc_norm(model, tok, docs: list[dict], labels: list[int]) -> float:
    """lm-eval's PIQA acc_norm by hand: context "Question: <goal>\\nAnswer:", each solution
    " <sol>" scored by its tokens' summed log-probabilities (the tokens of context + solution past
    the context's own, BOS first) over its length in characters; right when the best is the label."""
    import torch

    right = 0
    with torch.no_grad():
        for doc, label in zip(docs, labels):
            context = f"Question: {doc['goal']}\nAnswer:"
            start = len(tok(context).input_ids)
            scores = []
            for sol in (doc["sol1"], doc["sol2"]):
                whole = tok(context + " " + sol).input_ids
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
                scores.append(sum(logp[i - 1, whole[i]].item() for i in range(start, len(whole))) / len(sol))
            right += int(scores.index(max(scores)) == label)
    return right / len(docs)
