"""The REALM pretraining step on a real corpus with a tiny model: candidates, null, gradients."""

import numpy as np
import pytest
import torch

from realm.data.mlm import MLMDataset, collate_mlm
from realm.data.store import BlockStore
from realm.modeling.embed import embed_blocks, special_ids
from realm.index.mips import MipsIndex
from realm.losses import pdist_loss, realm_marginal_loss
from realm.modeling.readers.mlm import KnowledgeAugmentedEncoder
from realm.modeling.retriever import Retriever
from realm.modeling.realm import REALM
from realm.training.pretrain import PretrainTask
from realm.training.prefetch import RetrievalPrefetch
from realm.modeling.realm_metrics import realm_metrics


@pytest.fixture(scope="module")
def setup(leads_corpus, tiny_retriever, tiny_encoder):
    torch.manual_seed(0)
    store = BlockStore(leads_corpus)
    retriever = Retriever.from_pretrained(tiny_retriever)
    special = special_ids(retriever.tokenizer)
    emb, _ = embed_blocks(retriever, store, special, progress=False)
    index = MipsIndex.build(emb)
    encoder = KnowledgeAugmentedEncoder.from_checkpoint(tiny_encoder)
    model = REALM(retriever, encoder, store, special, k=4, max_query_tokens=32,
                  max_block_tokens=64, max_joined_tokens=100)
    dataset = MLMDataset(store, retriever.tokenizer.mask_token_id, masking="random_span",
                         max_query_tokens=32, seed=0)
    return model, index, dataset


def test_candidates_exclude_the_source_and_end_with_null(setup):
    model, index, dataset = setup
    batch = collate_mlm([dataset[i] for i in range(6)])
    searched = {}

    def searcher(q, k, exclude):
        searched["exclude"] = exclude
        return index.search(q, k, exclude=exclude)

    out = model(batch, searcher)
    np.testing.assert_array_equal(searched["exclude"], batch.block_ids.numpy())
    assert out.block_ids.shape == (6, 4) and out.retrieval_logits.shape == (6, 5)
    assert not (out.block_ids == batch.block_ids[:, None]).any()  # never the source block
    # the null document is the last candidate: its p(y|null) is the same however retrieval went
    direct = out.log_p_y_given_z[:, -1]
    again = model(batch, lambda q, k, e: index.search(q, k, exclude=np.arange(len(e)) + 10_000))
    torch.testing.assert_close(again.log_p_y_given_z[:, -1], direct, rtol=1e-4, atol=1e-4)
    loss, log_p_z = realm_marginal_loss(out.retrieval_logits, out.log_p_y_given_z)
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(log_p_z.exp().sum(1), torch.ones(6))


def test_token_marginal_is_the_released_codes_loss_on_the_same_reads(setup):
    from realm.losses import realm_token_marginal_loss

    model, index, dataset = setup
    model.eval()  # (no dropout: the two models read identically)
    per_token = REALM(model.retriever, model.encoder, model.store, model.special, k=4,
                      max_query_tokens=32, max_block_tokens=64, max_joined_tokens=100,
                      marginal="token").eval()
    batch = collate_mlm([dataset[i] for i in range(5)])
    search = (lambda q, k, e: index.search(q, k, exclude=e))
    a, b = model(batch, search), per_token(batch, search)
    torch.testing.assert_close(a.log_p_y_given_z, b.log_p_y_given_z)  # the same reads
    assert b.loss.dim() == 0 and not torch.isclose(a.loss, b.loss)
    # from the per-token reads of the same candidates: the mean over tokens of the marginals
    loss, _ = realm_token_marginal_loss(b.retrieval_logits, _token_reads(per_token, batch, b),
                                        batch.target_mask)
    torch.testing.assert_close(b.loss, loss, rtol=1e-4, atol=1e-4)
    model.train()
    with pytest.raises(ValueError, match="marginal"):
        REALM(model.retriever, model.encoder, model.store, model.special, marginal="span")


