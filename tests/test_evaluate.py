"""Evaluation: WikiText-2 windows and perplexity, the offline lm-eval task YAMLs against the
raw files under ../shared/data/evals, real lm-eval and perplexity runs on Gemma 3 270M, and
argument errors raised before any model is loaded."""

from __future__ import annotations

import json
import math

import pytest
import torch

from blockpruner.artifacts import read_json
from blockpruner.errors import UserError
from blockpruner.eval import wikitext, zeroshot

from .conftest import DATA, require_shared, tiny_model

EVALS = DATA / "evals"
WIKI_ROWS = DATA / "wikitext2" / "test.rows.jsonl"

LINES = [
    " = Robert Boulter = \n",
    "",
    " Robert Boulter is an English film , television and theatre actor . He had a guest starring role \n",
    " In 2006 , Boulter starred alongside Whishaw in the play Citizenship written by Mark Ravenhill . \n",
    "",
    " = = Career = = \n",
    " He appeared on a 2006 episode of the television series , Doctors , followed by a role in the 2007 \n",
]


def tiny_tokenizer(vocab_size: int = 96):
    """A BPE tokenizer trained on a few lines, wrapped for transformers; no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(LINES * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from blockpruner.data.sources import write_manifest

    out = tmp_path_factory.mktemp("tiny") / "prepared"
    model = tiny_model("llama")
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    write_manifest(out, model, source="test", dtype="fp32")
    return out


@pytest.fixture()
def rows_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in LINES * 3), encoding="utf-8")
    return path


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load model weights."""
    import blockpruner.data.sources

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(blockpruner.data.sources, "load_prepared", refuse)


# ---------------------------------------------------------------- WikiText-2


def test_windows_match_direct_tokenization():
    tok = tiny_tokenizer()
    rows = LINES * 3
    ids = tok("\n\n".join(rows)).input_ids
    windows, stream = wikitext.wikitext_windows(tok, rows, seqlen=16)
    assert stream == len(ids)
    assert len(windows) == len(ids) // 16 and len(windows) >= 3
    assert torch.cat(windows).tolist() == ids[: len(windows) * 16]
    assert all(len(w) == 16 for w in windows)
    few, _ = wikitext.wikitext_windows(tok, rows, seqlen=16, max_windows=2)
    assert [w.tolist() for w in few] == [w.tolist() for w in windows[:2]]
    with pytest.raises(UserError, match="fewer than one window"):
        wikitext.wikitext_windows(tok, rows, seqlen=len(ids) + 1)


def test_local_rows_jsonl_and_raw(tmp_path, rows_file):
    rows, info = wikitext.load_wikitext_rows(str(rows_file))
    assert rows == LINES * 3 and info["data"] == str(rows_file) and len(info["data_sha256"]) == 64
    raw = tmp_path / "wiki.test.raw"
    raw.write_bytes(b" = A = \r\n B c . \r\n")
    assert wikitext.load_wikitext_rows(str(raw))[0] == [" = A = ", " B c . "]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match="'text' field"):
        wikitext.load_wikitext_rows(str(bad))
    with pytest.raises(UserError, match="not found"):
        wikitext.load_wikitext_rows(str(tmp_path / "missing.jsonl"))


def test_hub_rows_and_offline_error(monkeypatch):
    import datasets

    seen = {}

    def fake_load(path, name=None, split=None):
        seen.update(path=path, name=name, split=split)
        return datasets.Dataset.from_dict({"text": LINES})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows, info = wikitext.load_wikitext_rows("wikitext", "wikitext-2-raw-v1", "test")
    assert rows == LINES and seen == {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"}
    assert info["hub_config"] == "wikitext-2-raw-v1"

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"eval\.wikitext\.path.*--data"):
        wikitext.load_wikitext_rows("wikitext", "wikitext-2-raw-v1", "test")


def test_shared_wikitext_rows():
    require_shared()
    rows, _ = wikitext.load_wikitext_rows(str(WIKI_ROWS))
    assert len(rows) == 4358
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    assert sum(1 for r in rows if r) == 2891


