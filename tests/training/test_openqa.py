"""Open-QA fine-tuning and evaluation end to end on a handful of real SQuAD questions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from realm.data.qa import read_qa
from realm.data.store import BlockStore
from realm.evaluate.openqa import evaluate_openqa
from realm.modeling.openqa import OpenQAModel
from realm.modeling.span_reader import SpanReader
from realm.modeling.retriever import Retriever
from realm.retrieval.fixed import BM25Index, document_embeddings

#: end-to-end runs of the stage: the full suite (`pytest`) runs them, the fast tier does not
pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def finetuned(squad_tiny):
    """`launch/finetune_openqa.py` on those questions (BM25, a 2-layer MiniLM reader)."""
    run = squad_tiny / "run"
    cmd = [sys.executable, str(REPO / "launch" / "finetune_openqa.py"), "--no-progress",
           f"corpus={squad_tiny / 'corpus'}", f"openqa.train_qa={squad_tiny / 'qa.jsonl'}",
           f"openqa.dev_qa={squad_tiny / 'qa.jsonl'}", "openqa.k=2", "openqa.max_joined_tokens=200",
           # both phases: 24 steps beside positive blocks, then 12 over the top k
           "openqa.reader_layers=2", "openqa.positive_steps=24",
           "openqa.recall_ks=[1,2,5]", "openqa.eval_limit=0",
           f"cache_dir={squad_tiny / 'cache'}", f"train.run_dir={run}",
           "train.steps=36", "train.batch_size=4", "train.lr=3e-4", "train.warmup_steps=4",
           "train.eval_every=0", "train.save_every=0", "logging.wandb=false",
           "logging.log_every=4"]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, json.loads(done.stdout.strip().splitlines()[-1])


def _untrained(squad_tiny, store: BlockStore) -> OpenQAModel:
    """The fine-tune's starting reader (its cached 2-layer warm start, span head untrained) over
    BM25's top 2: the baseline a fine-tuned reader is compared with."""
    torch.manual_seed(0)
    reader = SpanReader.from_checkpoint(
        str(squad_tiny / "cache" / "encoder-sentence-transformers-all-MiniLM-L6-v2-L2"), seed=0)
    return OpenQAModel(None, reader, BM25Index(store), store, reader.tokenizer, k=2,
                       max_joined_tokens=200)


def test_finetuning_fits_its_questions_above_an_untrained_reader(squad_tiny, finetuned):
    """Trained and evaluated on the same 12 questions: the EM gain shows that the fine-tune fits
    (memorises) what it is shown and that evaluation reads the trained reader; it says nothing of
    generalisation (held-out dev figures: docs/results.md, "Open-QA")."""
    run, summary = finetuned
    store = BlockStore(str(squad_tiny / "corpus"))
    qa = read_qa(str(squad_tiny / "qa.jsonl"))
    untrained = _untrained(squad_tiny, store)
    before, _ = evaluate_openqa(untrained, qa, [1, 2], progress=False)
    after = summary["dev"]
    assert summary["steps"] == 36 and summary["train_questions"] == 12
    assert summary["train_questions_with_positive"] == 12 and summary["positive_steps"] == 24
    assert after["questions"] == 12 and after["answer_recall@2"] >= 0.75
    assert after["exact_match"] >= before["exact_match"] + 0.25, (before, after)
    assert after["f1"] > before["f1"]
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    warm = [r["positive_warm_up"] for r in records if "positive_warm_up" in r]
    assert warm[:6] == [1.0] * 6 and warm[-3:] == [0.0] * 3  # logged every 4 steps
    (table,) = [r for r in records if r.get("table") == "dev_predictions"]
    assert len(table["rows"]) == 12 and table["columns"][:2] == ["question", "prediction"]
    assert np.mean(losses[-3:]) < np.mean(losses[:2])
    manifest = json.loads((run / "model" / "manifest.json").read_text())
    assert manifest["kind"] == "openqa_model" and manifest["retrieval"] == "bm25"
    assert manifest["k"] == 2 and manifest["corpus"]["fingerprint"] == store.fingerprint
    card = (run / "model" / "README.md").read_text()  # the model card names how to ask it
    assert "\n# Open-QA system" in card and "launch/answer.py" in card
    assert "stage: finetune_openqa" in card and "README.md" in manifest["files"]
    from huggingface_hub import ModelCard  # and holds the stage's dev figures, as the Hub reads

    figures = {r.metric_type: r.metric_value
               for r in ModelCard.load(run / "model" / "README.md").data.eval_results}
    assert figures["exact_match"] == after["exact_match"] and figures["f1"] == after["f1"]
    for part in ("", "reader", "reader/model"):  # AutoTokenizer loads from each
        assert (run / "model" / part / "tokenizer.json").is_file(), part
    from realm.report import write_report  # the offline dashboard draws an Open-QA run too

    html = open(write_report(str(run)), encoding="utf-8").read()
    assert "src='loss.png'" in html and "<th>question</th>" in html  # the dev predictions table


