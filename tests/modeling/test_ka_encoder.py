"""Knowledge-augmented encoder: joined layout, tied new head, p(y|z, x) by hand, save/load."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from realm.data.mlm import MLMDataset, collate_mlm
from realm.data.store import BlockStore
from realm.losses import realm_marginal_loss
from realm.modeling import (
    KnowledgeAugmentedEncoder,
    KnowledgeAugmentedOutput,
    Retriever,
    build_joined_inputs,
    build_ka_encoder,
    read_manifest,
)

CLS, SEP, PAD, MASK = 1, 2, 0, 3


def tiny_config(**kwargs) -> BertConfig:
    return BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=PAD, **kwargs,
    )


def tiny_ka() -> KnowledgeAugmentedEncoder:
    torch.manual_seed(0)
    return KnowledgeAugmentedEncoder.from_config(tiny_config()).eval()


def _batch():
    """Two queries, two retrieved blocks each, plus the null document."""
    queries = [[10, MASK, MASK, 11], [12, MASK]]
    positions = [[1, 2], [1]]
    titles = [[[20], [21, 22]], [[23], []]]
    bodies = [[[30, 31, 32], [33]], [[34, 35], [36, 37]]]
    return queries, titles, bodies, positions


# -- layout -----------------------------------------------------------------------------------


def test_joined_layout_and_null_document_exactly():
    queries, titles, bodies, positions = _batch()
    j = build_joined_inputs(queries, titles, bodies, CLS, SEP, PAD, mask_positions=positions)
    assert j.num_candidates == 3
    assert j.input_ids.shape == j.attention_mask.shape == j.token_type_ids.shape == (6, 12)
    rows = [
        [CLS, 10, MASK, MASK, 11, SEP, 20, SEP, 30, 31, 32, SEP],
        [CLS, 10, MASK, MASK, 11, SEP, 21, 22, SEP, 33, SEP, PAD],
        [CLS, 10, MASK, MASK, 11, SEP, SEP] + [PAD] * 5,  # null: [CLS] x [SEP] [SEP]
        [CLS, 12, MASK, SEP, 23, SEP, 34, 35, SEP] + [PAD] * 3,
        [CLS, 12, MASK, SEP, SEP, 36, 37, SEP] + [PAD] * 4,  # empty title keeps its [SEP]
        [CLS, 12, MASK, SEP, SEP] + [PAD] * 7,
    ]
    assert j.input_ids.tolist() == rows
    lengths = [12, 11, 7, 9, 8, 5]
    assert j.attention_mask.tolist() == [[1] * n + [0] * (12 - n) for n in lengths]
    x_len = [6, 6, 6, 4, 4, 4]  # [CLS] x [SEP]
    assert j.token_type_ids.tolist() == [
        [0] * x + [1] * (n - x) + [0] * (12 - n) for x, n in zip(x_len, lengths)
    ]
    assert j.mask_positions.tolist() == [[2, 3], [2, 0]]
    assert j.position_mask.tolist() == [[True, True], [True, False]]
    for b in range(2):  # x sits at the same offset in all k + 1 candidates
        for c in range(3):
            for p, ok in zip(j.mask_positions[b], j.position_mask[b]):
                if ok:
                    assert int(j.input_ids[b * 3 + c, p]) == MASK


def test_joined_inputs_without_appended_null_and_truncation():
    queries, titles, bodies, _ = _batch()
    j = build_joined_inputs(queries, titles, bodies, CLS, SEP, PAD, append_null=False)
    assert j.num_candidates == 2 and j.input_ids.shape[0] == 4 and j.mask_positions is None
    j = build_joined_inputs(queries[:1], [[[20, 21, 22]]], [[[30, 31, 32]]], CLS, SEP, PAD,
                            max_length=11)
    assert j.input_ids[0].tolist() == [CLS, 10, MASK, MASK, 11, SEP, 20, 21, 22, SEP, SEP]
    j = build_joined_inputs(queries[:1], [[[20, 21, 22]]], [[[30]]], CLS, SEP, PAD, max_length=9)
    assert j.input_ids[0].tolist() == [CLS, 10, MASK, MASK, 11, SEP, 20, SEP, SEP]
    assert j.input_ids[1].tolist() == [CLS, 10, MASK, MASK, 11, SEP, SEP, PAD, PAD]
    with pytest.raises(ValueError, match="does not fit"):
        build_joined_inputs(queries[:1], [[[20]]], [[[30]]], CLS, SEP, PAD, max_length=6)
    with pytest.raises(ValueError, match="same number"):
        build_joined_inputs(queries, [[[20]], []], [[[30]], []], CLS, SEP, PAD)
    with pytest.raises(ValueError, match="outside"):
        build_joined_inputs(queries[:1], [[[20]]], [[[30]]], CLS, SEP, PAD, mask_positions=[[4]])


# -- the head ---------------------------------------------------------------------------------


def test_new_head_decoder_is_tied_to_the_input_embeddings():
    ka = tiny_ka()
    assert ka.mlm.cls.predictions.decoder.weight is ka.mlm.bert.embeddings.word_embeddings.weight
    assert ka.output_embeddings.weight is ka.input_embeddings.weight
    assert ka.head_initialised
    ka = KnowledgeAugmentedEncoder.from_config(tiny_config(tie_word_embeddings=False))
    assert ka.output_embeddings.weight is ka.input_embeddings.weight


def test_checkpoint_without_mlm_head_gets_a_tied_head_and_says_so(tiny_encoder, caplog):
    with caplog.at_level(logging.INFO, logger="realm.modeling.readers.mlm"):
        ka = KnowledgeAugmentedEncoder.from_checkpoint(tiny_encoder)
    assert ka.head_initialised and ka.tokenizer is not None
    assert ka.mlm.cls.predictions.decoder.weight is ka.mlm.bert.embeddings.word_embeddings.weight
    assert any("no masked-LM head" in r.getMessage() for r in caplog.records)


def test_packaged_minilm_has_no_mlm_head_and_gets_a_tied_one():
    ka = build_ka_encoder("sentence-transformers/all-MiniLM-L6-v2")
    assert ka.head_initialised and ka.config.hidden_size == 384
    assert ka.output_embeddings.weight is ka.input_embeddings.weight
    assert ka.tokenizer.mask_token_id == 103


def test_checkpoint_with_mlm_head_keeps_its_trained_weights(tmp_path, caplog):
    torch.manual_seed(1)
    mlm = BertForMaskedLM(tiny_config(tie_word_embeddings=False))
    with torch.no_grad():
        mlm.cls.predictions.decoder.weight.normal_()
        mlm.cls.predictions.transform.dense.weight.fill_(0.5)
    mlm.save_pretrained(tmp_path / "mlm")
    with caplog.at_level(logging.INFO, logger="realm.modeling.readers.mlm"):
        ka = KnowledgeAugmentedEncoder.from_checkpoint(str(tmp_path / "mlm"), with_tokenizer=False)
    assert not ka.head_initialised
    assert not any("no masked-LM head" in r.getMessage() for r in caplog.records)
    assert torch.equal(ka.output_embeddings.weight, mlm.cls.predictions.decoder.weight)
    assert ka.output_embeddings.weight is not ka.input_embeddings.weight  # left as trained
    assert torch.all(ka.mlm.cls.predictions.transform.dense.weight == 0.5)


def test_builder_needs_exactly_one_source():
    with pytest.raises(ValueError):
        build_ka_encoder()
    with pytest.raises(ValueError):
        build_ka_encoder("x", config=tiny_config())


# -- forward ----------------------------------------------------------------------------------


def _forward(ka, labels=((40, 41), (42, 0))):
    queries, titles, bodies, positions = _batch()
    j = build_joined_inputs(queries, titles, bodies, CLS, SEP, PAD, mask_positions=positions)
    labels = torch.tensor(labels)
    out = ka(j.input_ids, j.attention_mask, j.token_type_ids, mask_positions=j.mask_positions,
             labels=labels, label_mask=j.position_mask)
    return j, labels, out


def test_log_probs_of_targets_equal_a_direct_computation():
    ka = tiny_ka()
    with torch.no_grad():
        j, labels, out = _forward(ka)
    assert isinstance(out, KnowledgeAugmentedOutput)
    assert out.logits.shape == (2, 3, 2, 64)
    assert out.token_log_probs.shape == (2, 3, 2) and out.log_probs_of_targets.shape == (2, 3)
    with torch.no_grad():
        full = ka.mlm(input_ids=j.input_ids, attention_mask=j.attention_mask,
                      token_type_ids=j.token_type_ids).logits  # [6, seq_len, vocab]
    for b in range(2):
        for c in range(3):
            direct = 0.0
            for m in range(2):
                if not j.position_mask[b, m]:
                    assert float(out.token_log_probs[b, c, m]) == 0.0
                    continue
                row = full[b * 3 + c, int(j.mask_positions[b, m])]
                assert torch.allclose(out.logits[b, c, m], row, atol=1e-5)
                direct += float(torch.log_softmax(row, -1)[int(labels[b, m])])
            assert abs(float(out.log_probs_of_targets[b, c]) - direct) < 1e-4
    # the null document and the retrieved blocks give different predictions
    assert not torch.allclose(out.log_probs_of_targets[:, 0], out.log_probs_of_targets[:, 2])


def test_full_model_path_matches_the_masked_positions_head_path(monkeypatch):
    ka = tiny_ka()
    _, _, fast = _forward(ka)
    monkeypatch.setattr(KnowledgeAugmentedEncoder, "_head", lambda self: None)
    _, _, slow = _forward(ka)
    assert torch.allclose(fast.logits, slow.logits, atol=1e-5)
    assert torch.allclose(fast.log_probs_of_targets, slow.log_probs_of_targets, atol=1e-5)


def test_without_positions_logits_cover_every_token_and_labels_need_positions():
    ka = tiny_ka()
    queries, titles, bodies, _ = _batch()
    j = build_joined_inputs(queries, titles, bodies, CLS, SEP, PAD)
    out = ka(j.input_ids, j.attention_mask, j.token_type_ids)
    assert out.logits.shape == (6, 12, 64) and out.log_probs_of_targets is None
    with pytest.raises(ValueError, match="mask_positions"):
        ka(j.input_ids, j.attention_mask, labels=torch.zeros(2, 1, dtype=torch.long))


def test_marginal_loss_gradients_reach_the_encoder():
    ka = tiny_ka().train()
    _, _, out = _forward(ka)
    retrieval_logits = torch.zeros(2, 3, requires_grad=True)
    loss, _ = realm_marginal_loss(retrieval_logits, out.log_probs_of_targets)
    loss.backward()
    assert retrieval_logits.grad.abs().sum() > 0
    assert ka.input_embeddings.weight.grad.abs().sum() > 0
    assert ka.mlm.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


# -- persistence ------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    ka = tiny_ka()
    path = ka.save_pretrained(tmp_path / "ka", metadata={"step": 7})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "knowledge_augmented_encoder"
    assert manifest["tied_embeddings"] and manifest["head_initialised"]
    assert manifest["metadata"] == {"step": 7} and "model.safetensors" in manifest["files"]
    assert not list(tmp_path.glob(".ka.tmp-*"))
    loaded = KnowledgeAugmentedEncoder.from_pretrained(path).eval()
    assert loaded.output_embeddings.weight is loaded.input_embeddings.weight
    _, _, a = _forward(ka)
    _, _, b = _forward(loaded)
    assert torch.allclose(a.log_probs_of_targets, b.log_probs_of_targets, atol=1e-6)
    # the directory is a plain transformers masked LM too, decoder still tied
    plain = BertForMaskedLM.from_pretrained(path).eval()
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    assert torch.equal(plain.get_output_embeddings().weight, ka.output_embeddings.weight)
    with pytest.raises(FileExistsError):
        ka.save_pretrained(path)
    ka.save_pretrained(path, overwrite=True)


def test_manifest_kinds_are_not_confused(tmp_path):
    ka_dir = tiny_ka().save_pretrained(tmp_path / "ka")
    retriever_dir = Retriever.from_config(tiny_config(), dim=8).save_pretrained(tmp_path / "r")
    with pytest.raises(ValueError, match="kind"):
        KnowledgeAugmentedEncoder.from_pretrained(retriever_dir)
    with pytest.raises(ValueError, match="kind"):
        Retriever.from_pretrained(ka_dir)
    assert read_manifest(ka_dir, kind="knowledge_augmented_encoder")["kind"] == (
        "knowledge_augmented_encoder"
    )
    with pytest.raises(FileNotFoundError):
        KnowledgeAugmentedEncoder.from_pretrained(tmp_path)


# -- with real masked examples ----------------------------------------------------------------


def test_real_masked_examples_through_the_encoder(leads_corpus, tiny_encoder):
    store = BlockStore(leads_corpus)
    ka = KnowledgeAugmentedEncoder.from_checkpoint(tiny_encoder).eval()
    tok = ka.tokenizer
    ds = MLMDataset(store, tok.mask_token_id, masking="random_span", seed=0)
    batch = collate_mlm([ds[i] for i in range(3)])
    others = [[(b + 1) % len(store), (b + 2) % len(store)] for b in batch.block_ids.tolist()]
    j = build_joined_inputs(
        batch.query_ids,
        [[store.title_ids(z) for z in zs] for zs in others],
        [[store.body_ids(z) for z in zs] for zs in others],
        tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, max_length=160,
        mask_positions=batch.mask_positions,
    )
    assert j.input_ids.shape[0] == 9 and j.input_ids.shape[1] <= 160
    for b in range(3):
        n = int(batch.target_mask[b].sum())
        for c in range(3):
            assert torch.all(j.input_ids[b * 3 + c, j.mask_positions[b, :n]] == tok.mask_token_id)
        null = j.input_ids[b * 3 + 2]
        x = np.asarray(batch.query_ids[b])
        expected = [tok.cls_token_id, *x.tolist(), tok.sep_token_id, tok.sep_token_id]
        assert null[: len(expected)].tolist() == expected
        assert torch.all(null[len(expected):] == tok.pad_token_id)
    with torch.no_grad():
        out = ka(j.input_ids, j.attention_mask, j.token_type_ids,
                 mask_positions=j.mask_positions, labels=batch.target_ids,
                 label_mask=batch.target_mask)
    assert out.log_probs_of_targets.shape == (3, 3)
    assert torch.all(out.log_probs_of_targets < 0) and torch.all(torch.isfinite(out.logits))


def test_deliberate_partial_loads_log_one_line_not_a_load_report(capfd, caplog):
    """MiniLM has no MLM head (and a pooler realm drops): that is expected, so transformers'
    load-report table is not printed; one INFO line says what was new and what was dropped."""
    import logging

    with caplog.at_level(logging.INFO, logger="realm"):
        KnowledgeAugmentedEncoder.from_checkpoint("sentence-transformers/all-MiniLM-L6-v2")
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "UNEXPECTED" not in out + err
    [line] = [r.getMessage() for r in caplog.records if "initialised new" in r.getMessage()]
    assert "2 checkpoint tensors not used" in line and "6 initialised new" in line


# -- the vocabulary-chunked (lean) path ---------------------------------------------------------


def test_target_log_probs_and_their_gradients_equal_the_log_softmax():
    from realm.modeling.readers.target_logprobs import target_log_probs

    torch.manual_seed(0)
    h = torch.randn(9, 6, requires_grad=True)
    w = torch.randn(23, 6, requires_grad=True)
    b = torch.randn(23, requires_grad=True)
    t = torch.tensor([0, 22, 5, 5, 5, 11, 0, 7, 22])  # repeated targets, both ends
    g = torch.randn(9)
    direct = torch.log_softmax(h @ w.T + b, dim=-1).gather(-1, t[:, None]).squeeze(-1)
    (direct * g).sum().backward()
    expected = [x.grad.clone() for x in (h, w, b)]
    for chunk in (4, 23, 100):  # not dividing the vocabulary, exactly it, larger
        for x in (h, w, b):
            x.grad = None
        lean = target_log_probs(h, w, b, t, chunk=chunk)
        assert torch.allclose(lean, direct, atol=1e-5)
        (lean * g).sum().backward()
        for x, e in zip((h, w, b), expected):
            assert torch.allclose(x.grad, e, atol=1e-5), chunk


def test_chunked_encoder_scores_predicts_and_trains_as_the_logits_do():
    """vocab_chunk: the same log p(y|z,x), the same predictions and the same gradient on every
    parameter as the materialised logits; no logits are returned."""
    plain, lean = tiny_ka(), tiny_ka()
    lean.vocab_chunk = 10  # 64 words: 7 chunks
    outs = []
    for ka in (plain, lean):
        _, _, out = _forward(ka)
        out.log_probs_of_targets.sum().backward()
        outs.append(out)
    assert outs[1].logits is None and outs[1].hidden.shape == (2, 3, 2, 32)
    assert torch.allclose(outs[0].token_log_probs, outs[1].token_log_probs, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), lean.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    log_p_z = torch.log_softmax(torch.tensor([[0.3, -1.0, 0.5], [2.0, 0.0, -0.5]]), dim=-1)
    for a, b in zip(plain.predictions(outs[0], log_p_z), lean.predictions(outs[1], log_p_z)):
        assert torch.equal(a, b)


# -- the copy head ----------------------------------------------------------------------------


def copy_ka() -> KnowledgeAugmentedEncoder:
    ka = tiny_ka()
    torch.manual_seed(1)
    ka.add_copy_head()
    with torch.no_grad():  # attention that is not uniform, a gate that is not the default
        ka.copy_head.query.weight.normal_(std=0.5)
        ka.copy_head.gate.bias.fill_(-0.5)
    return ka.eval()


def test_copy_head_mixes_a_pointer_over_the_block_with_the_masked_lm_by_hand():
    ka = copy_ka()
    # query 0's first target (30) occurs in its first block's body only; 42 in no block
    with torch.no_grad():
        j, labels, out = _forward(ka, labels=((30, 41), (35, 0)))
        states = ka.mlm.bert(input_ids=j.input_ids, attention_mask=j.attention_mask,
                             token_type_ids=j.token_type_ids).last_hidden_state  # [6, L, H]
        vocab = torch.log_softmax(ka.mlm.cls(states), -1)  # [6, L, V]
    head = ka.copy_head
    for b in range(2):
        for c in range(3):
            row = b * 3 + c
            block = [t for t in range(j.input_ids.shape[1])
                     if j.token_type_ids[row, t] == 1 and j.input_ids[row, t] != SEP]
            for m in range(2):
                if not j.position_mask[b, m]:
                    assert float(out.token_log_probs[b, c, m]) == 0.0
                    continue
                pos, y = int(j.mask_positions[b, m]), int(labels[b, m])
                p_vocab = float(torch.exp(vocab[row, pos, y]))
                if c == 2:  # the null document: nothing to copy, the masked LM alone
                    assert float(out.copy.gate[b, c, m]) == 0.0
                    expected = p_vocab
                else:
                    h = states[row, pos]
                    scores = torch.stack([head.query(h) @ states[row, t] for t in block])
                    attention = torch.softmax(scores / 32 ** 0.5, 0).detach()
                    mass = sum(float(a) for a, t in zip(attention, block)
                               if int(j.input_ids[row, t]) == y)
                    context = (attention[:, None] * states[row, block]).sum(0)
                    best = torch.max(scores / 32 ** 0.5).clamp(min=-10.0).reshape(1)
                    gate = float(torch.sigmoid(head.gate(torch.cat([h, context, best]))).detach())
                    expected = (1 - gate) * p_vocab + gate * mass
                assert abs(float(out.token_log_probs[b, c, m]) - np.log(expected)) < 1e-4
    # copying helps exactly where the block holds the target (query 0: 30, query 1: 35, both in
    # their first block), with attention spread evenly over the block
    with torch.no_grad():
        ka.copy_head.query.weight.zero_()
        _, _, out = _forward(ka, labels=((30, 41), (35, 0)))
        _, _, plain = _forward(tiny_ka(), labels=((30, 41), (35, 0)))
    gain = out.token_log_probs - plain.token_log_probs  # the same encoder weights
    assert float(gain[0, 0, 0]) > 0.5 and float(gain[1, 0, 0]) > 0.5  # 30 and 35 in block 0
    assert float(gain[0, 1, 0]) < 0 and float(gain[0, 2, 0]) == 0.0  # not in it / null


@pytest.mark.parametrize("vocab_chunk", [0, 16])
def test_copy_head_predictions_are_the_argmax_of_the_mixture(vocab_chunk):
    ka = copy_ka()
    ka.vocab_chunk = vocab_chunk  # 16: the vocabulary in chunks, never the logits
    with torch.no_grad():
        j, labels, out = _forward(ka, labels=((30, 41), (35, 0)))
        states = ka.mlm.bert(input_ids=j.input_ids, attention_mask=j.attention_mask,
                             token_type_ids=j.token_type_ids).last_hidden_state
    assert (out.logits is None) == bool(vocab_chunk)
    log_p_z = torch.log_softmax(torch.tensor([[0.5, -0.3, 0.1], [2.0, 0.0, -1.0]]), -1)
    predicted, null_predicted = ka.predictions(out, log_p_z)
    ka.vocab_chunk = 0
    with torch.no_grad():
        _, _, full = _forward(ka, labels=((30, 41), (35, 0)))
    torch.testing.assert_close(out.token_log_probs, full.token_log_probs)
    for b in range(2):
        for m in range(2):
            mixture = torch.zeros(64)
            for c in range(3):
                row = b * 3 + c
                pos = int(j.mask_positions[b, m])
                p = torch.softmax(ka.mlm.cls(states[row, pos]), -1) * (1 - out.copy.gate[b, c, m])
                for t in range(j.input_ids.shape[1]):
                    p[int(j.input_ids[row, t])] += (out.copy.gate[b, c, m]
                                                    * out.copy.attention[b, c, m, t])
                mixture += float(torch.exp(log_p_z[b, c])) * p
            assert int(predicted[b, m]) == int(mixture.argmax())
            null_row = torch.softmax(ka.mlm.cls(states[b * 3 + 2, int(j.mask_positions[b, m])]), -1)
            assert int(null_predicted[b, m]) == int(null_row.argmax())
    vocab_only = torch.logsumexp(log_p_z[:, :, None, None]
                                 + torch.log_softmax(full.logits, -1), dim=1).argmax(-1)
    assert not torch.equal(predicted, vocab_only)  # copying changed some predictions


def test_copy_head_trains_and_survives_save_load(tmp_path):
    ka = copy_ka().train()
    _, _, out = _forward(ka, labels=((30, 41), (35, 0)))
    realm_marginal_loss(torch.zeros(2, 3), out.log_probs_of_targets)[0].backward()
    assert ka.copy_head.query.weight.grad.abs().sum() > 0
    assert ka.copy_head.gate.weight.grad.abs().sum() > 0
    ka.eval()
    path = ka.save_pretrained(tmp_path / "ka")
    assert read_manifest(path, kind="knowledge_augmented_encoder")["copy_head"] == \
        "copy_head.safetensors"
    loaded = KnowledgeAugmentedEncoder.from_pretrained(path).eval()
    assert loaded.copy_head is not None
    with torch.no_grad():
        _, _, a = _forward(ka, labels=((30, 41), (35, 0)))
        _, _, b = _forward(loaded, labels=((30, 41), (35, 0)))
    assert torch.allclose(a.log_probs_of_targets, b.log_probs_of_targets, atol=1e-6)
    BertForMaskedLM.from_pretrained(path)  # still a plain masked LM (the head file beside it)
