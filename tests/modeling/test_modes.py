"""eval_mode: inference in eval mode, then every module's own mode back."""

from __future__ import annotations

import numpy as np
import torch

from realm.data.store import BlockStore
from realm.modeling.modes import eval_mode
from realm.modeling.retriever import Retriever
from realm.modeling.inputs import build_query_inputs


def test_eval_mode_restores_each_module_not_the_outer_flag():
    inner = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).eval()
    outer = torch.nn.Sequential(inner, torch.nn.Linear(4, 2))  # outer in training mode
    with eval_mode(outer):
        assert not any(m.training for m in outer.modules())
    assert outer.training and outer[1].training
    assert not inner.training and not inner[1].training  # as it was, dropout off
    try:  # restored when the block raises too
        with eval_mode(outer):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert outer.training and not inner[1].training


def test_embedding_blocks_leaves_a_loaded_retriever_deterministic(tiny_retriever, leads_corpus):
    """A retriever from from_pretrained (its backbones in eval mode) embeds the index; its query
    embeddings afterwards are those before (the Open-QA positive-block search ran right after a
    cold index build with the query encoder's dropout on)."""
    from realm.modeling.embed import embed_blocks, embed_queries, special_ids

    retriever = Retriever.from_pretrained(tiny_retriever)
    assert retriever.training and not any(
        m.training for m in retriever.query_encoder.modules() if isinstance(m, torch.nn.Dropout))
    store = BlockStore(leads_corpus)
    special = special_ids(retriever.tokenizer)
    queries = [list(store.body_ids(b)[:12]) for b in range(8)]
    before = embed_queries(retriever, queries, special)
    embed_blocks(retriever, store, special, max_block_tokens=32, progress=False,
                 block_ids=np.arange(16))
    assert not any(m.training for m in retriever.modules() if isinstance(m, torch.nn.Dropout))
    q_in = build_query_inputs(queries[:1], *special, max_length=66)
    with torch.no_grad():  # a forward outside any helper, as OpenQAModel.retrieve makes
        one = retriever.encode_queries(*q_in).q_reps
    np.testing.assert_allclose(embed_queries(retriever, queries, special), before, atol=1e-6)
    np.testing.assert_allclose(one[0].numpy(), before[0], atol=1e-5)
