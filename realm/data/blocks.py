"""Sentence-aware blocking: cut an article into blocks of at most ``max_block_tokens`` word pieces.

REALM retrieves over 288-word-piece blocks of Wikipedia, each carrying its article's title. Here an
article is tokenized once (with character offsets), split into sentences, and the sentences are
packed greedily into blocks; a sentence longer than a whole block is cut at word-piece boundaries.
Block boundaries always fall on token boundaries, and consecutive blocks tile the article's text,
so the blocks of an article reproduce it exactly up to whitespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# Words that end in a period without ending a sentence.
_ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof st jr sr vs etc e.g i.e cf al approx ca c no nos vol vols fig figs
    inc ltd co corp gen col lt sgt capt cmdr adm rev hon mt ft jan feb mar apr jun jul aug sep
    sept oct nov dec u.s u.k u.n d.c op pp ed eds est b d fl r""".split()
)
# A sentence may end at . ! ? (and closing quotes/brackets) followed by space and an opener.
_BOUNDARY = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9\u00c0-\u024f])")
_WORD_BEFORE = re.compile(r"([\w.]+)[.!?]$")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the sentences of ``text``.

    Lines (paragraphs, headings) never share a sentence. Spans exclude surrounding whitespace and
    are in order; every non-whitespace character of ``text`` lies in exactly one span.
    """
    spans: list[tuple[int, int]] = []
    pos = 0
    for line in text.split("\n"):
        line_start = pos
        pos += len(line) + 1
        start = 0
        for match in _BOUNDARY.finditer(line):
            end = match.start() + 1
            word = _WORD_BEFORE.search(line, 0, end)
            if word is not None:
                token = word.group(1).lower()
                if token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha()):
                    continue  # "Dr. Smith", "J. R. R. Tolkien"
            _append_stripped(spans, line, line_start, start, match.end())
            start = match.end()
        _append_stripped(spans, line, line_start, start, len(line))
    return spans


def _append_stripped(spans: list[tuple[int, int]], line: str, offset: int, s: int, e: int) -> None:
    piece = line[s:e]
    stripped = piece.strip()
    if stripped:
        lead = len(piece) - len(piece.lstrip())
        spans.append((offset + s + lead, offset + s + lead + len(stripped)))


def word_piece_encoder(tokenizer):  # -> tokenizers.Tokenizer
    """A copy of a fast tokenizer's Rust backend with truncation and padding off.

    Checkpoint tokenizers often truncate at 128 or 512 word pieces; blocking needs every piece of
    an article, with character offsets, and no special tokens (``add_special_tokens=False``).
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def tokenizer_sha256(tokenizer) -> str:
    """Content hash of a fast tokenizer (vocabulary, normalizer, pre-tokenizer): what a corpus
    built with it depends on, and what a model reading the corpus must match."""
    import hashlib

    return hashlib.sha256(word_piece_encoder(tokenizer).to_str().encode()).hexdigest()


@dataclass
class BlockedArticle:
    """An article cut into blocks.

    Attributes:
        title_ids: Word-piece ids of the title (possibly truncated), kept with every block.
        token_ids: Word-piece ids of the whole text, ``[n_tokens]``.
        token_starts: Character start of each token, ``[n_tokens]``.
        token_ends: Character end of each token, ``[n_tokens]``.
        block_tokens: ``[n_blocks, 2]`` token ranges ``[start, end)`` of each block.
        block_chars: ``[n_blocks, 2]`` character ranges tiling the text.
        sentences: ``[n_sentences, 2]`` character spans of the sentences.
        sentence_tokens: ``[n_sentences, 2]`` token ranges of the sentences.
    """

    title_ids: np.ndarray
    token_ids: np.ndarray
    token_starts: np.ndarray
    token_ends: np.ndarray
    block_tokens: np.ndarray
    block_chars: np.ndarray
    sentences: np.ndarray
    sentence_tokens: np.ndarray


def block_article(
    text: str,
    title_ids: np.ndarray,
    token_ids: np.ndarray,
    offsets: np.ndarray,
    max_block_tokens: int,
) -> BlockedArticle:
    """Pack the sentences of one tokenized article into blocks.

    Args:
        text: The article text.
        title_ids: Title word-piece ids; truncated to half a block if longer.
        token_ids: ``[n_tokens]`` word-piece ids of ``text`` (no special tokens).
        offsets: ``[n_tokens, 2]`` character offsets of each token in ``text``.
        max_block_tokens: Most word pieces per block, title included.

    Returns:
        The blocked article; it has no blocks when the text has no tokens.
    """
    title_ids = np.asarray(title_ids, dtype=np.int64)[: max_block_tokens // 2]
    budget = max_block_tokens - len(title_ids)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    sentences = np.asarray(split_sentences(text) or [(0, len(text))], dtype=np.int64).reshape(-1, 2)
    n_tokens = len(token_ids)
    if n_tokens == 0:
        empty = np.zeros((0, 2), dtype=np.int64)
        return BlockedArticle(title_ids, np.asarray(token_ids, np.int64), starts, ends, empty, empty,
                              sentences, empty)

    # First token of each sentence: [n_sentences]
    first_tok = np.searchsorted(starts, sentences[:, 0], side="left")
    cuts = [0]  # token indices where a block starts
    block_start = 0
    for s in range(len(sentences)):
        sent_end = int(first_tok[s + 1]) if s + 1 < len(sentences) else n_tokens
        if sent_end - block_start <= budget:
            continue  # the sentence still fits in the open block
        sent_start = int(first_tok[s])
        if sent_start > block_start:  # close the block before this sentence
            cuts.append(sent_start)
            block_start = sent_start
        while sent_end - block_start > budget:  # a sentence longer than a block: hard cuts
            block_start += budget
            cuts.append(block_start)
    cuts.append(n_tokens)
    block_tokens = np.stack([cuts[:-1], cuts[1:]], axis=1).astype(np.int64)  # [n_blocks, 2]
    block_tokens = block_tokens[block_tokens[:, 1] > block_tokens[:, 0]]
    char_cuts = starts[block_tokens[1:, 0]]
    block_chars = np.stack(
        [np.concatenate([[0], char_cuts]), np.concatenate([char_cuts, [len(text)]])], axis=1
    )  # [n_blocks, 2]
    return BlockedArticle(
        title_ids=title_ids,
        token_ids=np.asarray(token_ids, dtype=np.int64),
        token_starts=starts,
        token_ends=ends,
        block_tokens=block_tokens,
        block_chars=block_chars,
        sentences=sentences,
        sentence_tokens=np.stack([first_tok, np.append(first_tok[1:], n_tokens)], axis=1),
    )
