"""The Open-QA model: a dense step trains the query encoder (not the fixed index), answers (word
pieces or regular expressions) mark their spans, and p(z|x)'s temperature and normalization."""

import pytest
import torch

from realm.data.qa import QAExample, QADataset, collate_qa, read_qa
from realm.data.store import BlockStore
from realm.modeling.openqa import OpenQAModel
from realm.modeling.span_reader import SpanReader
from realm.modeling.retriever import Retriever
from realm.retrieval.fixed import BM25Index, DenseIndex, document_embeddings


def test_dense_step_trains_the_query_encoder_not_the_index(squad_tiny, tiny_encoder):
    store = BlockStore(str(squad_tiny / "corpus"))
    torch.manual_seed(0)
    retriever = Retriever.from_checkpoint(tiny_encoder, dim=16, pooling="mean")
    reader = SpanReader.from_checkpoint(tiny_encoder, max_span_tokens=5, span_hidden=8)
    emb = document_embeddings(retriever, store, 160, progress=False, precision="fp32")
    model = OpenQAModel(retriever, reader, DenseIndex(emb), store, reader.tokenizer, k=8,
                        max_joined_tokens=200)
    qa = read_qa(str(squad_tiny / "qa.jsonl"))
    batch = collate_qa([QADataset(qa, reader.tokenizer, 48)[i] for i in range(6)])
    out = model(batch)
    assert out.block_ids.shape == (6, 8) and out.retrieval_logits.shape == (6, 8)
    assert out.has_answer.any()  # 8 of the ~25 blocks: some question finds its answer
    out.loss.backward()
    q_grad = sum(p.grad.abs().sum() for p in retriever.query_encoder.parameters()
                 if p.grad is not None)
    assert float(q_grad) > 0
    assert all(not p.requires_grad for p in retriever.doc_encoder.parameters())
    assert all(p.grad is not None for p in reader.scorer.parameters())
    # answers are matched in the word pieces of the blocks actually read
    for i in range(6):
        block_has = out.answer_mask[i].flatten(1).any(dim=1)  # [k]
        for j in range(8):
            text = store.title(int(out.block_ids[i, j])) + " " + store.text(int(out.block_ids[i, j]))
            if block_has[j]:
                assert any(a.lower() in text.lower() for a in batch.answers[i])


def test_regex_answers_mark_their_spans_in_training(squad_tiny, tiny_encoder):
    store = BlockStore(str(squad_tiny / "corpus"))
    torch.manual_seed(0)
    reader = SpanReader.from_checkpoint(tiny_encoder, max_span_tokens=6, span_hidden=8)
    model = OpenQAModel(None, reader, BM25Index(store), store, reader.tokenizer, k=3,
                        max_joined_tokens=200, regex=True)
    qa = [QAExample("Which team won Super Bowl 50?", [r"Denver\s+Broncos|Broncos"])]
    batch = collate_qa([QADataset(qa, reader.tokenizer, 48, regex=True)[0]])
    out = model(batch)
    assert out.has_answer.all() and torch.isfinite(out.loss)
    found = torch.nonzero(out.answer_mask[0])  # [n, 3]: block, start, width
    assert len(found)
    for j, start, w in found.tolist():
        segment = int(out.segment_ids[0, j, start])
        offset = out.title_start[0, j] if segment == 1 else out.body_start[0, j]
        text = model.texts.span_text(int(out.block_ids[0, j]), segment, start - offset,
                                     start - offset + w)
        assert text in ("Denver Broncos", "Broncos")


def test_retrieval_temperature_softens_p_z_and_shared_normalization_compares_blocks(
        squad_tiny, tiny_encoder):
    store = BlockStore(str(squad_tiny / "corpus"))
    torch.manual_seed(0)
    reader = SpanReader.from_checkpoint(tiny_encoder, max_span_tokens=6, span_hidden=8)
    qa = read_qa(str(squad_tiny / "qa.jsonl"))[:4]
    batch = collate_qa([QADataset(qa, reader.tokenizer, 48)[i] for i in range(4)])
    sharp = OpenQAModel(None, reader, BM25Index(store), store, reader.tokenizer, k=4,
                        max_joined_tokens=200, retrieval_temperature=1.0)
    soft = OpenQAModel(None, reader, BM25Index(store), store, reader.tokenizer, k=4,
                       max_joined_tokens=200, retrieval_temperature=8.0)
    with torch.no_grad():
        out = sharp(batch)
    p_sharp = torch.softmax(sharp.prior_logits(out), -1)
    p_soft = torch.softmax(soft.prior_logits(out), -1)
    assert torch.allclose(soft.prior_logits(out), out.retrieval_logits / 8.0)
    assert (p_soft.max(-1).values < p_sharp.max(-1).values).all()
    assert (p_soft[:, -1] > p_sharp[:, -1]).all()  # the 4th block gets a say
    with pytest.raises(ValueError, match="temperature"):
        OpenQAModel(None, reader, BM25Index(store), store, reader.tokenizer,
                    retrieval_temperature=0.0)
    with pytest.raises(ValueError, match="normalization"):
        OpenQAModel(None, reader, BM25Index(store), store, reader.tokenizer,
                    normalization="global")


def test_answer_posteriors_share_the_answer_among_the_blocks_that_hold_it(squad_tiny,
                                                                          tiny_encoder):
    store = BlockStore(str(squad_tiny / "corpus"))
    torch.manual_seed(0)
    reader = SpanReader.from_checkpoint(tiny_encoder, max_span_tokens=6, span_hidden=8)
    model = OpenQAModel(None, reader, BM25Index(store), store, reader.tokenizer, k=4,
                        max_joined_tokens=200, retrieval_temperature=4.0)
    qa = read_qa(str(squad_tiny / "qa.jsonl"))[:4]
    batch = collate_qa([QADataset(qa, reader.tokenizer, 48)[i] for i in range(4)])
    with torch.no_grad():
        out = model(batch, with_loss=False)
    preds = model.best_spans(out)
    posteriors = model.answer_posteriors(out, preds)  # [B, k]
    torch.testing.assert_close(posteriors.sum(-1), torch.ones(4))
    for i, pred in enumerate(preds):
        best = list(out.block_ids[i]).index(pred["block"])
        assert posteriors[i, best] > 0  # the block of the best span holds it
        for j, block in enumerate(out.block_ids[i]):
            text = f"{store.title(int(block))} {store.text(int(block))}".lower()
            if pred["prediction"].lower() not in text:
                assert posteriors[i, j] == 0, (pred, j)