def test_finetuning_reads_held_out_questions_better_than_an_untrained_reader(
        squad_tiny, finetuned, shared_data, tmp_path):
    """Questions the fine-tune never saw, on the same 20 passages (the ones between the 12
    training questions, whose gold passage is in the corpus): the fine-tuned reader's F1 and EM
    over BM25's top 2 are above an untrained reader's on the same questions (paired)."""
    from realm.retrieval.fixed import load_openqa_model

    run, _ = finetuned
    store = BlockStore(str(squad_tiny / "corpus"))
    seen = {q.question for q in read_qa(str(squad_tiny / "qa.jsonl"))}
    ids = {json.loads(line)["id"] for line in open(squad_tiny / "passages.jsonl")}
    held = [json.loads(line) for line in open(shared_data / "squad_open" / "qa_train.jsonl")]
    held = [q for q in held if q["gold_passage"] in ids and q["question"] not in seen]
    held = held[2:62:5]  # 12, none of them trained on
    assert len(held) == 12
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(q) + "\n" for q in held))
    qa = read_qa(str(tmp_path / "held.jsonl"))
    model = load_openqa_model(str(run / "model"), store, progress=False, precision="fp32")
    after, _ = evaluate_openqa(model, qa, [1, 2], progress=False)
    untrained = _untrained(squad_tiny, store)
    before, _ = evaluate_openqa(untrained, qa, [1, 2], progress=False)
    assert after["questions"] == before["questions"] == 12
    assert after["answer_recall@2"] == before["answer_recall@2"]  # same retrieval: the reader
    assert after["f1"] > before["f1"] + 0.1 and after["exact_match"] > before["exact_match"], (
        before, after)


