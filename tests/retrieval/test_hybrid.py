"""`openqa.bm25_blocks`: a dense Open-QA index that reads BM25's top blocks beside its own, the
blocks scored by the dense retriever (grad to the query encoder); saved models keep it. And the
reciprocal rank fusion of `evaluate.py retrieval --fuse-bm25`."""

import numpy as np
import pytest
import torch

from realm.data.store import BlockStore
from realm.modeling.retriever import Retriever
from realm.retrieval.fixed import (BM25Index, DenseIndex, HybridIndex, document_embeddings,
                                   load_openqa_model, save_openqa_model)
from realm.retrieval.search import reciprocal_rank_fusion


def test_reciprocal_rank_fusion_by_hand():
    a = np.array([[3, 1, 2], [0, -1, -1]])
    b = np.array([[1, 4, 3], [5, 0, -1]])
    scores, ids = reciprocal_rank_fusion([a, b], 3, k_rrf=60)
    # 1: 1/62 + 1/61; 3: 1/61 + 1/63; 4: 1/62; 2: 1/63
    assert ids[0].tolist() == [1, 3, 4]
    np.testing.assert_allclose(scores[0], [1 / 62 + 1 / 61, 1 / 61 + 1 / 63, 1 / 62])
    assert ids[1].tolist() == [0, 5, -1] and scores[1, 2] == 0  # 0: 1/61 + 1/62; 5: 1/61


def test_a_hybrid_index_reads_bm25s_first_blocks_and_scores_with_the_query_encoder(squad_tiny):
    store = BlockStore(str(squad_tiny / "corpus"))
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((len(store), 8)).astype(np.float32)
    questions = ["Which NFL team represented the AFC at Super Bowl 50?",
                 "Where did Super Bowl 50 take place?"]
    q_reps = torch.randn(2, 8, requires_grad=True)
    dense = DenseIndex(embeddings).search(q_reps, len(store)).block_ids
    sparse = BM25Index(store).search(questions, len(store)).block_ids
    for n in (1, 2):
        found = HybridIndex(DenseIndex(embeddings), store, bm25_blocks=n).search(q_reps, 4,
                                                                     questions=questions)
        for row in range(2):  # BM25's first n, then the dense ranking's first others
            picked = list(sparse[row, :n])
            picked += [b for b in dense[row] if b not in picked][: 4 - n]
            assert found.block_ids[row].tolist() == picked
            assert len(set(picked)) == 4
        expected = torch.einsum("bd,bkd->bk", q_reps, torch.from_numpy(embeddings)[
            torch.from_numpy(found.block_ids)])
        torch.testing.assert_close(found.scores, expected)
    found.scores.sum().backward()  # p(z|x) is the dense retriever's: the query encoder trains
    assert q_reps.grad is not None and q_reps.grad.abs().sum() > 0
    # a question whose BM25 block the dense ranking also puts first: read once, the next fills
    both = HybridIndex(DenseIndex(embeddings), store)
    both.bm25.search = lambda qs, k: type(found)(torch.zeros(len(qs), k), dense[:, :k])
    again = both.search(q_reps, 3, questions=questions)
    assert again.block_ids.tolist() == dense[:, :3].tolist()
    with pytest.raises(ValueError, match="question texts"):
        both.search(q_reps, 3)


def test_a_model_fine_tuned_with_fusion_is_saved_and_loaded_with_it(
        squad_tiny, tiny_encoder, tiny_retriever, tmp_path):
    from realm.modeling.openqa import OpenQAModel, retrieve_blocks
    from realm.modeling.span_reader import SpanReader

    store = BlockStore(str(squad_tiny / "corpus"))
    retriever = Retriever.from_pretrained(tiny_retriever)
    index = HybridIndex(DenseIndex(document_embeddings(retriever, store, 64, progress=False)),
                        store)
    assert index.bm25_blocks == 1
    torch.manual_seed(0)
    reader = SpanReader.from_checkpoint(tiny_encoder, seed=0)
    model = OpenQAModel(retriever, reader, index, store, reader.tokenizer, k=2,
                        max_question_tokens=20, max_joined_tokens=160)
    questions = ["Where did Super Bowl 50 take place?", "Who won Super Bowl 50?"]
    ids = [retriever.tokenizer(q, add_special_tokens=False)["input_ids"] for q in questions]

    def retrieve(m):
        with torch.no_grad():
            return retrieve_blocks(m.retriever, m.index, questions, ids, 2, m.special, 20)

    before = retrieve(model)
    save_openqa_model(model, str(tmp_path / "model"), {
        "k": 2, "max_question_tokens": 20, "max_joined_tokens": 160})
    loaded = load_openqa_model(str(tmp_path / "model"), store, progress=False)
    assert isinstance(loaded.index, HybridIndex)
    after = retrieve(loaded)
    assert after.block_ids.tolist() == before.block_ids.tolist()
    torch.testing.assert_close(after.scores, before.scores)
    # without fusion the saved model says so, and loads a plain dense index
    model.index = DenseIndex(index.embeddings.numpy())
    save_openqa_model(model, str(tmp_path / "plain"), {
        "k": 2, "max_question_tokens": 20, "max_joined_tokens": 160})
    plain = load_openqa_model(str(tmp_path / "plain"), store, progress=False)
    assert type(plain.index) is DenseIndex


def test_a_live_index_scores_its_generations_blocks_with_the_live_document_encoder(
        squad_tiny, tiny_retriever):
    """RAG-end2end's index: the top k from the generation in use (a search callable), their
    scores q . d(z) by the current document encoder, with grad to it; -1 ids masked."""
    from realm.index.mips import SearchResult
    from realm.modeling.embed import special_ids
    from realm.modeling.inputs import build_block_inputs
    from realm.retrieval.fixed import LiveIndex

    store = BlockStore(str(squad_tiny / "corpus"))
    retriever = Retriever.from_pretrained(tiny_retriever)
    stale = np.random.default_rng(0).standard_normal((len(store), retriever.dim))
    seen = []

    def search(queries, k, exclude):
        seen.append(queries)
        ids = np.argsort(-(queries @ stale.T), axis=1)[:, :k]
        ids[1, -1] = -1  # fewer than k found for the second query
        return SearchResult(np.zeros(ids.shape, np.float32), ids)

    index = LiveIndex(search, retriever, store, max_block_tokens=64)
    q_reps = torch.randn(2, retriever.dim, requires_grad=True)
    found = index.search(q_reps, 3)
    assert seen[0].dtype == np.float32 and np.allclose(seen[0], q_reps.detach().numpy())
    cls_id, sep_id, pad_id = special_ids(retriever.tokenizer)
    for row in range(2):
        for col in range(3 - row):
            b = int(found.block_ids[row, col])
            p_in = build_block_inputs([store.title_ids(b)], [store.body_ids(b)], cls_id, sep_id,
                                      pad_id, max_length=67)
            with torch.no_grad():
                d = retriever.encode_blocks(*p_in).p_reps[0]
            torch.testing.assert_close(found.scores[row, col], q_reps[row].detach() @ d,
                                       rtol=1e-4, atol=1e-4)
    assert found.block_ids[1, 2] == -1 and found.scores[1, 2] == -1e4
    found.scores[found.block_ids >= 0].sum().backward()
    assert q_reps.grad.abs().sum() > 0
    assert all(p.grad is not None for p in retriever.doc_encoder.parameters() if p.requires_grad)
