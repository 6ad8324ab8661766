"""Generative Open-QA (RAG) end to end on a handful of real SQuAD questions: a tiny random Llama
(SmolLM2's tokenizer) as the generator, a tiny dense retriever or BM25 over 20 real passages. A
fine-tune saves a model that loads and answers as the run evaluated it; zero-shot RAG
(`train.steps=0`) and closed book run; bad inputs are one clear error and write nothing."""

import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from realm.config import load_config
from realm.data.qa import read_qa
from realm.errors import ConfigError, QAFormatError
from realm.qa import OpenQA
from realm.training.openqa import run_finetune

REPO = Path(__file__).resolve().parents[2]
#: the keys of the extractive stage's summary and dev report, which the generative one keeps
SUMMARY_KEYS = {"stage", "reader_type", "run_dir", "retriever", "retriever_dir", "reader",
                "steps", "final_loss", "train_questions", "train_questions_with_positive",
                "positive_steps", "examples_per_s", "precision", "world_size", "dev", "model",
                "seconds"}
REPORT_KEYS = {"exact_match", "f1", "answer_recall@1", "answer_recall@2", "answer_recall@5",
               "questions", "k", "seconds", "questions_per_s"}


def _config(squad_tiny, tiny_generator, run_dir, *overrides):
    return load_config(None, [
        f"corpus={squad_tiny / 'corpus'}", f"openqa.train_qa={squad_tiny / 'qa.jsonl'}",
        f"openqa.dev_qa={squad_tiny / 'qa.jsonl'}", "openqa.reader_type=generative",
        f"openqa.generator={tiny_generator}", "openqa.k=2", "openqa.recall_ks=[1,2,5]",
        "openqa.max_generator_tokens=96", "openqa.max_answer_tokens=6", "openqa.eval_limit=0",
        "openqa.retriever=bm25", "retriever.max_block_tokens=160", "train.precision=fp32",
        f"cache_dir={squad_tiny / 'cache'}", f"train.run_dir={run_dir}", "train.steps=4",
        "train.batch_size=2", "train.lr=1e-3", "train.warmup_steps=0", "train.eval_every=0",
        "train.save_every=0", "logging.wandb=false", *overrides])


@pytest.fixture(scope="module")
def finetuned(squad_tiny, tiny_generator, tiny_retriever, tmp_path_factory):
    """A fine-tune over the tiny dense retriever: LoRA generator and query encoder, 4 steps."""
    run = tmp_path_factory.mktemp("rag") / "run"
    config = _config(squad_tiny, tiny_generator, run, f"openqa.retriever={tiny_retriever}",
                     "openqa.generator_mode=lora", "openqa.generator_lr_scale=10")
    return run, run_finetune(config, progress=False)