def _token_reads(model, batch, out):
    """``log p(y_j|z, x)`` of the candidates ``out`` read, ``[B, k + 1, M]``."""
    from realm.modeling.inputs import build_joined_inputs

    cls_id, sep_id, pad_id = model.special
    ids = out.block_ids.numpy()
    joined = build_joined_inputs(
        batch.query_ids, [[model.store.title_ids(int(b)) for b in row] for row in ids],
        [[model.store.body_ids(int(b)) for b in row] for row in ids], cls_id, sep_id, pad_id,
        max_length=model.max_joined_tokens, mask_positions=batch.mask_positions)
    return model.encoder(joined.input_ids, joined.attention_mask, joined.token_type_ids,
                         joined.mask_positions, labels=batch.target_ids,
                         label_mask=batch.target_mask).token_log_probs


def test_gradients_reach_all_three_encoders(setup):
    model, index, dataset = setup
    model.zero_grad()
    task = PretrainTask(dataset, lambda q, k, e: index.search(q, k, exclude=e))
    batch = task.collate([dataset[i] for i in range(4)])
    loss, metrics = task.loss(model, batch)
    loss.backward()
    for name, part in [("query encoder", model.retriever.query_encoder),
                       ("doc encoder", model.retriever.doc_encoder),
                       ("knowledge-augmented encoder", model.encoder)]:
        norm = sum(float(p.grad.abs().sum()) for p in part.parameters() if p.grad is not None)
        assert norm > 0, name
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["masked_accuracy"] <= 1
    assert 0 < metrics["p_null"] < 1 and metrics["retrieval_entropy"] > 0
    assert any(k.startswith("ru_by_label/") for k in metrics)


def test_frozen_reader_passes_the_retriever_the_same_gradient_and_takes_none(setup,
                                                                            tiny_encoder):
    """``freeze_reader``: the reader reads in eval mode even when the model trains, gets no
    gradient and no optimizer group; the retriever's gradient and the loss are those of the
    same model with the reader trainable (compared in eval mode: no dropout anywhere)."""
    from realm.training.core import _param_groups

    model, index, dataset = setup
    frozen = REALM(model.retriever, KnowledgeAugmentedEncoder.from_checkpoint(tiny_encoder),
                   model.store, model.special, k=4, max_query_tokens=32, max_block_tokens=64,
                   max_joined_tokens=100, freeze_reader=True)
    frozen.encoder.load_state_dict(model.encoder.state_dict())
    frozen.train()
    assert frozen.retriever.training and not frozen.encoder.training
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    groups = _param_groups(frozen, 0.01, 1e-3, {"retriever.": 0.1, "encoder.": 0.0})
    n_trainable = sum(len(g["params"]) for g in groups)
    assert n_trainable == len(list(frozen.retriever.parameters()))
    batch = collate_mlm([dataset[i] for i in range(4)])
    search = lambda q, k, e: index.search(q, k, exclude=e)  # noqa: E731
    model.eval()
    try:
        out = model(batch, search)
        reference = _grads(model, out.loss)
    finally:
        model.train()
    frozen.retriever.eval()  # (the frozen reader is in eval mode already)
    try:
        got_out = frozen(batch, search)
        got = _grads(frozen, got_out.loss)
    finally:
        frozen.train()
    torch.testing.assert_close(got_out.loss, out.loss)
    assert not any(n.startswith("encoder.") for n in got)
    retriever = [n for n in reference if n.startswith("retriever.")]
    assert retriever and sorted(got) == sorted(retriever)
    for name in retriever:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-8)
    assert sum(float(g.abs().sum()) for g in got.values()) > 0


