"""`python -m realm convert-realm` on tiny checkpoints written here in the layout transformers
4.x gave Google's REALM checkpoints (RealmEmbedder, RealmKnowledgeAugEncoder): the converted
retriever embeds as REALM's embedder computes (BERT's pooler over [CLS], the 128-d projection,
its LayerNorm), the converted reader's logits are REALM's masked LM, each against a reference
computed here with plain BertModel and torch over the same weights."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForMaskedLM, BertConfig, BertModel

from realm.__main__ import main
from realm.modeling.embed import embed_queries, special_ids
from realm.modeling.readers.mlm import KnowledgeAugmentedEncoder
from realm.modeling.retriever import Retriever

WORDS = ("who painted the mona lisa leonardo da vinci was an italian painter of renaissance "
         "portrait in paris louvre museum hangs").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
PROJ = 16
#: a RealmConfig as transformers 4.x saved it (REALM's reader and searcher fields included)
CONFIG = {"architectures": ["RealmEmbedder"], "model_type": "realm", "vocab_size": len(VOCAB),
          "hidden_size": 32, "retriever_proj_size": PROJ, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_candidates": 8, "intermediate_size": 64,
          "hidden_act": "gelu_new", "hidden_dropout_prob": 0.1,
          "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 64,
          "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
          "span_hidden_size": 32, "max_span_width": 10, "reader_layer_norm_eps": 1e-3,
          "reader_beam_size": 5, "reader_seq_len": 64, "num_block_records": 13353718,
          "searcher_beam_size": 5000, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
          "transformers_version": "4.17.0"}


def _randomise(module, seed):
    """Every weight random (LayerNorms too: a swapped gain and bias must show)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module.eval()


def _bert(seed):
    bert_config = BertConfig(**{k: CONFIG[k] for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size",
        "layer_norm_eps")})
    return _randomise(BertModel(bert_config, add_pooling_layer=True), seed)


def _write(directory, architecture, state, weights_file):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**CONFIG,
                                                       "architectures": [architecture]}))
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "RealmTokenizer", "do_lower_case": True, "model_max_length": 512}))
    if weights_file.endswith(".bin"):
        torch.save(state, directory / weights_file)
    else:
        save_file({k: v.clone().contiguous() for k, v in state.items()}, directory / weights_file)


@pytest.fixture(scope="module")
def realm_checkpoints(tmp_path_factory):
    """A tiny RealmEmbedder (pytorch_model.bin, with the 4.x position_ids buffer and the unused
    cls.predictions head) and RealmKnowledgeAugEncoder (model.safetensors, decoder tied), their
    reference BERTs and heads."""
    root = tmp_path_factory.mktemp("realm-ckpt")
    bert = _bert(0)
    proj = _randomise(torch.nn.Linear(32, PROJ), 1)
    norm = _randomise(torch.nn.LayerNorm(PROJ, eps=1e-12), 2)
    state = {f"realm.{k}": v for k, v in bert.state_dict().items()}
    state["realm.embeddings.position_ids"] = torch.arange(64)[None]
    state.update({f"cls.dense.{k}": v for k, v in proj.state_dict().items()})
    state.update({f"cls.LayerNorm.{k}": v for k, v in norm.state_dict().items()})
    state.update({"cls.predictions.bias": torch.zeros(len(VOCAB)),
                  "cls.predictions.transform.dense.weight": torch.randn(32, 32),
                  "cls.predictions.transform.dense.bias": torch.randn(32),
                  "cls.predictions.transform.LayerNorm.weight": torch.randn(32),
                  "cls.predictions.transform.LayerNorm.bias": torch.randn(32)})
    _write(root / "embedder", "RealmEmbedder", state, "pytorch_model.bin")

    reader = _bert(3)
    head = {"transform.dense": _randomise(torch.nn.Linear(32, 32), 4),
            "transform.LayerNorm": _randomise(torch.nn.LayerNorm(32, eps=1e-12), 5)}
    bias = torch.randn(len(VOCAB))
    state = {f"realm.{k}": v for k, v in reader.state_dict().items()}
    for name, module in head.items():
        state.update({f"cls.predictions.{name}.{k}": v for k, v in module.state_dict().items()})
    state.update({"cls.predictions.bias": bias, "cls.predictions.decoder.bias": bias,
                  "cls.predictions.decoder.weight": reader.embeddings.word_embeddings.weight})
    _write(root / "encoder", "RealmKnowledgeAugEncoder", state, "model.safetensors")
    return {"root": root, "bert": bert, "proj": proj, "norm": norm, "reader": reader,
            "head": head, "bias": bias}