def test_a_fine_tune_saves_a_model_that_loads_and_answers_the_same(finetuned, squad_tiny,
                                                                   tiny_retriever):
    run, summary = finetuned
    assert SUMMARY_KEYS <= set(summary) and summary["reader_type"] == "generative"
    assert summary["steps"] == 4 and summary["final_loss"] > 0
    assert REPORT_KEYS <= set(summary["dev"]) and summary["dev"]["questions"] == 12
    model = run / "model"
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["kind"] == "openqa_model" and manifest["reader_type"] == "generative"
    assert manifest["retrieval"] == "dense" and manifest["generator_mode"] == "lora"
    assert "\n# Open-QA system (RAG)" in (model / "README.md").read_text()
    # the generator loads as transformers and peft users expect: merged weights, and its adapter
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert type(AutoModelForCausalLM.from_pretrained(model / "generator")).__name__ \
        == "LlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(model).eos_token_id is not None
    assert PeftConfig.from_pretrained(model / "generator" / "adapter").r == 8
    # the query encoder trained; the document encoder (and so the index) stayed fixed
    saved, start = (Path(d) / "retriever" if d == model else Path(d)
                    for d in (model, tiny_retriever))
    for part, moved in (("query_encoder", True), ("doc_encoder", False)):
        a, b = (load_file(str(p / part / "model.safetensors")) for p in (saved, start))
        assert any(not torch.equal(a[k], b[k]) for k in b) == moved, part
    # loaded, it writes the answers the run evaluated, and says which blocks it read
    records = [json.loads(line) for line in open(run / "predictions-dev.jsonl")]
    qa = OpenQA.from_pretrained(run, precision="fp32")
    answers = qa.answer_batch([r["question"] for r in records])
    assert [a["answer"] for a in answers] == [r["prediction"] for r in records]
    for a, r in zip(answers, records):
        assert [e["block"] for e in a["evidence"]] == [b["block"] for b in r["retrieved"]]
        assert [e["probability"] for e in a["evidence"]] == [b["probability"]
                                                             for b in r["retrieved"]]
        assert sum(e["probability"] for e in a["evidence"]) == pytest.approx(1.0, abs=2e-3)
        assert a["answer_block"] == r["answer_block"] and 0 <= a["probability"] <= 1
        assert {"title", "block", "score", "probability", "answer_here"} <= set(a["evidence"][0])
    assert round(float(np.mean([r["exact_match"] for r in records])), 4) \
        == summary["dev"]["exact_match"]