def test_null_document_metrics_are_what_the_null_only_control_scores(setup):
    """``loss_null`` and ``masked_accuracy_null``, logged by a retrieval run, equal the loss and
    accuracy of the null-only control (k = 0) on the same batch with the same reader."""
    from realm.training.pretrain import _null_searcher

    model, index, dataset = setup
    batch = collate_mlm([dataset[i] for i in range(6)])
    model.eval()
    try:
        with torch.no_grad():
            out = model(batch, lambda q, k, e: index.search(q, k, exclude=e))
            metrics = realm_metrics(out, batch)
            model.k = 0
            control = realm_metrics(model(batch, _null_searcher), batch)
    finally:
        model.k = 4
        model.train()
    assert metrics["loss_null"] == pytest.approx(control["loss"], rel=1e-4, abs=1e-4)
    assert metrics["masked_accuracy_null"] == pytest.approx(control["masked_accuracy"])
    # (the null document's column: every retrieved block reads differently)
    for j in range(4):
        first = float(-out.log_p_y_given_z[:, j].mean())
        assert metrics["loss_null"] != pytest.approx(first, rel=1e-5, abs=1e-5)


def test_examples_from_another_corpus_exclude_nothing(setup):
    model, index, dataset = setup
    batch = collate_mlm([dataset[i] for i in range(3)])
    seen = []

    def searcher(q, k, exclude):
        seen.append(exclude)
        return index.search(q, k, exclude=exclude)

    model.exclude_source = False
    try:
        out = model(batch, searcher)
    finally:
        model.exclude_source = True
    assert seen == [None]
    assert out.block_ids.shape == (3, 4) and out.retrieval_logits.shape == (3, 5)


@pytest.mark.parametrize("signal", ["marginal", "relative", "positive"])
def test_null_only_control_trains_on_the_null_document_alone(setup, signal):
    """(Whatever the retriever signal: the control is run with the same overrides.)"""
    from realm.training.pretrain import _null_searcher

    model, index, dataset = setup
    k = model.k
    model.k, model.retriever_signal = 0, signal
    try:
        task = PretrainTask(dataset, _null_searcher)
        batch = task.collate([dataset[i] for i in range(3)])
        loss, metrics = task.loss(model, batch)
        out, _ = task.last
    finally:
        model.k, model.retriever_signal = k, "marginal"
    assert out.retrieval_logits.shape == (3, 1) and out.block_ids.shape == (3, 0)
    torch.testing.assert_close(out.log_p_z, torch.zeros(3, 1))  # p(null|x) = 1
    # the loss is then exactly -log p(y|null, x)
    torch.testing.assert_close(loss, -out.log_p_y_given_z[:, 0].mean())
    assert set(metrics) == {"loss", "masked_accuracy", "fallback_examples"}


def _grads(model, loss) -> dict:
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)  # (a direct computation may go through the graph again)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _steps_under(setup, signals) -> dict:
    """One step's loss and gradients on the same batch under each retriever signal (eval mode:
    no dropout, so every pass sees the same network)."""
    model, index, dataset = setup
    batch = collate_mlm([dataset[i] for i in range(4)])
    model.eval()
    try:
        runs = {}
        for signal in signals:
            model.retriever_signal = signal
            out = model(batch, lambda q, k, e: index.search(q, k, exclude=e))
            runs[signal] = (out, _grads(model, out.loss))
    finally:
        model.retriever_signal = "marginal"
        model.train()
    return runs


def _same_reader_step(runs, a, b) -> None:
    """Signals ``a`` and ``b`` give REALM's loss value and the reader the same gradient."""
    (out_a, grads_a), (out_b, grads_b) = runs[a], runs[b]
    torch.testing.assert_close(out_b.loss, out_a.loss)
    reader = [n for n in grads_a if n.startswith("encoder.")]
    assert reader
    for name in reader:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("signal,min_ru", [("relative", 0.0), ("positive", 0.0),
                                           ("positive", 0.05)])