def test_tiny_perplexity_matches_hf_loss(tiny_dir, rows_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = wikitext.wikitext_perplexity(tiny_dir, str(rows_file), seqlen=16, device="cpu", progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = torch.tensor(tok("\n\n".join(LINES * 3)).input_ids)
    n = len(ids) // 16
    assert (r["windows"], r["tokens"], r["predicted_tokens"], r["stream_tokens"]) == (n, n * 16, n * 15, len(ids))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():  # HF's own loss: mean NLL of the 15 predicted tokens of each window
        total = sum(model(input_ids=w[None], labels=w[None]).loss.item() * 15 for w in ids[: n * 16].view(n, 16))
    assert r["nll_sum"] == pytest.approx(total, rel=1e-4)
    assert r["ppl"] == pytest.approx(math.exp(total / (n * 15)), rel=1e-4)
    batched = wikitext.wikitext_perplexity(tiny_dir, str(rows_file), seqlen=16, max_windows=2, batch_size=2,
                                           device="cpu", progress=False)
    assert batched["windows"] == 2 and batched["predicted_tokens"] == 30


def test_cli_eval_ppl_writes_artifact(tiny_dir, rows_file, tmp_path):
    from blockpruner.cli import main

    out = tmp_path / "ppl.json"
    assert main(["eval-ppl", "--model", str(tiny_dir), "--data", str(rows_file), "--seqlen", "16", "--max-windows", "3",
                 "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    r = read_json(out, wikitext.FORMAT_PPL)
    manifest = json.loads((tiny_dir / "manifest.json").read_text())
    assert r["model_hash"] == manifest["content_hash"] and r["windows"] == 3 and r["seqlen"] == 16
    assert r["data"] == str(rows_file) and math.isfinite(r["ppl"]) and r["ppl"] > 1
    assert r["ppl"] == pytest.approx(math.exp(r["nll_sum"] / r["predicted_tokens"]))


def test_ppl_bad_arguments_before_model_load(tiny_dir, rows_file, tmp_path, no_model_load):
    with pytest.raises(UserError, match="seqlen"):
        wikitext.wikitext_perplexity(tiny_dir, str(rows_file), seqlen=1)
    with pytest.raises(UserError, match="max_windows"):
        wikitext.wikitext_perplexity(tiny_dir, str(rows_file), max_windows=0)
    with pytest.raises(UserError, match="not found"):
        wikitext.wikitext_perplexity(tiny_dir, str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="fewer than one window"):
        wikitext.wikitext_perplexity(tiny_dir, str(rows_file), seqlen=100_000)


# ---------------------------------------------------------------- offline lm-eval tasks


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def local_tasks():
    require_shared()
    return zeroshot.load_tasks(list(zeroshot.TASKS), EVALS)


def _first(task):
    docs = list(task.eval_docs)
    return docs, docs[0]


def test_piqa_local(local_tasks):
    raw = _jsonl(EVALS / "piqa" / "valid.jsonl")
    labels = (EVALS / "piqa" / "valid-labels.lst").read_text().split()
    t = local_tasks["piqa"]
    docs, doc = _first(t)
    assert len(docs) == len(raw) == 1838
    assert t.doc_to_text(doc) == f"Question: {raw[0]['goal']}\nAnswer:"
    assert t.doc_to_choice(doc) == [raw[0]["sol1"], raw[0]["sol2"]]
    assert t.doc_to_target(doc) == int(labels[0])
    assert [d["label"] for d in docs] == [int(y) for y in labels]


def test_winogrande_local(local_tasks):
    raw = _jsonl(EVALS / "winogrande" / "dev.jsonl")
    t = local_tasks["winogrande"]
    docs, doc = _first(t)
    assert len(docs) == len(raw) == 1267
    r = raw[0]  # "Sarah was a much better surgeon than Maria so _ always got the easier cases.", answer "2"
    cut = r["sentence"].index("_")
    assert t.doc_to_choice(doc) == [r["sentence"][:cut] + r["option1"], r["sentence"][:cut] + r["option2"]]
    assert t.doc_to_text(doc) == int(r["answer"]) - 1  # partial scoring: the gold option's index
    assert t.doc_to_target(doc) == r["sentence"][cut + 1 :].strip()


@pytest.mark.parametrize("name,file", [("arc_easy", "ARC-Easy-Test.jsonl"), ("arc_challenge", "ARC-Challenge-Test.jsonl"),
                                       ("openbookqa", "../openbookqa/test.jsonl")])
def test_arc_and_openbookqa_local(local_tasks, name, file):
    raw = _jsonl(EVALS / "arc" / file)
    t = local_tasks[name]
    docs, doc = _first(t)
    assert len(docs) == len(raw) == {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}[name]
    q = raw[0]["question"]
    prompt = q["stem"] if name == "openbookqa" else f"Question: {q['stem']}\nAnswer:"
    assert t.doc_to_text(doc) == prompt
    assert t.doc_to_choice(doc) == [c["text"] for c in q["choices"]]
    assert t.doc_to_target(doc) == [c["label"] for c in q["choices"]].index(raw[0]["answerKey"])
    # every gold index is valid, including the numeric-label (1-4) and 3/5-choice items
    assert all(0 <= t.doc_to_target(d) < len(t.doc_to_choice(d)) for d in docs)


def test_hellaswag_local(local_tasks):
    lines = (EVALS / "hellaswag" / "hellaswag_val_full.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
    t = local_tasks["hellaswag"]
    docs, doc = _first(t)
    assert len(docs) == len(lines) // 6 == 10042
    assert t.doc_to_text(doc) == lines[0] == "Roof shingle removal: A man is sitting on a roof. he"
    assert t.doc_to_choice(doc) == lines[2:6]
    assert t.doc_to_target(doc) == int(lines[1]) == 3
    assert t.doc_to_target(docs[-1]) == int(lines[-5]) and t.doc_to_choice(docs[-1]) == lines[-4:]


def test_task_metrics_mirror_builtin(local_tasks):
    for name, task in local_tasks.items():
        metrics = {m["metric"] for m in task.config.metric_list}
        assert metrics == ({"acc"} if name == "winogrande" else {"acc", "acc_norm"}), name
        assert zeroshot.TASKS[name].metric in metrics


def test_summarize_picks_paper_metric():
    class T:
        def __init__(self, name):
            self.task_name = name

    results = {
        "results": {"piqa_local": {"acc,none": 0.6, "acc_norm,none": 0.7, "acc_norm_stderr,none": 0.01, "acc_stderr,none": 0.02},
                    "winogrande_local": {"acc,none": 0.55, "acc_stderr,none": 0.03}},
        "n-samples": {"piqa_local": {"original": 1838, "effective": 5}, "winogrande_local": {"original": 1267, "effective": 5}},
    }
    s = zeroshot.summarize(["piqa", "winogrande"], {"piqa": T("piqa_local"), "winogrande": T("winogrande_local")}, results)
    assert s["piqa"] == {"task": "piqa_local", "metric": "acc_norm", "value": 0.7, "acc": 0.6, "acc_norm": 0.7,
                         "stderr": 0.01, "n": 5}
    assert s["winogrande"]["metric"] == "acc" and s["winogrande"]["value"] == 0.55 and s["winogrande"]["acc_norm"] is None


# ---------------------------------------------------------------- task argument errors


def test_unknown_task_before_model_load(tiny_dir, no_model_load):
    with pytest.raises(UserError, match="unknown task.*'lambada'.*available: piqa, winogrande"):
        zeroshot.run_tasks(tiny_dir, "piqa,lambada", str(EVALS))
    with pytest.raises(UserError, match="no tasks"):
        zeroshot.run_tasks(tiny_dir, " , ", str(EVALS))


def test_missing_local_data_before_model_load(tiny_dir, tmp_path, no_model_load):
    with pytest.raises(UserError, match="local eval data folder not found"):
        zeroshot.run_tasks(tiny_dir, ["piqa"], str(tmp_path / "nowhere"))
    (tmp_path / "evals" / "piqa").mkdir(parents=True)
    with pytest.raises(UserError, match=r"valid\.jsonl"):
        zeroshot.run_tasks(tiny_dir, ["piqa"], str(tmp_path / "evals"))
    with pytest.raises(UserError, match="limit"):
        zeroshot.run_tasks(tiny_dir, ["piqa"], str(EVALS), limit=0)


def test_hub_tasks_offline_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="--local-data"):
        zeroshot.load_tasks(["winogrande"], None)


def test_cli_eval_tasks_bad_task_exit_2(tiny_dir, tmp_path, capsys):
    from blockpruner.cli import main

    assert main(["eval-tasks", "--model", str(tiny_dir), "--tasks", "piqa,mmlu", "--local-data", str(EVALS),
                 "--out", str(tmp_path / "r.json")]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------- real Gemma 3 270M


@pytest.mark.gemma
def test_gemma_wikitext_perplexity(gemma_dir):
    require_shared()
    r = wikitext.wikitext_perplexity(gemma_dir, str(WIKI_ROWS), seqlen=256, max_windows=2, device="cpu", progress=False)
    assert r["windows"] == 2 and r["predicted_tokens"] == 510 and r["stream_tokens"] > 250_000
    assert math.isfinite(r["ppl"]) and 5 < r["ppl"] < 500, r["ppl"]
    print(f"gemma wikitext2 ppl (2 x 256 tokens): {r['ppl']:.3f}")


@pytest.mark.gemma
def test_gemma_lm_eval_local(gemma_dir, tmp_path):
    """Small limit: Gemma's 262k-entry head makes each scored token cost ~0.5 GFLOP on CPU."""
    require_shared()
    from blockpruner.cli import main

    out = tmp_path / "tasks.json"
    assert main(["eval-tasks", "--model", str(gemma_dir), "--tasks", "piqa,winogrande", "--local-data", str(EVALS),
                 "--limit", "5", "--batch-size", "5", "--device", "cpu", "--out", str(out)]) == 0
    r = read_json(out, zeroshot.FORMAT_TASKS)
    assert set(r["tasks"]) == {"piqa", "winogrande"} and r["limit"] == 5
    for name, t in r["tasks"].items():
        assert t["n"] == 5 and 0 <= t["value"] <= 1 and 0 <= t["acc"] <= 1
        assert t["value"] * 5 == pytest.approx(round(t["value"] * 5))  # a count of right answers out of 5
    assert r["tasks"]["winogrande"]["metric"] == "acc" and r["tasks"]["piqa"]["metric"] == "acc_norm"
    assert r["average"] == pytest.approx((r["tasks"]["winogrande"]["value"] + r["tasks"]["piqa"]["value"]) / 2)
    print("gemma lm-eval limit 5:", {k: (v["metric"], v["value"]) for k, v in r["tasks"].items()})
