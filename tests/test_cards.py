"""Every model directory realm writes loads with transformers (its tokenizer inside, the full
vocabulary) and carries a model card (README.md) saying what it is, how to load it and how it
was trained."""

import json

import torch

from realm.modeling.readers.mlm import KnowledgeAugmentedEncoder
from realm.modeling.span_reader import SpanReader
from realm.modeling.retriever import Retriever


def _vocab(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok("hello world")["input_ids"] == [101, 7592, 2088, 102]  # MiniLM's word pieces
    return len(tok)


def _card(path, *needles):
    card = (path / "README.md").read_text()
    for needle in needles:
        assert needle in card, (needle, card)
    manifest = path / "manifest.json"
    if manifest.exists():  # the card is listed (and size-checked) with the other files
        assert "README.md" in json.loads(manifest.read_text())["files"]
    return card


def test_retriever_directory_and_its_encoders_have_cards_and_tokenizers(tiny_encoder, tmp_path):
    torch.manual_seed(0)
    retriever = Retriever.from_checkpoint(tiny_encoder, dim=16, pooling="mean")
    path = retriever.save_pretrained(tmp_path / "r", metadata={
        "stage": "train_retriever", "steps": 150, "dev_answer_recall@20": 0.5612})
    _card(path, "# REALM-style dense retriever", "SentenceTransformer", "stage: train_retriever",
          "steps: 150", "dev_answer_recall@20: 0.5612", "dim: 16", "pooling: mean")
    for part in ("query_encoder", "doc_encoder"):
        _card(path / part, "16 dimensions", "mean pooling")
        assert _vocab(path / part) == len(retriever.tokenizer)
    assert _vocab(path) == _vocab(path / "tokenizer") == len(retriever.tokenizer)
    assert Retriever.from_pretrained(path).dim == 16  # the card does not upset the size check


def test_knowledge_augmented_encoder_loads_as_a_masked_lm_with_its_tokenizer(tiny_encoder,
                                                                             tmp_path):
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(0)
    ka = KnowledgeAugmentedEncoder.from_checkpoint(tiny_encoder)
    path = ka.save_pretrained(tmp_path / "ka", metadata={
        "stage": "adapt_mlm", "steps": 300, "heldout_after": {"accuracy": 0.268}})
    _card(path, "masked LM", "AutoModelForMaskedLM.from_pretrained", "stage: adapt_mlm",
          "heldout_after: accuracy: 0.268")
    assert _vocab(path) == ka.mlm.config.vocab_size
    plain = AutoModelForMaskedLM.from_pretrained(str(path))
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    assert KnowledgeAugmentedEncoder.from_pretrained(path).config.vocab_size == 30522


def test_reader_model_directory_holds_its_tokenizer(tiny_encoder, tmp_path):
    from transformers import AutoModel

    reader = SpanReader.from_checkpoint(tiny_encoder, max_span_tokens=4, span_hidden=8)
    path = reader.save_pretrained(tmp_path / "reader",
                                  metadata={"stage": "finetune_openqa", "steps": 320})
    _card(path, "# Open-QA span reader", "stage: finetune_openqa", "max_span_tokens: 4")
    assert _vocab(path / "model") == _vocab(path) == len(reader.tokenizer)
    encoder = AutoModel.from_pretrained(str(path / "model"))
    assert encoder.config.hidden_size == 32
    assert SpanReader.from_pretrained(path).max_span_tokens == 4


def test_push_to_hub_uploads_the_card_weights_and_tokenizer_and_says_so_offline(tiny_encoder,
                                                                                 tmp_path):
    """Offline: the files it would push (a dry run), and a clear refusal to push."""
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    from realm.hub import files_to_push, push_to_hub

    path = Retriever.from_checkpoint(tiny_encoder, dim=16).save_pretrained(tmp_path / "r")
    (path / ".sync.tmp-1").write_text("x")  # a leftover temp file is never pushed
    files = files_to_push(str(path))
    for name in ("README.md", "manifest.json", "tokenizer.json", "query_encoder/README.md",
                 "query_encoder/model.safetensors", "query_encoder/modules.json",
                 "query_encoder/2_Dense/model.safetensors", "doc_encoder/config.json"):
        assert name in files, name
    assert not any(".tmp-" in f for f in files)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        push_to_hub(str(path), "someone/realm-test")
    with pytest.raises(ValueError, match="manifest.json"):
        files_to_push(str(tmp_path))
    script = Path(__file__).resolve().parents[1] / "launch" / "push_to_hub.py"
    dry = subprocess.run([sys.executable, str(script), str(path), "someone/x", "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and json.loads(dry.stdout.splitlines()[-1])["files"] == files
    offline = subprocess.run([sys.executable, str(script), str(path), "someone/x"],
                             capture_output=True, text=True, timeout=60)
    assert offline.returncode == 1 and "HF_HUB_OFFLINE" in offline.stderr
