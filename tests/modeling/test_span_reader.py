"""The span reader: valid spans, token-level answer matching, the MLP over [h_start; h_end],
loading from a knowledge-augmented encoder, save/load."""

import numpy as np
import pytest
import torch
from transformers import BertConfig

from realm.modeling.readers.mlm import KnowledgeAugmentedEncoder
from realm.modeling.inputs import build_joined_inputs
from realm.modeling.span_reader import (SpanReader, SpanScorer, StartEndScorer, answer_span_mask,
    span_mask_from_segments)

CLS, SEP, PAD = 101, 102, 0


def _tiny_config():
    return BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128)


def _joined():
    # question [5, 6, 7]; block 0: title [20, 21], body [30, 31, 32, 33]; block 1: body only
    return build_joined_inputs([[5, 6, 7]], [[[20, 21], []]], [[[30, 31, 32, 33], [40, 41]]],
                               CLS, SEP, PAD, append_null=False)


def test_segments_and_valid_spans_stay_inside_title_or_body():
    joined = _joined()
    seg = joined.segment_ids
    assert seg[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 2, 2, 2, 2, 0]
    assert seg[1].tolist()[:9] == [0, 0, 0, 0, 0, 0, 2, 2, 0]  # empty title keeps its [SEP]
    assert joined.input_ids[0, 5:7].tolist() == [20, 21]
    assert joined.input_ids[0, 8:12].tolist() == [30, 31, 32, 33]
    mask = span_mask_from_segments(seg, max_width=3)  # [2, L, 3]
    starts, widths = torch.nonzero(mask[0], as_tuple=True)
    spans = {(int(s), int(s + w)) for s, w in zip(starts, widths)}
    assert spans == {(5, 5), (5, 6), (6, 6), (8, 8), (8, 9), (8, 10), (9, 9), (9, 10), (9, 11),
                     (10, 10), (10, 11), (11, 11)}  # none crosses [SEP] (7) or exceeds width 3
    assert not mask[:, :5].any()  # never in [CLS] or the question


def test_answer_spans_match_word_pieces_inside_the_block_only():
    joined = build_joined_inputs([[30, 31]], [[[9]]], [[[30, 31, 32, 30, 31]]], CLS, SEP, PAD,
                                 append_null=False)
    ids = joined.input_ids[0].numpy()
    valid = span_mask_from_segments(joined.segment_ids, 4)[0].numpy()
    found = answer_span_mask(ids, valid, [np.array([30, 31]), np.array([32]),
                                          np.array([1, 2, 3, 4, 5])])
    starts, widths = np.nonzero(found)
    # body starts at 6 ([CLS] q q [SEP] title [SEP]); the question's own "30 31" is not a span
    assert sorted(zip(starts.tolist(), widths.tolist())) == [(6, 1), (8, 0), (9, 1)]


def test_span_scorer_is_an_mlp_over_the_concatenated_endpoints():
    torch.manual_seed(0)
    scorer = SpanScorer(hidden_size=8, inner_size=5)
    states = torch.randn(2, 6, 8)
    scores = scorer(states, max_width=3)  # [2, 6, 3]
    w1 = torch.cat([scorer.start.weight, scorer.end.weight], dim=1)  # [5, 16]: on [h_s; h_e]
    for n in range(2):
        for i in range(6):
            for w in range(3):
                if i + w >= 6:
                    continue
                h = torch.cat([states[n, i], states[n, i + w]])  # [16]
                direct = scorer.out(torch.relu(w1 @ h + scorer.start.bias))
                assert torch.allclose(scores[n, i, w], direct.squeeze(), atol=1e-5)


def test_reader_from_ka_encoder_directory_and_save_load(tmp_path):
    torch.manual_seed(0)
    ka = KnowledgeAugmentedEncoder.from_config(_tiny_config())
    ka.save_pretrained(tmp_path / "encoder")
    reader = SpanReader.from_checkpoint(str(tmp_path / "encoder"), max_span_tokens=3, span_hidden=8)
    for name, p in reader.encoder.named_parameters():  # the masked LM's encoder, head dropped
        assert torch.equal(p, ka.mlm.base_model.get_parameter(name))
    # a pretraining run directory (holding encoder/) means its encoder
    run = SpanReader.from_checkpoint(str(tmp_path), max_span_tokens=3, span_hidden=8)
    assert torch.equal(run.scorer.out.weight, reader.scorer.out.weight)  # same seed, same head
    joined = _joined()
    args = (joined.input_ids, joined.attention_mask, joined.token_type_ids, joined.segment_ids)
    reader.eval()
    before = reader(*args)
    assert before.span_logits.shape == (2, joined.input_ids.shape[1], 3)
    reader.save_pretrained(tmp_path / "reader")
    loaded = SpanReader.from_pretrained(tmp_path / "reader").eval()
    assert loaded.max_span_tokens == 3 and loaded.span_hidden == 8
    after = loaded(*args)
    assert torch.allclose(before.span_logits, after.span_logits, atol=1e-6)
    assert torch.equal(before.span_mask, after.span_mask)
    with pytest.raises(FileExistsError):
        reader.save_pretrained(tmp_path / "reader")


def test_max_span_tokens_must_be_positive():
    with pytest.raises(ValueError, match="max_span_tokens"):
        SpanReader.from_config(_tiny_config(), max_span_tokens=0)
    with pytest.raises(ValueError, match="scorer"):
        SpanReader.from_config(_tiny_config(), scorer="bilinear")


def test_start_end_scorer_adds_the_start_and_end_logits(tmp_path):
    torch.manual_seed(0)
    scorer = StartEndScorer(hidden_size=8)
    states = torch.randn(2, 6, 8)
    scores = scorer(states, max_width=3)  # [2, 6, 3]
    start = states @ scorer.proj.weight[0] + scorer.proj.bias[0]  # [2, 6]
    end = states @ scorer.proj.weight[1] + scorer.proj.bias[1]
    for n in range(2):
        for i in range(6):
            for w in range(3):
                if i + w < 6:
                    assert torch.allclose(scores[n, i, w], start[n, i] + end[n, i + w], atol=1e-5)
    # a start_end reader saves and loads as one
    reader = SpanReader.from_config(_tiny_config(), max_span_tokens=3, scorer="start_end").eval()
    joined = _joined()
    args = (joined.input_ids, joined.attention_mask, joined.token_type_ids, joined.segment_ids)
    reader.save_pretrained(tmp_path / "reader")
    loaded = SpanReader.from_pretrained(tmp_path / "reader").eval()
    assert loaded.scorer_kind == "start_end" and isinstance(loaded.scorer, StartEndScorer)
    assert torch.allclose(reader(*args).span_logits, loaded(*args).span_logits, atol=1e-6)