@pytest.fixture(scope="module")
def converted(realm_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "realm"
    root = realm_checkpoints["root"]
    assert main(["convert-realm", "--embedder", str(root / "embedder"), "--encoder",
                 str(root / "encoder"), "--output", str(out)]) == 0
    return out


def test_the_summary_names_both_parts(realm_checkpoints, tmp_path, capsys):
    root = realm_checkpoints["root"]
    assert main(["convert-realm", "--embedder", str(root / "embedder"), "--encoder",
                 str(root / "encoder"), "--output", str(tmp_path / "realm")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["retriever"] == str(tmp_path / "realm" / "retriever")
    assert summary["reader"] == str(tmp_path / "realm" / "reader")
    manifest = json.loads((tmp_path / "realm" / "retriever" / "manifest.json").read_text())
    assert manifest["metadata"]["source_architecture"] == "RealmEmbedder"


def _embed_reference(c, ids, mask, types):
    """RealmEmbedder.forward: projected_score = LayerNorm(dense(pooler_output))."""
    with torch.no_grad():
        pooled = c["bert"](input_ids=ids, attention_mask=mask,
                           token_type_ids=types).pooler_output  # [n, 32]
        return F.layer_norm(c["proj"](pooled), (PROJ,), c["norm"].weight, c["norm"].bias,
                            eps=1e-12)  # [n, PROJ]


def test_the_converted_retriever_embeds_as_realms_embedder(realm_checkpoints, converted):
    retriever = Retriever.from_pretrained(converted / "retriever").eval()
    assert retriever.dim == PROJ and not retriever.share_weights
    tok = retriever.tokenizer
    # queries: [CLS] q [SEP]; blocks: [CLS] title [SEP] body [SEP] with the body as segment 1
    query = tok(["Who painted the Mona Lisa", "da vinci"], padding=True, return_tensors="pt")
    block = tok(["Mona Lisa"], ["the portrait hangs in the louvre museum in paris"],
                return_tensors="pt")
    assert tok.convert_ids_to_tokens(query["input_ids"][0])[:3] == ["[CLS]", "who", "painted"]
    with torch.no_grad():
        q = retriever.encode_queries(query["input_ids"], query["attention_mask"]).q_reps
        p = retriever.encode_blocks(block["input_ids"], block["attention_mask"],
                                    block["token_type_ids"]).p_reps
    c = realm_checkpoints
    torch.testing.assert_close(q, _embed_reference(c, query["input_ids"],
                                                   query["attention_mask"],
                                                   query["token_type_ids"]))
    torch.testing.assert_close(p, _embed_reference(c, block["input_ids"],
                                                   block["attention_mask"],
                                                   block["token_type_ids"]))
    assert float(p.std()) > 0.1  # a real vector, not a collapsed one
    # realm's own query path (what Searcher and the refresher run) gives the same vector
    pieces = [tok("Who painted the Mona Lisa", add_special_tokens=False)["input_ids"]]
    ours = embed_queries(retriever, pieces, special_ids(tok), max_query_tokens=32)
    torch.testing.assert_close(torch.from_numpy(ours), q[:1])


def test_the_converted_reader_scores_as_realms_masked_lm(realm_checkpoints, converted):
    c = realm_checkpoints
    reader = KnowledgeAugmentedEncoder.from_pretrained(converted / "reader").eval()
    tok = reader.tokenizer
    joined = tok(["who painted the [MASK] lisa"], ["mona lisa leonardo da vinci"],
                 return_tensors="pt")
    with torch.no_grad():
        logits = reader(joined["input_ids"], joined["attention_mask"],
                        joined["token_type_ids"]).logits  # [1, L, V]
        states = c["reader"](**joined).last_hidden_state  # [1, L, 32]
        h = c["head"]["transform.LayerNorm"](F.gelu(c["head"]["transform.dense"](states),
                                                    approximate="tanh"))
        expected = h @ c["reader"].embeddings.word_embeddings.weight.T + c["bias"]  # [1, L, V]
    torch.testing.assert_close(logits, expected)
    assert reader.output_embeddings.weight is reader.input_embeddings.weight  # tied, as REALM's
    # the ecosystem's loader reads the same model
    plain = AutoModelForMaskedLM.from_pretrained(converted / "reader").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**joined).logits, expected)


def test_a_shared_tower_and_the_sentence_transformers_layout(realm_checkpoints, tmp_path,
                                                             capsys):
    st = pytest.importorskip("sentence_transformers")
    root = realm_checkpoints["root"]
    assert main(["convert-realm", "--embedder", str(root / "embedder"), "--share-weights",
                 "--output", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out" / "reader").exists()
    retriever = Retriever.from_pretrained(tmp_path / "out" / "retriever")
    assert retriever.share_weights
    model = st.SentenceTransformer(str(tmp_path / "out" / "retriever" / "query_encoder"),
                                   device="cpu")
    text = "who painted the mona lisa"
    enc = retriever.tokenizer([text], return_tensors="pt")
    expected = _embed_reference(realm_checkpoints, enc["input_ids"], enc["attention_mask"],
                                enc["token_type_ids"])[0]
    # sentence-transformers' LayerNorm has epsilon 1e-5 where REALM's has 1e-12
    torch.testing.assert_close(torch.as_tensor(model.encode(text)), expected, atol=1e-4,
                               rtol=1e-4)


def test_wrong_or_missing_checkpoints_are_one_line(realm_checkpoints, tmp_path, capsys):
    root = realm_checkpoints["root"]
    assert main(["convert-realm", "--encoder", str(root / "embedder"),
                 "--output", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m realm convert-realm: error: ")
    assert "RealmKnowledgeAugEncoder" in err
    assert main(["convert-realm", "--embedder", str(root / "encoder"),
                 "--output", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "realm.pooler.dense" in err or "cls.dense" in err
    assert main(["convert-realm", "--embedder", str(tmp_path / "nowhere" / "x"),
                 "--output", str(tmp_path / "c")]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")
    with pytest.raises(SystemExit) as exit_:
        main(["convert-realm", "--output", str(tmp_path / "d")])
    assert exit_.value.code == 2


def test_a_corpus_cut_with_the_converted_tokenizer_is_searched(converted, tmp_path):
    """docs/realm_checkpoints.md's "Use": a corpus built with the converted retriever's tokenizer,
    searched through `realm.Searcher`; the top block's score is its REALM embedding's."""
    from realm import Searcher
    from realm.config import DataConfig, SpansConfig
    from realm.data.build import build_corpus

    articles = [("a", "mona lisa", "the mona lisa portrait hangs in the louvre museum in paris"),
                ("b", "leonardo da vinci", "leonardo da vinci was an italian painter"),
                ("c", "renaissance", "the italian renaissance of painter and portrait")]
    (tmp_path / "in.jsonl").write_text("".join(
        json.dumps({"id": i, "title": t, "text": x}) + "\n" for i, t, x in articles))
    build_corpus(DataConfig(input=str(tmp_path / "in.jsonl"),
                            tokenizer=str(converted / "retriever" / "tokenizer"),
                            max_block_tokens=32),
                 SpansConfig(enabled=False), str(tmp_path / "corpus"), progress=False)
    searcher = Searcher.from_pretrained(converted / "retriever", corpus=tmp_path / "corpus",
                                        precision="fp32")
    hits = searcher.search("who painted the mona lisa", k=3)
    assert sorted(h.block_id for h in hits) == [0, 1, 2]
    retriever = searcher.retriever
    tok = retriever.tokenizer
    query = tok(["who painted the mona lisa"], return_tensors="pt")
    block = tok([hits[0].title], [hits[0].text], return_tensors="pt")
    with torch.no_grad():
        q = retriever.encode_queries(query["input_ids"], query["attention_mask"]).q_reps
        p = retriever.encode_blocks(**{k: block[k] for k in ("input_ids", "attention_mask",
                                                            "token_type_ids")}).p_reps
    assert hits[0].score == pytest.approx(float(q[0] @ p[0]), abs=1e-4)
