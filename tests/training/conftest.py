"""Shared fixtures: a tiny BERT checkpoint (MiniLM's tokenizer, 2 layers, hidden 32) and a small
real corpus of Wikipedia lead sections."""

import json

import pytest
import torch

from realm.config import DataConfig, SpansConfig
from realm.data.build import build_corpus
from realm.hub import load_tokenizer


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def leads_corpus(shared_data, tmp_path_factory):
    """300 lead sections (real text), blocks of at most 128 word pieces, no spans (not needed)."""
    tmp = tmp_path_factory.mktemp("leads")
    src = tmp / "leads.jsonl"
    with open(shared_data / "wikipedia" / "vital_level4_summaries_en.jsonl", encoding="utf-8") as f:
        lines = [next(f) for _ in range(300)]
    src.write_text("".join(lines), encoding="utf-8")
    build_corpus(DataConfig(input=str(src), max_block_tokens=128), SpansConfig(enabled=False),
                 str(tmp / "corpus"), progress=False)
    return str(tmp / "corpus")
