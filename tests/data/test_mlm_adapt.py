"""BERT-style whole-word masking on real block stores (the MLM adaptation's examples)."""

from collections import Counter

import numpy as np
import pytest



@pytest.fixture(scope="module")
def minilm_tokenizer():
    from realm.hub import load_tokenizer

    return load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")


def _block_dataset(store, tok, **kwargs):
    from realm.data.mlm_adapt import BlockMLMDataset, continuation_pieces

    random_ids = np.setdiff1d(np.arange(len(tok)), tok.all_special_ids)
    return BlockMLMDataset(store, np.arange(len(store)),
                           (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id),
                           continuation_pieces(tok), random_ids, **kwargs)


def test_whole_word_masking_rates_words_and_specials(leads_store, minilm_tokenizer):
    from realm.data.mlm_adapt import continuation_pieces

    tok = minilm_tokenizer
    cont = continuation_pieces(tok)
    assert cont[tok.convert_tokens_to_ids("##ing")] and not cont[tok.convert_tokens_to_ids("sing")]
    data = _block_dataset(leads_store, tok, max_tokens=128, mask_prob=0.15, seed=3)
    kinds, share = Counter(), []
    for i in range(len(data)):
        ex = data[i]
        original = np.concatenate([[tok.cls_token_id], leads_store.title_ids(ex.block_id)[:32]])
        special = np.isin(ex.input_ids, tok.all_special_ids) & (ex.input_ids != tok.mask_token_id)
        # never a special token: [CLS] and both [SEP]s stay, and none is a target
        assert ex.input_ids[0] == tok.cls_token_id and ex.input_ids[-1] == tok.sep_token_id
        assert not np.isin(ex.target_ids, tok.all_special_ids).any()
        assert np.array_equal(ex.input_ids[: len(original)][~np.isin(
            np.arange(len(original)), ex.mask_positions)], original[~np.isin(
                np.arange(len(original)), ex.mask_positions)])
        restored = ex.input_ids.copy()
        restored[ex.mask_positions] = ex.target_ids
        n_maskable = (~np.isin(restored, tok.all_special_ids)).sum()
        assert special.sum() >= 3
        share.append(len(ex.mask_positions) / n_maskable)
        # whole words: a masked continuation piece follows a masked piece of its word
        masked = set(ex.mask_positions.tolist())
        for p in ex.mask_positions:
            if cont[ex.target_ids[list(ex.mask_positions).index(p)]]:
                assert p - 1 in masked
        # the piece after a masked word is no continuation of it
        for p in ex.mask_positions:
            if p + 1 < len(ex.input_ids) and p + 1 not in masked:
                restored = ex.input_ids.copy()
                restored[ex.mask_positions] = ex.target_ids
                assert not cont[restored[p + 1]] or restored[p] in tok.all_special_ids
        for p, t in zip(ex.mask_positions, ex.target_ids):
            kinds["mask" if ex.input_ids[p] == tok.mask_token_id
                  else "kept" if ex.input_ids[p] == t else "random"] += 1
    assert 0.13 < np.mean(share) < 0.17  # 15% of the maskable pieces, whole words at a time
    total = sum(kinds.values())
    assert 0.75 < kinds["mask"] / total < 0.85  # 80 / 10 / 10 (by word, counted by piece)
    assert 0.06 < kinds["random"] / total < 0.14 and 0.06 < kinds["kept"] / total < 0.14
    # a pure function of (seed, epoch, block): the same example twice, another epoch differs
    again = _block_dataset(leads_store, tok, max_tokens=128, mask_prob=0.15, seed=3)
    assert np.array_equal(again[5].input_ids, data[5].input_ids)
    again.set_epoch(1)
    assert not np.array_equal(again[5].mask_positions, data[5].mask_positions)


def test_salient_span_mix_masks_one_span(spans_store, minilm_tokenizer):
    tok = minilm_tokenizer
    data = _block_dataset(spans_store, tok, max_tokens=96, salient_span_prob=1.0)
    hits = 0
    for i in range(len(data)):
        ex = data[i]
        spans = spans_store.spans(ex.block_id)
        offset = len(spans_store.title_ids(ex.block_id)[:24]) + 2
        as_seq = {(int(s["start"]) + offset, int(s["end"]) + offset) for s in spans}
        run = (int(ex.mask_positions[0]), int(ex.mask_positions[-1]) + 1)
        if as_seq and run in as_seq and len(ex.mask_positions) == run[1] - run[0]:
            hits += 1
    assert hits >= 0.8 * len(data)  # (spans past the cut-off fall back to words)


def test_no_maskable_text_is_an_error_naming_the_corpus(tmp_path, minilm_tokenizer):
    from realm.data.mlm_adapt import whole_word_mask

    with pytest.raises(ValueError, match="no maskable"):
        whole_word_mask(np.array([101, 102]), np.zeros(2, bool), np.zeros(30522, bool),
                        np.random.default_rng(0), 103, np.arange(1000, 2000))


def test_pairs_in_the_readers_layout(leads_store, minilm_tokenizer):
    """Two-segment examples: [CLS] body [SEP] (title' [SEP] body')? [SEP], as REALM reads."""
    tok = minilm_tokenizer
    data = _block_dataset(leads_store, tok, max_tokens=64, neighbour_prob=0.5, random_prob=0.25,
                          seed=1)
    article = leads_store.blocks["article"]
    seen = Counter()
    for i in range(len(data)):
        ex = data[i]
        seen[ex.pair] += 1
        restored = ex.input_ids.copy()
        restored[ex.mask_positions] = ex.target_ids
        body = leads_store.body_ids(ex.block_id)[:62]
        first = len(body) + 2
        assert np.array_equal(restored[:first], np.concatenate([[101], body, [102]]))
        assert (ex.token_type_ids[:first] == 0).all() and (ex.token_type_ids[first:] == 1).all()
        if ex.pair == "null":  # the null document: [CLS] x [SEP] [SEP]
            assert len(restored) == first + 1 and restored[-1] == 102
            continue
        # which block is the second segment: its title follows the first [SEP]
        rest = restored[first:]
        candidates = [b for b in range(len(leads_store))
                      if np.array_equal(rest[: len(leads_store.title_ids(b))],
                                        leads_store.title_ids(b))
                      and np.array_equal(rest[len(leads_store.title_ids(b)) + 1:][:8],
                                         leads_store.body_ids(b)[:8])]
        assert candidates, "the second segment is a block of the corpus"
        if ex.pair == "neighbour":
            assert any(abs(b - ex.block_id) == 1 and article[b] == article[ex.block_id]
                       for b in candidates)
        else:
            assert all(article[b] != article[ex.block_id] for b in candidates)
    # half the blocks that have a neighbour get it; the others fall back to the null document
    n = len(data)
    with_neighbour = sum(any(0 <= b < n and article[b] == article[i] for b in (i - 1, i + 1))
                         for i in range(n))
    assert with_neighbour > 50
    assert 0.35 * with_neighbour < seen["neighbour"] < 0.65 * with_neighbour
    assert 0.15 * n < seen["random"] < 0.35 * n and seen["null"] > 0.2 * n
    assert seen["none"] == 0