def test_relative_retriever_signal_ranks_the_retrieved_blocks_only(setup, signal, min_ru):
    """`relative`: the reader's gradient is REALM's; the retriever's is that of the marginal over
    the k retrieved blocks alone with p(y|z, x) held fixed (no null document); same loss value.
    `positive`: the same with p(y|z, x) floored at p(y|null, x), and with every block whose
    retrieval utility is at most ``min_ru`` counted as the null document."""
    model = setup[0]
    model.min_ru = min_ru
    try:
        runs = _steps_under(setup, ["marginal", signal])
    finally:
        model.min_ru = 0.0
    out, marginal = runs["marginal"]
    _same_reader_step(runs, "marginal", signal)
    target = out.log_p_y_given_z[:, :-1].detach()
    if signal == "positive":
        null = out.log_p_y_given_z[:, -1:].detach()
        ru = target - null
        target = torch.where(ru > min_ru, target, null)
        assert (target != out.log_p_y_given_z[:, :-1]).any()  # some block reads worse
        if min_ru:
            assert ((ru > 0) & (ru <= min_ru)).any(), "no block between 0 and the margin"
    # the direct computation, on the marginal pass's outputs (the same values)
    expected = _grads(model, realm_marginal_loss(out.retrieval_logits.detach(),
                                                 out.log_p_y_given_z)[0]
                      + realm_marginal_loss(out.retrieval_logits[:, :-1], target)[0])
    got = runs[signal][1]
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-8)
    retriever = [n for n in got if n.startswith("retriever.")]
    assert any(not torch.allclose(got[n], marginal[n], rtol=1e-3, atol=1e-9) for n in retriever)
    with pytest.raises(ValueError, match="retriever_signal"):
        REALM(model.retriever, model.encoder, model.store, (0, 0, 0), retriever_signal="ranked")


def test_pdist_signal_distills_the_readers_posterior_into_the_retriever(setup):
    """`pdist`: REALM's loss value and reader gradient; the retriever's gradient is that of the
    KL from the reader's length-normalised posterior over the k blocks to the retriever's."""
    model = setup[0]
    model.pdist_temperature = 0.5
    try:
        runs = _steps_under(setup, ["marginal", "pdist"])
    finally:
        model.pdist_temperature = 1.0
    _same_reader_step(runs, "marginal", "pdist")
    out, marginal = runs["marginal"]
    batch = collate_mlm([setup[2][i] for i in range(4)])
    valid = out.block_ids >= 0
    expected = _grads(model, realm_marginal_loss(out.retrieval_logits.detach(),
                                                 out.log_p_y_given_z)[0]
                      + pdist_loss(out.retrieval_logits[:, :-1], out.log_p_y_given_z[:, :-1],
                                   batch.target_mask.sum(1), valid, 0.5))
    got = runs["pdist"][1]
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-8)
    retriever = [n for n in got if n.startswith("retriever.")]
    assert any(not torch.allclose(got[n], marginal[n], rtol=1e-3, atol=1e-9) for n in retriever)


def test_shuffled_control_permutes_the_retrievers_target_only(setup):
    """`signal_control: shuffled`: the loss value and the reader's gradient stay REALM's; the
    retriever learns from log p(y|z, x) permuted among each example's blocks (null kept)."""
    model = setup[0]
    runs = _steps_under(setup, ["marginal"])
    out, marginal = runs["marginal"]
    model.signal_control = "shuffled"
    model.shuffle_generator.manual_seed(3)
    try:
        shuffled = _steps_under(setup, ["marginal"])["marginal"]
    finally:
        model.signal_control = "none"
    _same_reader_step({"a": runs["marginal"], "b": shuffled}, "a", "b")
    # the permutation the control drew, redrawn from the same seed
    model.shuffle_generator.manual_seed(3)
    valid = out.block_ids >= 0
    target, _ = model.shuffle(out.log_p_y_given_z.detach(),
                              torch.zeros(*out.log_p_y_given_z.shape, 1), valid)
    assert torch.equal(target[:, -1], out.log_p_y_given_z[:, -1].detach())  # null kept
    assert torch.equal(target.sort(1).values, out.log_p_y_given_z.detach().sort(1).values)
    assert not torch.equal(target, out.log_p_y_given_z.detach())
    expected = _grads(model, realm_marginal_loss(out.retrieval_logits.detach(),
                                                 out.log_p_y_given_z)[0]
                      + realm_marginal_loss(out.retrieval_logits, target)[0])
    for name, grad in shuffled[1].items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="signal_control"):
        REALM(model.retriever, model.encoder, model.store, (0, 0, 0), signal_control="sorted")


