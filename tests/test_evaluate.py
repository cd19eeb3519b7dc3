"""Evaluation: WikiText-2 windows and perplexity, the offline lm-eval task YAMLs against the
installed lm-eval's built-in tasks on the raw files under ../shared/data/evals (or the demo
bundle's slices of them), real lm-eval and
perplexity runs on Gemma 3 270M, and argument errors raised before any model is loaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from blockpruner.artifacts import read_json
from blockpruner.errors import UserError
from blockpruner.eval import wikitext, zeroshot

from .conftest import DATA, FULL_DATA, RECORDS, require_shared, tiny_model
from .references import reference_model, reference_piqa_acc_norm, reference_wikitext_ppl

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
    from blockpruner.model_dir import write_manifest

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
    import blockpruner.model_dir

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(blockpruner.model_dir, "load_model_dir", refuse)


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
    with pytest.raises(UserError, match=r"evaluate\.perplexity\.path.*--data"):
        wikitext.load_wikitext_rows("wikitext", "wikitext-2-raw-v1", "test")


def test_shared_wikitext_rows():
    require_shared()
    rows, _ = wikitext.load_wikitext_rows(str(WIKI_ROWS))
    assert len(rows) == RECORDS["wikitext_rows"]
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    assert sum(1 for r in rows if r) == RECORDS["wikitext_nonempty"]


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
# Each *_local task must score exactly what the installed lm-eval's own task scores. The built-in
# task cannot download its Hub data offline, so it is given real records from DATA/evals
# rewritten in that Hub data set's schema (its dataset card), and both tasks' own doc_to_text /
# doc_to_choice / doc_to_target and request construction are applied to the same records.

# task -> (folder of the built-in YAML under lm_eval/tasks, Hub data set and config it reads)
BUILTIN = {
    "piqa": ("piqa", "baber/piqa", None),
    "winogrande": ("winogrande", "allenai/winogrande", "winogrande_xl"),
    "hellaswag": ("hellaswag", "Rowan/hellaswag", None),
    "arc_easy": ("arc", "allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("arc", "allenai/ai2_arc", "ARC-Challenge"),
    "openbookqa": ("openbookqa", "allenai/openbookqa", "main"),
}


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _spread(n: int) -> set[int]:
    """Record indices spread over a file: the first three, the thirds, the last."""
    return {0, 1, 2, n // 3, n // 2, 2 * n // 3, n - 1}


def _hub_choices(question: dict) -> dict:
    return {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}


def hub_records(name: str) -> tuple[list[int], list[dict], int]:
    """(indices of some records of the local file, those records as rows of the Hub data set the
    built-in task reads, number of records in the file)."""
    if name == "piqa":
        raw = _jsonl(EVALS / "piqa" / "valid.jsonl")
        labels = (EVALS / "piqa" / "valid-labels.lst").read_text().split()
        rows = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)} for r, y in zip(raw, labels)]
        idx = _spread(len(raw))
    elif name == "winogrande":
        raw = _jsonl(EVALS / "winogrande" / "dev.jsonl")
        rows = [{k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in raw]
        idx = _spread(len(raw))
    elif name in ("arc_easy", "arc_challenge", "openbookqa"):
        file = {"arc_easy": "arc/ARC-Easy-Test.jsonl", "arc_challenge": "arc/ARC-Challenge-Test.jsonl",
                "openbookqa": "openbookqa/test.jsonl"}[name]
        raw = _jsonl(EVALS / file)
        key = "question_stem" if name == "openbookqa" else "question"
        rows = [{"id": r["id"], key: r["question"]["stem"], "choices": _hub_choices(r["question"]),
                 "answerKey": r["answerKey"]} for r in raw]
        # plus the first record of every shape: letter or digit labels, 3, 4 or 5 choices
        shapes = {}
        for i, r in enumerate(rows):
            shapes.setdefault((r["choices"]["label"][0], len(r["choices"]["label"])), i)
        idx = _spread(len(raw)) | set(shapes.values())
    else:  # hellaswag: 6 lines per item, "activity_label: context", gold, four endings
        lines = (EVALS / "hellaswag" / "hellaswag_val_full.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
        rows = []
        for j in range(0, len(lines), 6):
            activity, ctx = lines[j].split(": ", 1)
            # the file keeps ctx_a and ctx_b joined, so all of it goes in ctx_a (lm-eval capitalises ctx_b)
            rows.append({"ind": j // 6, "activity_label": activity, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                         "endings": lines[j + 2 : j + 6], "source_id": "", "split": "val", "split_type": "indomain",
                         "label": lines[j + 1]})
        # plus records with text lm-eval's preprocess still changes (bracket tags, double spaces)
        odd = [i for i, r in enumerate(rows) if any("[" in t or "  " in t for t in (r["ctx_a"], *r["endings"]))]
        idx = _spread(len(rows)) | set(odd[:4])
    idx = sorted(idx)
    return idx, [rows[i] for i in idx], len(rows)


def builtin_task(name: str, rows: list[dict], monkeypatch):
    """The installed lm-eval's own task `name`, loaded from its YAML, reading `rows` as its Hub data."""
    import datasets
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    folder, hub_path, hub_config = BUILTIN[name]
    requested = []

    def load_dataset(path=None, name=None, **kwargs):
        requested.append((path, name))
        return datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s in ("train", "validation", "test")})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    tm = TaskManager(include_defaults=False, include_path=str(Path(lm_eval.tasks.__file__).parent / folder))
    task = tm.load([name])["tasks"][name]
    assert requested == [(hub_path, hub_config)], "the built-in task reads another data set than the rows mimic"
    return task


