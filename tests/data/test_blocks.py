"""Blocking invariants on real text: limits, tiling, titles, token boundaries."""

import json
import re

import numpy as np
import pytest

from realm.data.blocks import block_article, split_sentences, word_piece_encoder
from realm.hub import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return word_piece_encoder(load_tokenizer("sentence-transformers/all-MiniLM-L6-v2"))


@pytest.fixture(scope="module")
def articles(shared_data):
    """The first 40 articles of the 2015 Wikipedia file: long, sectioned, real."""
    import gzip

    out = []
    with gzip.open(shared_data / "wikipedia" / "enwiki2015_first30k_articles.jsonl.gz", "rt") as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) == 40:
                break
    return out


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_split_sentences_handles_abbreviations_and_initials():
    text = "Dr. Smith met J. R. R. Tolkien in the U.S. in 1950. He left.\nA heading\nNext line! Yes."
    spans = split_sentences(text)
    sentences = [text[s:e] for s, e in spans]
    assert sentences == [
        "Dr. Smith met J. R. R. Tolkien in the U.S. in 1950.",
        "He left.",
        "A heading",
        "Next line!",
        "Yes.",
    ]


def test_split_sentences_covers_every_non_space_character(articles):
    for art in articles[:10]:
        text = art["text"]
        spans = split_sentences(text)
        covered = "".join(text[s:e] for s, e in spans)
        assert _squash(covered) == _squash(text)
        assert all(e > s for s, e in spans)
        assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))


@pytest.mark.parametrize("max_tokens", [288, 64])
def test_blocks_respect_limit_tile_text_and_keep_title(tokenizer, articles, max_tokens):
    backend = tokenizer
    n_blocks = 0
    for art in articles:
        enc = backend.encode(art["text"], add_special_tokens=False)
        title = backend.encode(art["title"], add_special_tokens=False)
        blocked = block_article(art["text"], np.array(title.ids), np.array(enc.ids),
                                np.array(enc.offsets), max_tokens)
        bt, bc = blocked.block_tokens, blocked.block_chars
        n_blocks += len(bt)
        # every block, title included, is within the limit
        sizes = bt[:, 1] - bt[:, 0] + len(blocked.title_ids)
        assert sizes.max() <= max_tokens and sizes.min() > len(blocked.title_ids)
        # the title is kept whole with every block (titles here are short)
        assert list(blocked.title_ids) == title.ids
        # token ranges tile all tokens; char ranges tile the text
        assert bt[0, 0] == 0 and bt[-1, 1] == len(enc.ids)
        assert np.all(bt[1:, 0] == bt[:-1, 1])
        assert bc[0, 0] == 0 and bc[-1, 1] == len(art["text"])
        assert np.all(bc[1:, 0] == bc[:-1, 1])
        joined = "".join(art["text"][s:e] for s, e in bc)
        assert joined == art["text"]
        # each block's tokens are exactly the tokens of its characters
        offsets = np.array(enc.offsets)
        assert np.all(bc[:, 0] <= offsets[bt[:, 0], 0])
        assert np.all(offsets[bt[:, 1] - 1, 1] <= bc[:, 1])
    assert n_blocks > len(articles)  # these articles are long: several blocks each


def test_blocks_prefer_sentence_boundaries(tokenizer, articles):
    backend = tokenizer
    art = articles[0]
    enc = backend.encode(art["text"], add_special_tokens=False)
    title = backend.encode(art["title"], add_special_tokens=False)
    blocked = block_article(art["text"], np.array(title.ids), np.array(enc.ids),
                            np.array(enc.offsets), 288)
    sentence_starts = set(blocked.sentences[:, 0].tolist())
    cut_chars = blocked.block_chars[1:, 0]
    on_sentence = np.mean([c in sentence_starts for c in cut_chars])
    assert on_sentence > 0.9  # hard cuts only inside sentences longer than a block


def test_overlong_sentence_is_cut_at_token_boundaries(tokenizer):
    text = " ".join(["word"] * 500) + "."
    enc = tokenizer.encode(text, add_special_tokens=False)
    blocked = block_article(text, np.array([101, 102]), np.array(enc.ids), np.array(enc.offsets), 32)
    sizes = blocked.block_tokens[:, 1] - blocked.block_tokens[:, 0]
    assert sizes.max() == 30 and sizes.sum() == len(enc.ids)


def test_empty_token_text_gives_no_blocks():
    blocked = block_article("\u200b", np.array([5]), np.zeros(0, np.int64), np.zeros((0, 2)), 32)
    assert len(blocked.block_tokens) == 0
