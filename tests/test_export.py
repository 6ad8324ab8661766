"""What realm writes, used outside realm: a retriever exported in the Hub layout loads with
sentence-transformers at the lengths it was trained at and embeds as realm does; a corpus's
spans map back to its text; a corpus published as a datasets repository loads with `datasets`;
an Open-QA model answers after being moved, and after being published with its corpus (as a
datasets repository, or inside the model repository), its card holding EM/F1 once evaluated."""

import json
import shutil
import unicodedata

import numpy as np
import pytest
import torch

from realm.data.store import BlockStore
from realm.modeling.embed import embed_queries, special_ids
from realm.modeling.inputs import build_block_inputs
from realm.modeling.retriever import Retriever, load_retriever


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_an_exported_retriever_is_a_sentence_transformer_at_its_trained_lengths(
        tiny_encoder, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    from realm.data.publish import publish

    torch.manual_seed(0)
    # as ICT and DPR build it: the lengths they train at go with it
    retriever = load_retriever(tiny_encoder, 16, pooling, max_query_tokens=6, max_block_tokens=20)
    retriever.save_pretrained(tmp_path / "r")
    out = publish(str(tmp_path / "r"), "someone/realm-retriever", to_dir=str(tmp_path / "hub"))
    assert out["dir"] == str(tmp_path / "hub" / "realm-retriever") and not out["uploaded"]
    model = SentenceTransformer(out["dir"], device="cpu")
    routes = model[0].sub_modules
    # sentence-transformers counts [CLS] and [SEP]s: it cuts where realm cuts
    assert routes["query"][0].max_seq_length == 6 + 2
    assert routes["document"][0].max_seq_length == 20 + 3
    for part, length in (("query_encoder", 8), ("doc_encoder", 23)):
        assert SentenceTransformer(f"{out['dir']}/{part}", device="cpu").max_seq_length == length
    assert model.similarity_fn_name == "dot"

    tok = retriever.tokenizer
    queries = ["who wrote hamlet", "the longest question here is cut after six word pieces"]
    ours = embed_queries(retriever, [tok(q, add_special_tokens=False)["input_ids"]
                                     for q in queries], special_ids(tok), 6)
    theirs = model.encode_query(queries)
    assert theirs.shape == (2, 16) and np.abs(ours - theirs).max() < 1e-5
    assert np.abs(model.encode(queries) - theirs).max() < 1e-6  # plain encode: the query route
    titles = ["Hamlet", "Paris"]
    bodies = ["Hamlet is a tragedy by William Shakespeare.", "Paris is the capital of France."]
    blocks = build_block_inputs([tok(t, add_special_tokens=False)["input_ids"] for t in titles],
                                [tok(b, add_special_tokens=False)["input_ids"] for b in bodies],
                                *special_ids(tok), max_length=23)
    with torch.no_grad():
        p_reps = retriever.encode_blocks(*blocks).p_reps.numpy()
    docs = model.encode_document(list(zip(titles, bodies)))
    assert np.abs(p_reps - docs).max() < 1e-5
    assert not np.allclose(docs, model.encode_query(bodies), atol=1e-3)  # two towers
    # and realm reads the exported copy back with its lengths
    back = Retriever.from_pretrained(out["dir"])
    assert (back.max_query_tokens, back.max_block_tokens) == (6, 20)


def _plain(text):
    text = unicodedata.normalize("NFD", text.lower())
    return "".join(c for c in text if not unicodedata.combining(c) and not c.isspace())


def test_to_dataset_spans_are_character_offsets_into_the_block_text(spans_corpus):
    from realm.hub import load_tokenizer

    store = BlockStore(spans_corpus)
    tok = load_tokenizer(store.tokenizer_name)
    ds = store.to_dataset(tok)
    assert ds.column_names == ["id", "article_id", "title", "text", "spans"]
    n = 0
    for row in ds:
        body = store.body_ids(row["id"])
        assert row["text"] == store.text(row["id"])
        assert len(row["spans"]) == len(store.spans(row["id"]))
        for s in row["spans"]:
            piece = row["text"][s["start"]: s["end"]]
            pieces = tok.decode(body[s["token_start"]: s["token_end"]])
            assert _plain(piece) == _plain(pieces).replace("##", ""), (piece, pieces)
            assert piece == piece.strip() and piece
            n += 1
    assert n > 50


def _qa_model(squad_tiny, tiny_encoder, tiny_retriever, corpus):
    from realm.modeling.openqa import OpenQAModel
    from realm.modeling.span_reader import SpanReader
    from realm.retrieval.fixed import DenseIndex, document_embeddings

    store = BlockStore(corpus)
    retriever = Retriever.from_pretrained(tiny_retriever)
    index = DenseIndex(document_embeddings(retriever, store, 64, progress=False))
    torch.manual_seed(0)
    reader = SpanReader.from_checkpoint(tiny_encoder, seed=0)
    return OpenQAModel(retriever, reader, index, store, reader.tokenizer, k=2,
                       max_question_tokens=20, max_joined_tokens=160)


def _answers(qa, questions):
    return [(a["answer"], a["block"]) for a in qa.answer_batch(questions)]


def test_an_openqa_model_answers_after_moving_and_after_publishing_with_its_corpus(
        squad_tiny, tiny_encoder, tiny_retriever, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub
    from huggingface_hub import ModelCard

    from realm.data.publish import publish
    from realm.data.qa import read_qa
    from realm.qa import OpenQA
    from realm.retrieval.fixed import save_openqa_model
    from realm.tracking import Tracker
    from realm.training.openqa_setup import evaluate_dev

    work = tmp_path / "work"
    shutil.copytree(squad_tiny / "corpus", work / "corpus")
    model = _qa_model(squad_tiny, tiny_encoder, tiny_retriever, work / "corpus")
    model_dir = work / "run" / "model"
    save_openqa_model(model, str(model_dir), {
        "k": 2, "max_question_tokens": 20, "max_joined_tokens": 160,
        "reader_source": "sentence-transformers/all-MiniLM-L6-v2"},
        metadata={"stage": "finetune_openqa", "steps": 0})
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["corpus"]["name"] == "../../corpus"
    retriever_manifest = json.loads((model_dir / "retriever" / "manifest.json").read_text())
    assert retriever_manifest["max_query_tokens"] == 20  # the query length it answers at
    examples = read_qa(str(squad_tiny / "qa.jsonl"))[:6]
    questions = [e.question for e in examples]
    expected = _answers(OpenQA.from_pretrained(model_dir), questions)

    # the stage's evaluation writes its figures into the card
    report = evaluate_dev(model, examples, [1, 2], 4, False,
                          Tracker(str(work / "run"), enabled=False), str(work / "run"), 0,
                          progress=False, dataset=str(squad_tiny / "qa.jsonl"))
    data = ModelCard.load(model_dir / "README.md").data
    figures = {r.metric_type: r.metric_value for r in data.eval_results}
    assert figures["exact_match"] == report["exact_match"] and figures["f1"] == report["f1"]
    assert figures["recall"] == report["answer_recall@2"]
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"

    # moved: the recorded path is gone, the name relative to the model finds the corpus
    shutil.move(str(work), str(tmp_path / "moved"))
    moved = OpenQA.from_pretrained(tmp_path / "moved" / "run" / "model")
    assert moved.model.store.path == str(tmp_path / "moved" / "corpus")
    assert _answers(moved, questions) == expected

    # published: the corpus as a datasets repository, named by the model's manifest
    hub = tmp_path / "hub"
    out = publish(str(tmp_path / "moved" / "run" / "model"), "someone/realm-qa",
                  corpus_repo="someone/realm-corpus", to_dir=str(hub))
    assert "data/train-00000-of-00001.parquet" in out["corpus_files"]
    blocks = datasets.load_dataset(str(hub / "realm-corpus"), split="train",
                                   cache_dir=str(tmp_path / "hf"))
    store = BlockStore(hub / "realm-corpus")
    assert len(blocks) == len(store) and blocks[3]["text"] == store.text(3)
    assert store.fingerprint == manifest["corpus"]["fingerprint"]
    assert str(tmp_path) not in (hub / "realm-corpus" / "manifest.json").read_text()
    pushed = json.loads((hub / "realm-qa" / "manifest.json").read_text())
    assert pushed["corpus"]["name"] == "someone/realm-corpus"
    assert "someone/realm-corpus" in ModelCard.load(hub / "realm-qa" / "README.md").data.datasets
    # another machine: no corpus but the Hub's (snapshot_download stands in for the network)
    shutil.rmtree(tmp_path / "moved" / "corpus")
    fetched = []

    def snapshot_download(repo_id, repo_type=None, **kwargs):
        fetched.append((repo_id, repo_type))
        return str(hub / repo_id.split("/")[-1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    qa = OpenQA.from_pretrained("someone/realm-qa")  # a Hub id: the model too comes from there
    assert fetched == [("someone/realm-qa", "model"), ("someone/realm-corpus", "dataset")]
    assert _answers(qa, questions) == expected

    # or the corpus inside the model repository: it answers wherever the repository goes
    out = publish(str(hub / "realm-qa"), "someone/realm-qa-full", bundle_corpus=True,
                  to_dir=str(tmp_path / "hub2"))
    shutil.move(out["dir"], str(tmp_path / "alone"))
    shutil.rmtree(hub / "realm-corpus")
    alone = OpenQA.from_pretrained(tmp_path / "alone")
    assert alone.model.store.path == str(tmp_path / "alone" / "corpus")
    assert _answers(alone, questions) == expected


def test_publishing_an_openqa_model_without_its_corpus_is_refused_in_one_line(
        squad_tiny, tiny_encoder, tiny_retriever, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from realm.retrieval.fixed import save_openqa_model

    model = _qa_model(squad_tiny, tiny_encoder, tiny_retriever, squad_tiny / "corpus")
    save_openqa_model(model, str(tmp_path / "model"), {"k": 2, "max_question_tokens": 20,
                                                       "max_joined_tokens": 160})
    script = Path(__file__).resolve().parents[1] / "launch" / "push_to_hub.py"
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "model"), "someone/qa",
                          "--to-dir", str(tmp_path / "hub")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and "--corpus-repo" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "hub").exists()
