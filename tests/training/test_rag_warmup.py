"""The RAG generator's positive warm-up (`openqa.positive_steps` with the generative reader) on
real SQuAD passages: each question's warm-up block is the best-ranked of its searched blocks that
holds an answer (its top block where none does); a warm-up step reads that block alone with
p(z|x) = 1, its loss the generator's own -log Σ_a p(a|z, x); later steps read the top k."""

import numpy as np
import pytest
import torch

from realm.data.qa import read_qa
from realm.data.store import BlockStore
from realm.errors import ConfigError
from realm.modeling.rag import GenerativeOpenQAModel, RAGGenerator
from realm.modeling.retriever import Retriever
from realm.retrieval.fixed import DenseIndex, document_embeddings, with_bm25
from realm.training.positives import generative_positives
from realm.training.rag import RAGTask


@pytest.fixture(scope="module")
def model(squad_tiny, lm_tokenizer, make_tiny_lm, tiny_encoder):
    torch.manual_seed(0)
    store = BlockStore(str(squad_tiny / "corpus"))
    retriever = Retriever.from_checkpoint(tiny_encoder, dim=16, pooling="mean")
    index = DenseIndex(document_embeddings(retriever, store, 160, progress=False,
                                           precision="fp32"))
    generator = RAGGenerator(make_tiny_lm(lm_tokenizer), lm_tokenizer, mode="full",
                             max_length=96)
    return GenerativeOpenQAModel(retriever, generator, index, store, k=3, max_answer_tokens=6)


@pytest.fixture(scope="module")
def qa(squad_tiny):
    return read_qa(str(squad_tiny / "qa.jsonl"))


def test_each_question_warms_up_on_its_best_ranked_block_with_an_answer(model, qa):
    blocks, found = generative_positives(model, qa, search_k=5, batch_size=5, progress=False)
    ids = model.retrieve([ex.question for ex in qa], 5).block_ids  # the ranking searched
    hits = model.block_has_answer(ids, [ex.answers for ex in qa])
    assert blocks.shape == found.shape == (len(qa),)
    for q in range(len(qa)):
        ranked_hits = [int(b) for b, h in zip(ids[q], hits[q]) if h]
        assert found[q] == bool(ranked_hits)
        assert blocks[q] == (ranked_hits[0] if ranked_hits else int(ids[q, 0]))
    # the tiny random retriever finds an answer for some questions and not for others
    assert 0 < found.sum() < len(qa)


def test_a_warm_up_step_reads_its_block_alone_then_the_top_k(model, qa):
    warm = np.arange(len(qa)) % len(model.store)  # any blocks: the step reads what it is given
    task = RAGTask(qa, [], lambda m: m, [1], 4, bf16=False, warm_up_blocks=warm,
                   positive_steps=1)
    batch = task.collate([(i, qa[i]) for i in (3, 7)])
    task.before_step(0)
    loss, metrics = task.loss(model, batch)
    questions = [qa[i].question for i in (3, 7)]
    answers = model.train_answers([qa[i].answers for i in (3, 7)], warm[[3, 7], None])
    scores = model.generator.score(questions, model.blocks(warm[[3, 7], None]), answers)
    per_answer = scores.token_log_probs[:, :, 0].sum(-1)  # [B, A]: log p(a|z, x)
    expected = -torch.logsumexp(per_answer.masked_fill(~scores.answer_mask, float("-inf")),
                                dim=1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert metrics["positive_warm_up"] == 1.0
    loss.backward()  # the query encoder takes part in the step (its gradient is zero: p(z|x) = 1)
    grads = [p.grad for p in model.retriever.query_encoder.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)
    model.zero_grad(set_to_none=True)
    task.before_step(1)  # past the warm-up: the top k, the marginal
    with torch.no_grad():
        loss, metrics = task.loss(model, batch)
        top = model(questions, [qa[i].answers for i in (3, 7)])
    assert metrics["positive_warm_up"] == 0.0
    torch.testing.assert_close(loss, top.loss)


def test_a_hybrid_index_scores_given_blocks_as_its_search_does(model, qa):
    hybrid = with_bm25(model.index, model.store, 1)
    questions = [ex.question for ex in qa[:4]]
    hybrid_model = GenerativeOpenQAModel(model.retriever, model.generator, hybrid, model.store,
                                         k=3)
    with torch.no_grad():
        searched = hybrid_model.retrieve(questions, 3)
        again = hybrid_model.block_logits(questions, searched.block_ids)
    torch.testing.assert_close(again, searched.scores)


def test_a_fine_tune_with_a_warm_up_reports_it(squad_tiny, tiny_generator, tiny_retriever,
                                               tmp_path):
    from realm.config import load_config
    from realm.training.openqa import run_finetune

    base = [f"corpus={squad_tiny / 'corpus'}", f"openqa.train_qa={squad_tiny / 'qa.jsonl'}",
            f"openqa.dev_qa={squad_tiny / 'qa.jsonl'}", "openqa.reader_type=generative",
            f"openqa.generator={tiny_generator}", "openqa.k=2", "openqa.recall_ks=[1,2]",
            "openqa.max_generator_tokens=96", "openqa.max_answer_tokens=6",
            "openqa.eval_limit=0", f"openqa.retriever={tiny_retriever}",
            "openqa.positive_steps=2", "openqa.positive_search=5",
            "retriever.max_block_tokens=160", "train.precision=fp32",
            f"cache_dir={squad_tiny / 'cache'}", "train.steps=3", "train.batch_size=2",
            "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0",
            "logging.wandb=false"]
    summary = run_finetune(load_config(None, base + [f"train.run_dir={tmp_path / 'run'}"]),
                           progress=False)
    assert summary["positive_steps"] == 2 and summary["steps"] == 3
    assert 0 < summary["train_questions_with_positive"] <= summary["train_questions"] == 12
    with pytest.raises(ConfigError, match="openqa.positive_steps"):
        run_finetune(load_config(None, base + ["openqa.closed_book=true",
                                               f"train.run_dir={tmp_path / 'closed'}"]),
                     progress=False)
    assert not (tmp_path / "closed").exists()