def test_vocabulary_chunked_step_is_the_same_step(setup, tiny_retriever, tiny_encoder):
    """pretrain.vocab_chunk (the default): the same loss, metrics and gradients on all three
    encoders as the step that builds the [B, k + 1, M, vocab] logits, and no logits kept."""
    _, index, dataset = setup
    store = BlockStore(dataset.store.path)
    runs = []
    for chunk in (0, 5000):  # the plain step; 7 chunks of MiniLM's 30,522 words
        torch.manual_seed(0)
        retriever = Retriever.from_pretrained(tiny_retriever)
        model = REALM(retriever, KnowledgeAugmentedEncoder.from_checkpoint(tiny_encoder), store,
                      special_ids(retriever.tokenizer), k=4, max_query_tokens=32,
                      max_block_tokens=64, max_joined_tokens=100, vocab_chunk=chunk)
        model.eval()  # (no dropout: the two runs read identically)
        task = PretrainTask(dataset, lambda q, k, e: index.search(q, k, exclude=e))
        batch = task.collate([dataset[i] for i in range(4)])
        loss, metrics = task.loss(model, batch)
        loss.backward()
        runs.append((model, loss, metrics, task.last[0]))
    (plain, loss_a, m_a, last_a), (lean, loss_b, m_b, last_b) = runs
    assert last_a.mlm_logits is None and last_b.mlm_logits is None  # nothing big kept
    assert torch.allclose(loss_a, loss_b, atol=1e-4)
    assert m_a.keys() == m_b.keys()
    for key in m_a:
        assert m_a[key] == pytest.approx(m_b[key], abs=1e-4), key
    assert torch.equal(last_a.predictions, last_b.predictions)
    for (name, p), q in zip(plain.named_parameters(), lean.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_rerank_recovers_the_fresh_top_k_from_a_stale_index(setup):
    """``rerank_candidates``: from a stale index (here: random vectors), searching every block and
    re-scoring them with the current document encoder reads exactly the fresh index's top k."""
    model, _, dataset = setup
    model.retriever.eval()
    emb, _ = embed_blocks(model.retriever, model.store, model.special, max_block_tokens=64,
                          progress=False)  # the blocks as the step reads them
    model.retriever.train()
    index = MipsIndex.build(emb)
    n = index.ntotal
    stale = MipsIndex.build(np.random.default_rng(0).standard_normal((n, index.dim))
                            .astype(np.float32))
    reranking = REALM(model.retriever, model.encoder, model.store, model.special, k=4,
                      max_query_tokens=32, max_block_tokens=64, max_joined_tokens=100,
                      rerank_candidates=n)
    batch = collate_mlm([dataset[i] for i in range(6)])
    fresh = []

    def stale_search(q, k, exclude):
        fresh.append(index.search(q, 4, exclude=exclude).block_ids)  # what a fresh index reads
        return stale.search(q, k, exclude=exclude)

    out = reranking(batch, stale_search)
    for got, want in zip(out.block_ids.numpy(), fresh[0]):
        assert set(got.tolist()) == set(want.tolist())
    assert reranking.rerank_changed > 0.5  # the random index's own top 4 were mostly wrong
    with pytest.raises(ValueError, match="rerank_candidates \\(2\\) must be 0 or >= k \\(4\\)"):
        REALM(model.retriever, model.encoder, model.store, model.special, k=4,
              rerank_candidates=2)


def test_rerank_under_bf16_autocast(setup):
    """The training core runs the step under autocast: re-ranking's scores stay fp32 there (numpy
    has no bfloat16) and each example keeps k distinct blocks of the L searched."""
    model, index, dataset = setup
    reranking = REALM(model.retriever, model.encoder, model.store, model.special, k=4,
                      max_query_tokens=32, max_block_tokens=64, max_joined_tokens=100,
                      rerank_candidates=12)
    batch = collate_mlm([dataset[i] for i in range(4)])
    searched = []

    def search(q, k, exclude):
        searched.append(index.search(q, k, exclude=exclude).block_ids)
        return index.search(q, k, exclude=exclude)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reranking(batch, search)
    assert torch.isfinite(out.loss)
    for got, pool in zip(out.block_ids.numpy(), searched[0]):
        assert len(set(got.tolist())) == 4 and set(got.tolist()) <= set(pool.tolist())


def test_prefetched_retrieval_is_the_inline_one_with_the_same_weights(setup):
    """``RetrievalPrefetch``: the next batch's search and inputs, made on the prefetch thread
    with a copy of the query encoder taken before the step's update, are what the step would have made
    itself (eval mode, same weights); a later change to the weights reaches the next copy, not
    the one in flight; an unsubmitted batch is searched inline."""
    model, index, dataset = setup
    model.eval()
    prefetcher = RetrievalPrefetch(index.search)
    try:
        batch = collate_mlm([dataset[i] for i in range(4)])
        prefetcher.submit(model, batch)
        ahead = prefetcher.take(batch)
        assert ahead is not None and ahead.assembled is not None
        inline = model(batch, index.search)
        prefetched = model(batch, index.search, ahead)
        np.testing.assert_array_equal(prefetched.block_ids.numpy(), inline.block_ids.numpy())
        assert torch.allclose(prefetched.loss, inline.loss, atol=1e-6)
        torch.testing.assert_close(prefetched.retrieval_logits, inline.retrieval_logits)

        live = model.retriever.query_encoder
        with torch.no_grad():  # an optimizer step's worth of change
            saved = [p.clone() for p in live.parameters()]
            for p in live.parameters():
                p.add_(0.05 * torch.randn_like(p))
        # the core's order: the next batch is submitted before the current one is taken
        other = collate_mlm([dataset[i] for i in range(4, 8)])
        third = collate_mlm([dataset[i] for i in range(8, 12)])
        prefetcher.submit(model, other)
        prefetcher.submit(model, third)
        prefetcher.wait_for_copy()  # (as the step does before its optimizer update)
        for mine, theirs in zip(prefetcher._copy.parameters(), live.parameters()):
            assert torch.equal(mine, theirs)
        assert prefetcher.take(batch) is None  # taken already: searched inline
        assert prefetcher.take(other) is not None and prefetcher.take(third) is not None
        assert prefetcher.summary()["hits"] == 3 and prefetcher.summary()["misses"] == 1
        with torch.no_grad():
            for p, q in zip(live.parameters(), saved):
                p.copy_(q)
    finally:
        prefetcher.close()
        model.train()


def test_a_bogus_index_factory_stops_the_stage_before_anything_runs(tmp_path):
    from realm.config import load_config
    from realm.errors import ConfigError
    from realm.training.pretrain import run_pretrain

    config = load_config(None, ["index.factory=Bogus", f"corpus={tmp_path}/no-corpus",
                                f"train.run_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=r"index.factory='Bogus' is not a faiss factory string "
                                          r"for 128-d vectors .*: could not parse index string"):
        run_pretrain(config, progress=False)
    assert not (tmp_path / "run").exists()  # (nor a corpus, warm start or refresher)
