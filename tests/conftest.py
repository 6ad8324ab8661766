"""Test-wide settings: nothing reaches a hub, wandb stays offline and inside a temp dir."""

import os
import tempfile
from pathlib import Path

import pytest

_WANDB_TMP = tempfile.mkdtemp(prefix="realm-tests-wandb-")
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DIR": _WANDB_TMP,
    "WANDB_CACHE_DIR": os.path.join(_WANDB_TMP, "cache"),
    "WANDB_DATA_DIR": os.path.join(_WANDB_TMP, "data"),
    "WANDB_CONFIG_DIR": os.path.join(_WANDB_TMP, "config"),
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ[_key] = _value

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (real third-party data; read, never copied)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """A random 2-layer BERT (hidden 32) checkpoint with MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from realm.hub import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