def test_evaluate_cli_reproduces_the_runs_dev_figures(squad_tiny, finetuned):
    run, summary = finetuned
    preds = squad_tiny / "preds.jsonl"
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "evaluate.py"), "openqa", "--model", str(run / "model"),
         "--corpus", str(squad_tiny / "corpus"), "--qa", str(squad_tiny / "qa.jsonl"),
         "--k", "1,2,5", "--predictions", str(preds), "--no-progress"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("exact_match", "f1", "answer_recall@1", "answer_recall@2", "answer_recall@5"):
        assert report[key] == summary["dev"][key], key
    assert report["questions"] == 12 and report["seconds"] > 0 and report["predictions"] == str(preds)
    records = [json.loads(line) for line in open(preds)]
    qa = read_qa(str(squad_tiny / "qa.jsonl"))
    assert [r["question"] for r in records] == [q.question for q in qa]
    assert all(len(r["retrieved"]) == 2 and {"title", "score"} <= set(r["retrieved"][0])
               for r in records)
    store = BlockStore(str(squad_tiny / "corpus"))
    texts = [store.text(i) + store.title(i) for i in range(len(store))]
    # a prediction is cut from the original text (case and punctuation kept)
    assert all(any(r["prediction"] in t for t in texts) for r in records)
    assert round(float(np.mean([r["exact_match"] for r in records])), 4) == report["exact_match"]
    one = subprocess.run(  # the reader may read fewer (or more) blocks than it was trained with
        [sys.executable, str(REPO / "launch" / "evaluate.py"), "openqa", "--model", str(run / "model"),
         "--corpus", str(squad_tiny / "corpus"), "--qa", str(squad_tiny / "qa.jsonl"),
         "--k", "1,2", "--read", "1", "--predictions", str(squad_tiny / "one.jsonl"),
         "--no-progress"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    read_one = json.loads(one.stdout.strip().splitlines()[-1])
    assert read_one["k"] == 1 and read_one["answer_recall@2"] == report["answer_recall@2"]
    bad = subprocess.run(
        [sys.executable, str(REPO / "launch" / "evaluate.py"), "openqa", "--model", str(squad_tiny),
         "--corpus", str(squad_tiny / "corpus"), "--qa", str(squad_tiny / "qa.jsonl")],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "manifest.json" in bad.stderr


def test_answer_api_and_cli_agree_with_evaluation(squad_tiny, finetuned, caplog):
    from realm import OpenQA

    run, summary = finetuned
    qa = OpenQA.from_pretrained(run / "model")
    questions = [q.question for q in read_qa(str(squad_tiny / "qa.jsonl"))]
    answers = qa.answer_batch(questions)
    one = qa.answer(questions[0])
    assert one["answer"] == answers[0]["answer"] and 0 < one["probability"] <= 1
    assert len(one["evidence"]) == 2 and {"title", "block", "score"} <= set(one["evidence"][0])
    store = BlockStore(str(squad_tiny / "corpus"))
    assert one["answer_block"] in {e["title"] for e in one["evidence"]}
    # a block is marked where its title or body (both are read) holds the answer: a span read
    # from a title whose words are not in its body ("Henri Matisse" over "Henri Emile Benoit
    # Matisse ...") marks the block it came from
    titled = next(b for b in range(len(store)) if store.title(b).lower() not in store.text(b).lower())
    read_spans, marked = qa.model.best_spans, {}
    for span in (store.title(titled), "qwzx vbnk"):  # in a title; in no block
        qa.model.best_spans = lambda out: [{"prediction": span, "block": titled, "score": -1.0}
                                           for _ in range(out.span_logits.shape[0])]
        try:
            evidence = qa.answer(span, k=len(store))["evidence"]
        finally:
            qa.model.best_spans = read_spans
        marked[span] = {e["block"] for e in evidence if e["answer_here"]}
    assert titled in marked[store.title(titled)] and not marked["qwzx vbnk"]
    assert one["answer"] in store.text(one["evidence"][0]["block"]) + store.title(
        one["evidence"][0]["block"]) or one["answer"] in store.text(
        one["evidence"][1]["block"]) + store.title(one["evidence"][1]["block"])
    # the same answers as the evaluation's predictions
    em = np.mean([exact_match_of(a["answer"], q.answers)
                  for a, q in zip(answers, read_qa(str(squad_tiny / "qa.jsonl")))])
    assert round(float(em), 4) == summary["dev"]["exact_match"]
    with pytest.raises(ValueError, match="empty"):
        qa.answer("   ")
    with caplog.at_level("WARNING", logger="realm.qa"):
        long = qa.answer("what " * 200 + "?")
    assert long["answer"] and "cut to" in caplog.text
    # the command line: the answer and the titles it read, then a JSON line; a file of questions
    (squad_tiny / "questions.jsonl").write_text(
        "".join(json.dumps({"question": q}) + "\n" for q in questions[:3]))
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "answer.py"), "--model", str(run / "model"),
         questions[0], "--qa", str(squad_tiny / "questions.jsonl"),
         "--output", str(squad_tiny / "answers.jsonl")],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"A: {one['answer']}" in done.stdout and one["evidence"][0]["title"] in done.stdout
    assert json.loads(done.stdout.strip().splitlines()[-1])["questions"] == 4
    written = [json.loads(line) for line in open(squad_tiny / "answers.jsonl")]
    assert [w["answer"] for w in written] == [a["answer"] for a in answers[:3]]
    # a no-answer threshold above every probability: no answer, the best guess's blocks shown
    floor = subprocess.run(
        [sys.executable, str(REPO / "launch" / "answer.py"), "--model", str(run / "model"),
         questions[0], "--min-probability", str(one["probability"] + 0.01)],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert floor.returncode == 0, floor.stderr[-3000:]
    assert "A: (no answer: below --min-probability)" in floor.stdout
    assert one["evidence"][0]["title"] in floor.stdout


def test_a_model_whose_corpus_is_missing_or_changed_is_refused(squad_tiny, finetuned, tmp_path,
                                                              make_squad_slice):
    from realm.errors import CorpusMismatchError
    from realm.qa import OpenQA

    run, _ = finetuned
    with pytest.raises(CorpusMismatchError, match="holds no corpus"):
        OpenQA.from_pretrained(run / "model", corpus=str(tmp_path / "nowhere"))
    other = make_squad_slice(tmp_path, 8, slice(None, 2), 160)
    with pytest.raises(CorpusMismatchError) as err:
        OpenQA.from_pretrained(run / "model", corpus=str(other / "corpus"))
    assert str(squad_tiny / "corpus") in str(err.value) and str(other / "corpus") in str(err.value)
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "answer.py"), "--model", str(run / "model"),
         "--corpus", str(other / "corpus"), "who won?"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "fingerprint" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "bad.jsonl").write_text('{"question": "ok?"}\n{"question": ""}\n')
    bad = subprocess.run(
        [sys.executable, str(REPO / "launch" / "answer.py"), "--model", str(run / "model"),
         "--qa", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o.jsonl")],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and f"{tmp_path / 'bad.jsonl'}:2" in bad.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_a_fine_tune_starts_from_a_cached_warm_start_or_a_trained_reader(squad_tiny, finetuned,
                                                                          tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from realm.config import load_config, save_config
    from realm.training.prepare import prepare_qa_reader

    run, _ = finetuned
    cache = tmp_path / "cache"
    # the warm start: the fixture's own config (its dev questions included), 4 big steps
    warm = load_config(run / "config.yaml", ["train.steps=4", "openqa.positive_steps=4",
                                             "train.lr=1e-2",
                                             f"cache_dir={squad_tiny / 'cache'}"])
    warm_yaml = save_config(warm, tmp_path, "warm.yaml")
    common = [sys.executable, str(REPO / "launch" / "finetune_openqa.py"), "--no-progress",
              "--config", warm_yaml, f"cache_dir={cache}", "train.steps=2",
              "openqa.positive_steps=2", "train.lr=1e-12", "openqa.eval_limit=0"]
    done = subprocess.run(common + [f"openqa.reader_warm_start={warm_yaml}",
                                    f"train.run_dir={tmp_path / 'a'}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    (warm_run,) = cache.glob("qa-reader-*/")
    reader_dir = warm_run / "model" / "reader"
    assert Path(summary["reader"]).resolve() == reader_dir.resolve()
    assert json.loads((warm_run / "model" / "manifest.json").read_text())["metadata"]["steps"] == 4
    assert not (warm_run / "predictions-dev.jsonl").exists()  # no dev evaluation in a warm start
    assert summary["dev"]["questions"] == 12  # the run's own evaluation stays
    # at lr 1e-12 the run's span scorer is the warm start's, not a new one
    trained = load_file(str(tmp_path / "a" / "model" / "reader" / "span_scorer.safetensors"))
    start = load_file(str(reader_dir / "span_scorer.safetensors"))
    assert trained.keys() == start.keys()
    assert all(torch.allclose(trained[k], start[k], atol=1e-6) for k in start)
    fresh = SpanReader.from_checkpoint(str(squad_tiny / "cache" / "encoder-sentence-transformers"
                                           "-all-MiniLM-L6-v2-L2"), scorer="start_end", seed=0)
    assert not all(torch.allclose(v, start[k], atol=1e-3)
                   for k, v in fresh.scorer.state_dict().items())
    # cached: asked again, nothing runs
    monkeypatch.setattr("realm.training.prepare._run_warm_start", lambda *a, **k: pytest.fail("ran again"))
    parent = load_config(warm_yaml, [f"openqa.reader_warm_start={warm_yaml}",
                                     f"cache_dir={cache}"])
    assert Path(prepare_qa_reader(parent)).resolve() == reader_dir.resolve()
    chained = save_config(parent, tmp_path, "chained.yaml")
    with pytest.raises(ValueError, match="chained"):
        prepare_qa_reader(load_config(warm_yaml, [f"openqa.reader_warm_start={chained}"]))
    # a trained reader given as `openqa.reader` (a run directory) must match the span settings
    from realm.training.openqa import run_finetune

    with pytest.raises(ValueError, match="span_scorer=start_end"):
        run_finetune(load_config(warm_yaml, [f"openqa.reader={run}", "openqa.span_scorer=mlp",
                                             f"cache_dir={cache}",
                                             f"train.run_dir={tmp_path / 'b'}"]), progress=False)


def exact_match_of(prediction, answers):
    from realm.metrics import exact_match

    return exact_match(prediction, answers)


def test_a_fine_tune_reads_with_a_zero_shot_retriever_from_a_checkpoint(squad_tiny, tiny_encoder,
                                                                         tmp_path):
    """`openqa.retriever=CHECKPOINT` (e.g. sentence-transformers/all-MiniLM-L6-v2): encoders built
    as the `retriever` section says, the index embedded once from the untrained document encoder
    and cached; a directory that is none of the known kinds is refused by name."""
    from safetensors.torch import load_file

    from realm.config import load_config
    from realm.training.openqa import run_finetune

    cache = tmp_path / "cache"
    args = [f"corpus={squad_tiny / 'corpus'}", f"openqa.train_qa={squad_tiny / 'qa.jsonl'}",
            f"openqa.dev_qa={squad_tiny / 'qa.jsonl'}", "openqa.k=2",
            "openqa.max_joined_tokens=200", "openqa.reader_layers=2",
            "openqa.positive_steps=2", "openqa.eval_limit=0", "retriever.dim=16",
            "retriever.max_block_tokens=160", f"cache_dir={cache}",
            "train.steps=2", "train.batch_size=2", "train.eval_every=0", "train.save_every=0",
            "logging.wandb=false"]
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "finetune_openqa.py"), "--no-progress",
         f"openqa.retriever={tiny_encoder}", f"train.run_dir={tmp_path / 'run'}", *args],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["retriever"] == tiny_encoder and summary["retriever_dir"] is None
    assert summary["dev"]["questions"] == 12
    (index,) = cache.glob("openqa-index-*.npy")
    n_blocks = len(BlockStore(str(squad_tiny / "corpus")))
    assert np.load(index).shape == (n_blocks, 16)
    saved = Retriever.from_pretrained(tmp_path / "run" / "model" / "retriever")
    assert saved.dim == 16
    # the index stays fixed: the saved document encoder is the checkpoint's, untouched
    doc = load_file(str(tmp_path / "run" / "model" / "retriever" / "doc_encoder" /
                        "model.safetensors"))
    base = load_file(str(Path(tiny_encoder) / "model.safetensors"))
    shared = [k for k in base if k in doc]
    assert shared and all(torch.equal(doc[k], base[k]) for k in shared)
    # another seed draws another projection: it must not read the first seed's cached index
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "finetune_openqa.py"), "--no-progress", "seed=1",
         f"openqa.retriever={tiny_encoder}", f"train.run_dir={tmp_path / 'run1'}", *args],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(cache.glob("openqa-index-*.npy"))) == 2
    saved1 = Retriever.from_pretrained(tmp_path / "run1" / "model" / "retriever")
    fresh = document_embeddings(saved1, BlockStore(str(squad_tiny / "corpus")), 160,
                                progress=False, precision="fp32")
    index1 = np.load(tmp_path / "run1" / "model" / "doc_embeddings.npy")
    cosine = (fresh * index1).sum(1) / (np.linalg.norm(fresh, axis=1) *
                                        np.linalg.norm(index1, axis=1))
    assert cosine.min() > 0.99, cosine.min()  # its index is its own document encoder's
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ValueError, match="not-a-model.*neither a retriever directory"):
        run_finetune(load_config(None, [*args, f"openqa.retriever={tmp_path / 'not-a-model'}",
                                        f"train.run_dir={tmp_path / 'b'}"]), progress=False)
