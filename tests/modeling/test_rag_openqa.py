"""The generative Open-QA model on real SQuAD passages: its loss is the RAG marginal of the
generator's scores under p(z|x), a dense step trains the query encoder (not the fixed index), the
gold answers it scores are chosen as documented, and its answers come with p(z|x, y)."""

import numpy as np
import pytest
import torch

from realm.data.qa import read_qa
from realm.data.store import BlockStore
from realm.modeling.rag import GenerativeOpenQAModel, RAGGenerator, decode
from realm.modeling.rag.losses import rag_sequence_log_likelihood, rag_token_log_likelihood
from realm.modeling.retriever import Retriever
from realm.retrieval.fixed import BM25Index, DenseIndex, document_embeddings


@pytest.fixture(scope="module")
def store(squad_tiny):
    return BlockStore(str(squad_tiny / "corpus"))


@pytest.fixture(scope="module")
def generator(lm_tokenizer, make_tiny_lm):
    return RAGGenerator(make_tiny_lm(lm_tokenizer), lm_tokenizer, mode="full", max_length=96)


@pytest.mark.parametrize("rag_loss", ["sequence", "token"])
def test_dense_loss_is_the_rag_marginal_and_trains_the_query_encoder(
        squad_tiny, store, generator, tiny_encoder, rag_loss):
    torch.manual_seed(0)
    retriever = Retriever.from_checkpoint(tiny_encoder, dim=16, pooling="mean")
    index = DenseIndex(document_embeddings(retriever, store, 160, progress=False,
                                           precision="fp32"))
    model = GenerativeOpenQAModel(retriever, generator, index, store, k=3, rag_loss=rag_loss,
                                  max_answer_tokens=6, retrieval_temperature=2.0)
    qa = read_qa(str(squad_tiny / "qa.jsonl"))[:3]
    out = model([q.question for q in qa], [q.answers for q in qa])
    b, a, k, _ = out.token_log_probs.shape  # [B, A, k, T]
    assert out.block_ids.shape == (3, 3) and (b, a, k) == (3, max(map(len, out.answers)), 3)
    # the loss: the generator's scores of the kept answers beside the same blocks, under
    # p(z|x) = softmax(f(x, z) / T)
    blocks = [[(store.title(int(b)), store.text(int(b))) for b in row] for row in out.block_ids]
    scores = generator.score([q.question for q in qa], blocks, out.answers)
    reference = {"sequence": rag_sequence_log_likelihood,
                 "token": rag_token_log_likelihood}[rag_loss](
        out.retrieval_logits / 2.0, scores.token_log_probs, scores.answer_mask)
    torch.testing.assert_close(out.loss, -reference.mean(), rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in retriever.query_encoder.parameters()
               if p.grad is not None) > 0
    assert all(not p.requires_grad for p in retriever.doc_encoder.parameters())
    assert generator.lm.get_input_embeddings().weight.grad.abs().sum() > 0
    generator.zero_grad()


def test_kept_answers_fit_are_found_first_and_are_capped(store, generator):
    model = GenerativeOpenQAModel(None, generator, BM25Index(store), store, k=2,
                                  max_answer_tokens=4, max_train_answers=2)
    ids = np.array([[0, 1]])
    body = store.text(1)
    found = body.split()[0]  # a word of the second block's text
    long = "a very long answer that cannot fit"
    kept = model.train_answers([["banana", long, "giraffe", found]], ids)
    assert kept == [[found, "banana"]]  # found first, then the given order; the long one dropped
    assert model.train_answers([[long, long + " indeed"]], ids) == [[long]]  # the shortest
    with pytest.raises(ValueError, match="regular expressions"):
        GenerativeOpenQAModel(None, generator, BM25Index(store), store, regex=True)(
            ["who?"], [["x"]])


def test_answers_come_with_the_blocks_posterior(squad_tiny, store, generator):
    model = GenerativeOpenQAModel(None, generator, BM25Index(store), store, k=3,
                                  decoding="thorough", beam_size=2, max_answer_tokens=4)
    qa = read_qa(str(squad_tiny / "qa.jsonl"))[:2]
    questions = [q.question for q in qa]
    decoded, (logits, ids) = model.generate(questions)
    assert ids.shape == (2, 3) and decoded.posteriors.shape == (2, 3)
    torch.testing.assert_close(decoded.posteriors.sum(-1), torch.ones(2))
    same = decode(generator, questions, model.blocks(ids), logits.float(), method="thorough",
                  beam_size=2, max_answer_tokens=4)
    assert decoded.answers == same.answers
    closed = GenerativeOpenQAModel(None, generator, None, store, closed_book=True,
                                   max_answer_tokens=4)
    decoded, (logits, ids) = closed.generate(questions)
    assert (ids == -1).all() and ids.shape == (2, 1) and closed.blocks(ids) == [[None], [None]]
