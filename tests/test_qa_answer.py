"""`OpenQA.answer`: the block an answer came from, the answer's character offsets there, and a
no-answer threshold, for a span reader and a RAG generator over 20 real SQuAD passages (untrained
models: what is checked is where each answer lies, not whether it is right)."""

import json

import torch

from realm.data.store import BlockStore
from realm.modeling.openqa import OpenQAModel
from realm.modeling.rag import GenerativeOpenQAModel, RAGGenerator
from realm.modeling.span_reader import SpanReader
from realm.qa import OpenQA, answer_offsets
from realm.retrieval.fixed import BM25Index


def _questions(squad_tiny, n=4):
    return [json.loads(line)["question"] for line in open(squad_tiny / "qa.jsonl")][:n]


def _where(store, r):
    return (store.title if r["field"] == "title" else store.text)(r["block"])


def test_an_extracted_answer_is_cut_from_its_block_at_its_offsets(squad_tiny, tiny_encoder):
    store = BlockStore(squad_tiny / "corpus")
    torch.manual_seed(0)
    reader = SpanReader.from_checkpoint(tiny_encoder, seed=0)
    model = OpenQAModel(None, reader, BM25Index(store), store, reader.tokenizer, k=2,
                        max_joined_tokens=200)
    qa = OpenQA(model, "(in memory)")
    results = qa.answer_batch(_questions(squad_tiny))
    for r in results:
        assert r["answer"] and r["block"] in [e["block"] for e in r["evidence"]]
        assert r["answer_block"] == store.title(r["block"]) and r["field"] in ("title", "text")
        assert _where(store, r)[r["start"]: r["end"]] == r["answer"]
        assert "no_answer" not in r
    # the threshold: above the best score no answer (the guess still named), below it the same
    one = results[0]
    none = qa.answer(one["question"], min_score=one["score"] + 1.0)
    assert none["answer"] is None and none["no_answer"] is True
    assert none["start"] is None and none["end"] is None and none["field"] is None
    assert none["block"] == one["block"] and none["score"] == one["score"]
    kept = qa.answer(one["question"], min_score=one["score"] - 1.0)
    assert (kept["answer"], kept["start"], kept["end"]) == (one["answer"], one["start"],
                                                            one["end"])


def test_a_generated_answer_is_found_in_its_block_or_has_no_offsets(squad_tiny, lm_tokenizer,
                                                                     make_tiny_lm, monkeypatch):
    store = BlockStore(squad_tiny / "corpus")
    generator = RAGGenerator(make_tiny_lm(lm_tokenizer), lm_tokenizer, max_length=256,
                             precision="fp32")
    model = GenerativeOpenQAModel(None, generator, BM25Index(store), store, k=2,
                                  max_answer_tokens=4)
    qa = OpenQA(model, "(in memory)")
    question = _questions(squad_tiny, 1)[0]
    written = qa.answer(question)  # a random LM: whatever it wrote
    if written["start"] is None:
        text = store.text(written["block"]) + store.title(written["block"])
        assert not written["answer"].strip() or written["answer"].strip().lower() not in \
            text.lower()
    else:
        assert _where(store, written)[written["start"]: written["end"]].lower() == \
            written["answer"].strip().lower()
    # an answer that is in its block (another case), and one that is nowhere
    real = model.generate

    def writes(answer):
        def generate(*args, **kwargs):
            decoded, searched = real(*args, **kwargs)
            decoded.answers = [answer(int(searched.block_ids[i][int(p.argmax())]))
                               for i, p in enumerate(decoded.posteriors)]
            return decoded, searched
        return generate

    monkeypatch.setattr(model, "generate",
                        writes(lambda b: store.text(b)[20:41].strip().upper()))
    found = qa.answer(question)
    text, piece = store.text(found["block"]), found["answer"].lower()
    first = text.lower().find(piece)
    assert found["field"] == "text" and (found["start"], found["end"]) == (first,
                                                                           first + len(piece))
    assert text[found["start"]: found["end"]].upper() == found["answer"]
    monkeypatch.setattr(model, "generate", writes(lambda b: "zebra quartz"))
    missing = qa.answer(question)
    assert missing["answer"] == "zebra quartz" and missing["block"] is not None
    assert missing["start"] is None and missing["end"] is None and missing["field"] is None


def test_answer_offsets():
    assert answer_offsets("The Denver Broncos won.", "Denver Broncos") == (4, 18)
    assert answer_offsets("The Denver Broncos won.", " denver broncos ") == (4, 18)
    assert answer_offsets("The Denver Broncos won.", "Carolina") is None
    assert answer_offsets("The Denver Broncos won.", "") is None