def test_evaluate_and_answer_commands_serve_a_generative_model(finetuned, squad_tiny, tmp_path,
                                                               capsys):
    from realm.evaluate.cli import main as evaluate

    run, summary = finetuned
    assert evaluate(["openqa", "--model", str(run / "model"), "--corpus",
                     str(squad_tiny / "corpus"), "--qa", str(squad_tiny / "qa.jsonl"),
                     "--k", "1,2,5", "--precision", "fp32", "--no-progress",
                     "--predictions", str(tmp_path / "p.jsonl")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["reader_type"] == "generative" and report["retrieval"] == "dense"
    for key in ("exact_match", "f1", "answer_recall@1", "answer_recall@5"):
        assert report[key] == summary["dev"][key], key
    answer = runpy.run_path(str(REPO / "launch" / "answer.py"))["main"]
    question = read_qa(str(squad_tiny / "qa.jsonl"))[0].question
    assert answer(["--model", str(run / "model"), "--precision", "fp32", question]) == 0
    out = capsys.readouterr().out
    assert f"Q: {question}" in out and "p=" in out
    assert json.loads(out.strip().splitlines()[-1])["questions"] == 1


def test_zero_shot_rag_trains_nothing_and_evaluates(squad_tiny, tiny_generator, tmp_path):
    run = tmp_path / "run"
    summary = run_finetune(_config(squad_tiny, tiny_generator, run, "train.steps=0",
                                   "openqa.generator_mode=frozen"), progress=False)
    assert summary["steps"] == 0 and summary["final_loss"] is None
    assert summary["dev"]["questions"] == 12 and summary["dev"]["k"] == 2
    assert not (run / "checkpoints").exists()  # nothing trained, nothing to resume
    saved = load_file(str(run / "model" / "generator" / "model.safetensors"))
    start = load_file(str(Path(tiny_generator) / "model.safetensors"))
    assert all(torch.equal(saved[k], start[k]) for k in start)  # the generator as it was
    manifest = json.loads((run / "model" / "manifest.json").read_text())
    assert manifest["retrieval"] == "bm25" and manifest["metadata"]["steps"] == 0
    assert not (run / "model" / "generator" / "adapter").exists()


def test_closed_book_reads_no_block(squad_tiny, tiny_generator, tmp_path):
    run = tmp_path / "run"
    summary = run_finetune(_config(squad_tiny, tiny_generator, run, "openqa.closed_book=true",
                                   "train.steps=2", "openqa.generator_mode=full"),
                           progress=False)
    assert summary["retriever"] is None and summary["closed_book"] and summary["steps"] == 2
    dev = summary["dev"]
    assert dev["k"] == 0 and dev["answer_recall@1"] is None and dev["questions"] == 12
    records = [json.loads(line) for line in open(run / "predictions-dev.jsonl")]
    assert all(r["retrieved"] == [] and r["answer_block"] is None for r in records)
    assert json.loads((run / "model" / "manifest.json").read_text())["retrieval"] == "none"
    assert not (run / "model" / "retriever").exists()
    one = OpenQA.from_pretrained(run / "model", precision="fp32").answer(records[0]["question"])
    assert one["answer"] == records[0]["prediction"] and one["evidence"] == []


def test_bad_inputs_are_one_clear_error_and_write_nothing(finetuned, squad_tiny, tiny_generator,
                                                          tmp_path):
    run, _ = finetuned
    qa = OpenQA.from_pretrained(run / "model", precision="fp32")
    with pytest.raises(ValueError, match="question 1 is empty"):
        qa.answer_batch(["who won?", "  "])
    with pytest.raises(ValueError, match=r"question 0 \('why why.*over the generator's limit "
                                         r"of 96"):
        qa.answer("why " * 120)
    # a saved directory of another kind is named, whichever it is
    for other, kind in ((run / "model" / "generator", "rag_generator"),
                        (run / "model" / "retriever", "retriever")):
        with pytest.raises(ValueError, match=f"kind is '{kind}', expected 'openqa_model'"):
            OpenQA.from_pretrained(other)
    # a QA file with a malformed line: the error names its line, and no run directory appears
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "who?", "answers": ["x"]}\n{"question": "who?", "answers": \n')
    with pytest.raises(QAFormatError, match=f"{bad}:2: malformed JSON"):
        run_finetune(_config(squad_tiny, tiny_generator, tmp_path / "r1",
                             f"openqa.train_qa={bad}"), progress=False)
    assert not (tmp_path / "r1").exists()
    # a frozen generator over BM25 has nothing to train; regex answers cannot be trained on
    with pytest.raises(ConfigError, match="openqa.generator_mode: a frozen generator"):
        run_finetune(_config(squad_tiny, tiny_generator, tmp_path / "r2",
                             "openqa.generator_mode=frozen"), progress=False)
    with pytest.raises(ConfigError, match="openqa.regex"):
        run_finetune(_config(squad_tiny, tiny_generator, tmp_path / "r3", "openqa.regex=true"),
                     progress=False)
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


@pytest.mark.parametrize("overrides, message", [
    (["train.steps=0"], "train.steps: must be > 0 (0 only for zero-shot RAG"),
    (["openqa.closed_book=true"], "openqa.closed_book: only with reader_type=generative"),
    (["openqa.reader_type=generative", "openqa.max_answer_tokens=400"],
     "openqa.max_answer_tokens: must be below max_generator_tokens"),
    (["openqa.reader_type=generative", "openqa.beam_size=0"], "openqa.beam_size: must be > 0"),
    (["openqa.decoding=nucleus"], "openqa.decoding"),
    (["openqa.reader_type=generative", "openqa.refresh_index=true"],  # (retriever: bm25)
     "openqa.refresh_index: only with reader_type=generative and a dense retriever"),
    (["openqa.refresh_index=true", "openqa.retriever=dpr"], "openqa.refresh_index"),
])
def test_generative_config_keys_are_checked_by_name(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_rag_end2end_refuses_a_sharded_index_before_anything_runs(squad_tiny, tiny_generator,
                                                                    tiny_retriever, tmp_path):
    config = _config(squad_tiny, tiny_generator, tmp_path / "run",
                     f"openqa.retriever={tiny_retriever}", "openqa.refresh_index=true",
                     "index.sharding=ranks")
    with pytest.raises(ConfigError, match="index.sharding: openqa.refresh_index reads a whole"):
        run_finetune(config, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_rag_end2end_trains_the_document_encoder_and_swaps_refreshed_generations(
        squad_tiny, tiny_generator, tiny_retriever, tmp_path):
    """`openqa.refresh_index=true`: the refresher re-embeds the corpus every 2 steps and the
    run swaps each generation in (refresh.sync: before the next step); the document encoder
    trains; the saved model's index is the corpus embedded by the final document encoder."""
    from realm.data.store import BlockStore
    from realm.modeling.retriever import Retriever
    from realm.refresh.rundir import RunStore
    from realm.retrieval.fixed import EMBEDDINGS_FILE, document_embeddings

    run = tmp_path / "run"
    summary = run_finetune(_config(
        squad_tiny, tiny_generator, run, f"openqa.retriever={tiny_retriever}",
        "openqa.generator_mode=lora", "openqa.refresh_index=true", "openqa.bm25_blocks=1",
        "train.steps=6", "train.lr=1e-2", "refresh.every_steps=2", "refresh.sync=true",
        "refresh.poll_s=0.1", "refresh.threads=1"), progress=False)
    assert summary["refresh_index"] and summary["steps"] == 6
    # generation 0 (seeded from the fixed index), then the snapshots of steps 2, 4 and 6, each
    # swapped in before the next step (refresh.sync: the last one too)
    assert summary["generations_swapped"] == 4 and summary["max_staleness_steps"] == 1
    latest = RunStore(str(run)).read_latest()
    assert (latest["generation"], latest["encoder_step"]) == (3, 6)
    committed = [json.loads(line) for line in open(run / "refresher" / "metrics.jsonl")]
    assert [r["refresh/generation"] for r in committed] == [1, 2, 3]  # 0 was not re-embedded
    start = Retriever.from_pretrained(tiny_retriever)
    saved = Retriever.from_pretrained(str(run / "model" / "retriever"))
    moved = [not torch.equal(a, b) for a, b in zip(start.doc_encoder.parameters(),
                                                   saved.doc_encoder.parameters())]
    assert any(moved)  # the document encoder trained
    corpus = BlockStore(str(squad_tiny / "corpus"))
    fresh = document_embeddings(saved, corpus, 160, progress=False)  # (refresh.precision)
    np.testing.assert_allclose(np.load(run / "model" / EMBEDDINGS_FILE), fresh, atol=1e-5)
    manifest = json.loads((run / "model" / "manifest.json").read_text())
    assert manifest["retrieval"] == "dense" and manifest["bm25_blocks"] == 1
    records = [json.loads(line) for line in open(run / "predictions-dev.jsonl")]
    one = OpenQA.from_pretrained(run / "model", precision="fp32").answer(records[0]["question"])
    assert one["answer"] == records[0]["prediction"]


def test_a_lora_fine_tune_checkpoints_without_the_base_and_resumes(squad_tiny, tiny_generator,
                                                                   tmp_path):
    """The generator's frozen base stays out of the checkpoints (its adapter and the query
    encoder are in); a run killed after step 2 resumes there and ends as the whole run did."""
    from safetensors import safe_open

    def finetune(run):
        return run_finetune(_config(squad_tiny, tiny_generator, run, "openqa.generator_mode=lora",
                                    "openqa.generator_lr_scale=10", "train.save_every=2",
                                    "logging.log_every=1"),
                            progress=False)

    whole = finetune(tmp_path / "whole")
    ckpt = tmp_path / "whole" / "checkpoints" / "step-000002"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        saved = list(f.keys())
    assert [k for k in saved if "lora_" in k] and not [
        k for k in saved if "generator" in k and "lora_" not in k]
    assert json.loads((ckpt / "manifest.json").read_text())["rebuilt"]["tensors"] > 0
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, killed / "checkpoints" / ckpt.name)
    again = finetune(killed)
    from realm.tracking import read_metrics

    losses = {run: {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / run)) if "loss" in r}
              for run in ("whole", "killed")}
    assert sorted(losses["killed"]) == [3, 4]  # resumed after step 2
    for step in (3, 4):
        assert losses["killed"][step] == pytest.approx(losses["whole"][step], rel=1e-4)
    assert again["steps"] == whole["steps"] == 4
