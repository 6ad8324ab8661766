"""A decoder-only retriever (DRAMA's backbone): SmolLM2's first layers, last-token pooling, over
a corpus cut with SmolLM2's tokenizer."""

import pytest
import numpy as np
import torch

from realm.config import load_config
from realm.data.store import BlockStore
from realm.modeling.embed import special_ids
from realm.modeling.retriever import Retriever
from realm.modeling.inputs import build_block_inputs
from realm.modeling.embedder import pool
from realm.tracking import read_metrics
from realm.training.ict import run_ict


def test_last_token_pooling_reads_the_last_real_token():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))


@pytest.mark.slow
def test_a_decoder_only_retriever_trains_with_ict_and_pools_its_end_of_text(
        smollm2, shared_data, tmp_path):
    from realm.config import DataConfig, SpansConfig
    from realm.data.build import build_corpus

    source = tmp_path / "leads.jsonl"
    with open(shared_data / "wikipedia" / "vital_level4_summaries_en.jsonl", encoding="utf-8") as f:
        source.write_text("".join(next(f) for _ in range(40)), encoding="utf-8")
    corpus = str(tmp_path / "corpus")
    build_corpus(DataConfig(input=str(source), tokenizer=smollm2, max_block_tokens=48),
                 SpansConfig(enabled=False), corpus, progress=False)
    run = tmp_path / "ict"
    summary = run_ict(load_config(overrides=[
        f"corpus={corpus}", f"retriever.encoder={smollm2}", "retriever.encoder_layers=2",
        "retriever.pooling=last", "retriever.dim=32", "retriever.max_block_tokens=48",
        f"cache_dir={tmp_path / 'cache'}", f"train.run_dir={run}", "train.steps=3",
        "train.batch_size=4", "train.lr=1e-4", "train.warmup_steps=1", "train.eval_every=0",
        "train.save_every=0", "ict.holdout_blocks=0", "logging.log_every=1",
        "logging.wandb=false"]), progress=False)
    losses = [r["loss"] for r in read_metrics(str(run)) if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    retriever = Retriever.from_pretrained(summary["retriever"])
    backbone = retriever.doc_encoder.backbone
    assert retriever.pooling == "last" and type(backbone).__name__ == "LlamaModel"
    assert backbone.config.num_hidden_layers == 2 and retriever.dim == 32
    # blocks read as `bos title eos body eos`; the embedding is the closing eos token's state
    tok = retriever.tokenizer
    cls_id, sep_id, pad_id = special_ids(tok)
    assert sep_id == tok.eos_token_id and cls_id in (tok.bos_token_id, tok.eos_token_id)
    store = BlockStore(corpus)
    inputs = build_block_inputs([store.title_ids(b) for b in (0, 1)],
                                [store.body_ids(b) for b in (0, 1)], cls_id, sep_id, pad_id,
                                max_length=51)
    ids, mask, types = inputs
    last = mask.sum(dim=1) - 1
    assert all(int(ids[i, last[i]]) == tok.eos_token_id for i in range(2))
    with torch.no_grad():
        reps = retriever.encode_blocks(ids, mask, types).p_reps
        states = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        manual = retriever.doc_encoder.projection(states[torch.arange(2), last])
    assert torch.allclose(reps, manual, atol=1e-5)