def scored_requests(task, doc) -> list[tuple]:
    """The (context, continuation) pairs lm-eval asks the model to score for `doc`, zero-shot."""
    return [inst.arguments for inst in task.construct_requests(doc, task.fewshot_context(doc, 0), metadata=("t", 0, 1))]


@pytest.fixture(scope="module")
def local_tasks():
    require_shared()
    return zeroshot.load_tasks(list(zeroshot.TASKS), EVALS)


@pytest.mark.parametrize("name", list(BUILTIN))
def test_local_task_scores_what_the_builtin_task_scores(local_tasks, monkeypatch, name):
    """Same prompt, choices, gold answer, scored strings, metrics and split as lm-eval's own task."""
    idx, rows, n = hub_records(name)
    local = local_tasks[name]
    builtin = builtin_task(name, rows, monkeypatch)
    local_docs = list(local.eval_docs)
    assert len(local_docs) == n == RECORDS[name]
    builtin_docs = list(builtin.eval_docs)
    assert len(builtin_docs) == len(idx)
    for i, bdoc in zip(idx, builtin_docs):
        ldoc = local_docs[i]
        assert local.doc_to_text(ldoc) == builtin.doc_to_text(bdoc), (name, i)
        assert local.doc_to_choice(ldoc) == builtin.doc_to_choice(bdoc), (name, i)
        assert local.doc_to_target(ldoc) == builtin.doc_to_target(bdoc), (name, i)
        assert scored_requests(local, ldoc) == scored_requests(builtin, bdoc), (name, i)
    assert local.config.metric_list == builtin.config.metric_list
    assert local.OUTPUT_TYPE == builtin.OUTPUT_TYPE == "multiple_choice"
    assert local.has_test_docs() == builtin.has_test_docs()  # evaluated on the same split
    assert zeroshot.TASKS[name].metric in {m["metric"] for m in builtin.config.metric_list}


def test_summarize_picks_paper_metric():
    class T:
        def __init__(self, name):
            self.task_name = name

    results = {
        "results": {"piqa_local": {"acc,none": 0.6, "acc_norm,none": 0.7, "acc_norm_stderr,none": 0.01, "acc_stderr,none": 0.02},
                    "winogrande_local": {"acc,none": 0.55, "acc_stderr,none": 0.03}},
        "n-samples": {"piqa_local": {"original": 1838, "effective": 5}, "winogrande_local": {"original": 1267, "effective": 5}},
        "samples": {"piqa_local": [{"doc_id": 1, "acc": 1.0, "acc_norm": 0.0}, {"doc_id": 0, "acc": 0.0, "acc_norm": 1.0}]},
    }
    s = zeroshot.task_figures(["piqa", "winogrande"], {"piqa": T("piqa_local"), "winogrande": T("winogrande_local")}, results)
    assert s["piqa"] == {"task": "piqa_local", "metric": "acc_norm", "value": 0.7, "acc": 0.6, "acc_norm": 0.7,
                         "stderr": 0.01, "n": 5, "correct": [1, 0]}  # per item: the task's metric, in document order
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
    assert r["windows"] == 2 and r["predicted_tokens"] == 510
    assert r["stream_tokens"] > (250_000 if FULL_DATA else 20_000)  # the whole file was read
    rows = [json.loads(line)["text"] for line in open(WIKI_ROWS)]
    model, tok = reference_model(gemma_dir)
    assert r["ppl"] == pytest.approx(reference_wikitext_ppl(model, tok, rows, seqlen=256, windows=2), rel=1e-5)
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
    docs = [json.loads(line) for line in open(EVALS / "piqa/valid.jsonl")][:5]
    labels = [int(x) for x in (EVALS / "piqa/valid-labels.lst").read_text().split()][:5]
    assert r["tasks"]["piqa"]["value"] == reference_piqa_acc_norm(*reference_model(gemma_dir), docs, labels)
    for name, t in r["tasks"].items():
        assert t["n"] == 5
        assert t["value"] * 5 == pytest.approx(round(t["value"] * 5))  # a count of right answers out of 5
        assert len(t["correct"]) == 5 and sum(t["correct"]) / 5 == pytest.approx(t["value"])  # lm-eval's own mean
    assert r["tasks"]["winogrande"]["metric"] == "acc" and r["tasks"]["piqa"]["metric"] == "acc_norm"
    assert r["average"] == pytest.approx((r["tasks"]["winogrande"]["value"] + r["tasks"]["piqa"]["value"]) / 2)
    from importlib.metadata import version

    assert r["lm_eval_version"] == version("lm_eval")
    assert r["add_bos_token"] == "auto" and r["bos_prepended"] is True  # Gemma's tokenizer adds <bos>
    print("gemma lm-eval limit 5:", {k: (v["metric"], v["value"]) for k, v in r["tasks"].items()})


@pytest.mark.parametrize("choice", ["auto", "yes", "no"])
def test_bos_choice_reaches_lm_eval_requests(choice):
    """The context+continuation pairs lm-eval encodes start with BOS exactly as the setting
    says; `auto` follows the tokenizer (here one that prepends BOS, like Llama 2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t3"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="t1 $A", special_tokens=[("t1", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t3", pad_token="t0", bos_token="t1", eos_token="t2")
    assert tok("t5 t6").input_ids == [1, 5, 6]  # the tokenizer's own choice: BOS first

    lm = zeroshot.make_lm(tiny_model("llama"), tok, {}, 1, "cpu", zeroshot.BOS_CHOICES[choice])
    context, continuation = lm._encode_pair("t5 t6", " t7 t8")
    expected = {"auto": [1, 5, 6], "yes": [1, 5, 6], "no": [5, 6]}[choice]
    assert context == expected and continuation == [7, 8]
    assert zeroshot._bos_prepended(lm) is (choice != "no")
