"""The tokenized block store: memory-mapped word pieces, per-block metadata, salient spans.

A corpus directory holds::

    manifest.json      what it is, from what inputs (fingerprint), counts, timings, checksums
    config.yaml        the resolved config that built it
    body_tokens.bin    word-piece ids of all block bodies, concatenated   (token dtype)
    title_tokens.bin   word-piece ids of all article titles, concatenated (token dtype)
    blocks.bin         one BLOCK_DTYPE row per block (article, token and char ranges, spans)
    articles.bin       one ARTICLE_DTYPE row per article (title tokens, first block, n_blocks)
    articles.jsonl     {"id", "title"} per article
    block_text.bin     UTF-8 text of each block body, concatenated
    spans.bin          one SPAN_DTYPE row per salient span, grouped by block
    sentences.bin      one SENTENCE_DTYPE row per sentence (piece) of each block, grouped by block

Block ids are row numbers in ``blocks.bin``: the order of the input articles, so stable across
runs with the same inputs and parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from realm.fsutil import sha256_file
from realm.errors import CorpusError
from realm.data.blocks import tokenizer_sha256, word_piece_encoder
from realm.hub import load_tokenizer

FORMAT_VERSION = 2
MANIFEST = "manifest.json"

BLOCK_DTYPE = np.dtype(
    [
        ("article", "<i8"),      # row in articles.bin
        ("tok_offset", "<i8"),   # first body token in body_tokens.bin
        ("n_tokens", "<i4"),     # body tokens
        ("char_start", "<i8"),   # character range of the block in its article's text
        ("char_end", "<i8"),
        ("text_offset", "<i8"),  # byte range in block_text.bin
        ("text_len", "<i8"),
        ("span_offset", "<i8"),  # first row in spans.bin
        ("n_spans", "<i4"),
        ("sent_offset", "<i8"),  # first row in sentences.bin
        ("n_sents", "<i4"),
    ]
)
ARTICLE_DTYPE = np.dtype(
    [("title_offset", "<i8"), ("title_len", "<i4"), ("first_block", "<i8"), ("n_blocks", "<i4")]
)
#: Token offsets are relative to the block body, end exclusive; ``label`` indexes label_names.
SPAN_DTYPE = np.dtype([("start", "<i4"), ("end", "<i4"), ("label", "<i2")])
#: Word-piece range of a sentence inside a block body (a sentence cut by a block edge gives a
#: piece in each block); ICT takes its queries from these.
SENTENCE_DTYPE = np.dtype([("start", "<i4"), ("end", "<i4")])


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every id of a vocabulary."""
    return np.dtype("<u2") if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype("<i4")


class _HashingFile:
    """An append-only binary file that hashes and counts what it writes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.f: BinaryIO = open(path, "wb")
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.nbytes += len(data)

    def close(self) -> dict[str, Any]:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"bytes": self.nbytes, "sha256": self.sha.hexdigest()}


class BlockStoreWriter:
    """Streams articles and their blocks into a (temporary) corpus directory.

    Args:
        path: Directory to write into; created, must be empty.
        vocab_size: Tokenizer vocabulary size (decides the token dtype).
    """

    _ARRAYS = ("body_tokens", "title_tokens", "blocks", "articles", "spans", "sentences", "block_text")

    def __init__(self, path: str, vocab_size: int) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.token_dtype = token_dtype(vocab_size)
        self.files = {name: _HashingFile(os.path.join(path, f"{name}.bin")) for name in self._ARRAYS}
        self.meta = open(os.path.join(path, "articles.jsonl"), "w", encoding="utf-8")
        self.n_blocks = self.n_articles = self.n_tokens = self.n_title_tokens = self.n_spans = 0
        self.n_sentences = 0
        self.text_bytes = 0
        self.labels: dict[str, int] = {}
        self.label_counts: dict[str, int] = {}

    def label_id(self, label: str) -> int:
        if label not in self.labels:
            self.labels[label] = len(self.labels)
        return self.labels[label]

    def add_article(
        self,
        article_id: str,
        title: str,
        title_ids: np.ndarray,
        text: str,
        token_ids: np.ndarray,
        block_tokens: np.ndarray,
        block_chars: np.ndarray,
        spans: list[tuple[int, int, int, str]],
        sentence_tokens: np.ndarray,
    ) -> None:
        """Append one article's blocks.

        Args:
            token_ids: ``[n_tokens]`` word pieces of the whole text.
            block_tokens: ``[n_blocks, 2]`` token ranges.
            block_chars: ``[n_blocks, 2]`` character ranges.
            spans: ``(block_index, start, end, label)`` sorted by block, offsets relative to the block.
            sentence_tokens: ``[n_sentences, 2]`` token ranges of the sentences (whole text).
        """
        n_blocks = len(block_tokens)
        art = np.zeros(1, ARTICLE_DTYPE)
        art["title_offset"] = self.n_title_tokens
        art["title_len"] = len(title_ids)
        art["first_block"] = self.n_blocks
        art["n_blocks"] = n_blocks
        self.files["articles"].write(art.tobytes())
        self.files["title_tokens"].write(np.asarray(title_ids, self.token_dtype).tobytes())
        self.n_title_tokens += len(title_ids)
        self.meta.write(json.dumps({"id": article_id, "title": title}, ensure_ascii=False) + "\n")

        rows = np.zeros(n_blocks, BLOCK_DTYPE)
        span_rows = np.zeros(len(spans), SPAN_DTYPE)
        per_block = np.zeros(n_blocks, np.int64)
        for j, (b, s, e, label) in enumerate(spans):
            span_rows[j] = (s, e, self.label_id(label))
            per_block[b] += 1
            self.label_counts[label] = self.label_counts.get(label, 0) + 1
        texts = [text[cs:ce].strip().encode("utf-8") for cs, ce in block_chars]
        text_lens = np.array([len(t) for t in texts], np.int64)
        rows["article"] = self.n_articles
        rows["tok_offset"] = self.n_tokens + block_tokens[:, 0]
        rows["n_tokens"] = block_tokens[:, 1] - block_tokens[:, 0]
        rows["char_start"] = block_chars[:, 0]
        rows["char_end"] = block_chars[:, 1]
        rows["text_offset"] = self.text_bytes + np.concatenate([[0], np.cumsum(text_lens)[:-1]])
        rows["text_len"] = text_lens
        rows["span_offset"] = self.n_spans + np.concatenate([[0], np.cumsum(per_block)[:-1]])
        rows["n_spans"] = per_block
        # sentence pieces per block: [n_blocks, n_sentences] overlaps of token ranges
        sent = np.asarray(sentence_tokens, np.int64).reshape(-1, 2)
        lo = np.maximum(sent[None, :, 0], block_tokens[:, None, 0])
        hi = np.minimum(sent[None, :, 1], block_tokens[:, None, 1])
        b_idx, s_idx = np.nonzero(hi > lo)  # row-major: grouped by block, in order
        sent_rows = np.zeros(len(b_idx), SENTENCE_DTYPE)
        sent_rows["start"] = lo[b_idx, s_idx] - block_tokens[b_idx, 0]
        sent_rows["end"] = hi[b_idx, s_idx] - block_tokens[b_idx, 0]
        sents_per_block = np.bincount(b_idx, minlength=n_blocks)
        rows["sent_offset"] = self.n_sentences + np.concatenate([[0], np.cumsum(sents_per_block)[:-1]])
        rows["n_sents"] = sents_per_block
        self.files["sentences"].write(sent_rows.tobytes())
        self.n_sentences += len(sent_rows)
        self.files["blocks"].write(rows.tobytes())
        self.files["spans"].write(span_rows.tobytes())
        self.files["block_text"].write(b"".join(texts))
        used = np.asarray(token_ids[: int(block_tokens[-1, 1])] if n_blocks else [], self.token_dtype)
        self.files["body_tokens"].write(used.tobytes())

        self.n_tokens += len(used)
        self.text_bytes += int(text_lens.sum())
        self.n_spans += len(spans)
        self.n_blocks += n_blocks
        self.n_articles += 1

    def close(self) -> dict[str, Any]:
        """Flush and fsync everything; return the ``files`` section of the manifest."""
        self.meta.flush()
        os.fsync(self.meta.fileno())
        self.meta.close()
        files = {f"{name}.bin": f.close() for name, f in self.files.items()}
        files["articles.jsonl"] = {
            "bytes": os.path.getsize(os.path.join(self.path, "articles.jsonl")),
            "sha256": sha256_file(os.path.join(self.path, "articles.jsonl")),
        }
        return files

    @property
    def label_names(self) -> list[str]:
        return sorted(self.labels, key=self.labels.get)  # type: ignore[arg-type]


@dataclass
class Block:
    """One block, for inspection and examples. Token arrays are copies."""

    block_id: int
    article_id: str
    title: str
    text: str
    title_ids: np.ndarray
    body_ids: np.ndarray
    spans: np.ndarray  # SPAN_DTYPE rows, offsets into body_ids
    sentences: np.ndarray  # SENTENCE_DTYPE rows, offsets into body_ids

    def span_labels(self, names: list[str]) -> list[str]:
        return [names[int(label)] for label in self.spans["label"]]


class BlockStore:
    """Read-only, memory-mapped view of a corpus directory.

    Args:
        path: The corpus directory (written by ``launch/prepare_corpus.py``).
        verify: Check every file's SHA-256 against the manifest (reads everything once).
    """

    def __init__(self, path: str | os.PathLike, verify: bool = False) -> None:
        self.path = os.fspath(path)
        manifest_path = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise CorpusError(f"{self.path}: not a corpus directory (no {MANIFEST}); build one with "
                              "python launch/prepare_corpus.py")
        try:
            with open(manifest_path, encoding="utf-8") as f:
                self.manifest: dict[str, Any] = json.load(f)
        except (OSError, ValueError) as e:  # (UnicodeDecodeError and JSONDecodeError included)
            raise CorpusError(f"{manifest_path}: unreadable manifest ({e}); rebuild the corpus") \
                from None
        if not isinstance(self.manifest, dict):
            raise CorpusError(f"{manifest_path}: not a corpus manifest (a JSON object)")
        if self.manifest.get("kind") != "corpus":
            raise CorpusError(f"{manifest_path}: kind is {self.manifest.get('kind')!r}, not 'corpus'")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise CorpusError(f"{manifest_path}: format_version {self.manifest.get('format_version')} "
                              f"is not {FORMAT_VERSION}; rebuild the corpus")
        if verify:
            self.verify()
        else:  # sizes at least (a stat per file): a truncated or grown file is caught on open
            for name, info in self.manifest.get("files", {}).items():
                path = os.path.join(self.path, name)
                if os.path.isfile(path) and os.path.getsize(path) != info["bytes"]:
                    raise CorpusError(f"{path}: {os.path.getsize(path)} bytes, the manifest says "
                                      f"{info['bytes']} (truncated or altered); rebuild the corpus")
        tok = np.dtype(self.manifest["token_dtype"])
        self._body = self._map("body_tokens.bin", tok)
        self._titles = self._map("title_tokens.bin", tok)
        self.blocks = self._map("blocks.bin", BLOCK_DTYPE)
        self.articles = self._map("articles.bin", ARTICLE_DTYPE)
        self._spans = self._map("spans.bin", SPAN_DTYPE)
        self._sentences = self._map("sentences.bin", SENTENCE_DTYPE)
        self._text = self._map("block_text.bin", np.dtype("u1"))
        self._meta: list[dict[str, str]] | None = None
        self.label_names: list[str] = list(self.manifest["label_names"])
        counts = self.manifest["counts"]
        if len(self.blocks) != counts["blocks"] or len(self.articles) != counts["articles"]:
            raise CorpusError(f"{self.path}: blocks.bin/articles.bin sizes disagree with {MANIFEST}")

    def _map(self, name: str, dtype: np.dtype) -> np.ndarray:
        path = os.path.join(self.path, name)
        if not os.path.isfile(path):
            raise CorpusError(f"{path}: missing from the corpus directory")
        size = os.path.getsize(path)
        if size % dtype.itemsize:
            raise CorpusError(f"{path}: size {size} is not a multiple of its row size {dtype.itemsize}")
        if size == 0:
            return np.zeros(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def verify(self) -> None:
        """Raise :class:`CorpusError` unless every file matches its manifest checksum."""
        for name, info in self.manifest["files"].items():
            path = os.path.join(self.path, name)
            if not os.path.isfile(path):
                raise CorpusError(f"{path}: missing from the corpus directory")
            if os.path.getsize(path) != info["bytes"] or sha256_file(path) != info["sha256"]:
                raise CorpusError(f"{path}: checksum mismatch (corrupt or truncated)")

    # -- access ---------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def tokenizer_name(self) -> str:
        return self.manifest["tokenizer"]["name"]

    def __len__(self) -> int:
        return len(self.blocks)

    def _article_meta(self) -> list[dict[str, str]]:
        if self._meta is None:
            with open(os.path.join(self.path, "articles.jsonl"), encoding="utf-8") as f:
                self._meta = [json.loads(line) for line in f]
        return self._meta

    def body_ids(self, i: int) -> np.ndarray:
        """Word-piece ids of block ``i``'s body, ``[n_tokens]`` (a read-only view)."""
        row = self.blocks[i]
        return self._body[row["tok_offset"]: row["tok_offset"] + row["n_tokens"]]

    def title_ids(self, i: int) -> np.ndarray:
        """Word-piece ids of block ``i``'s article title (a read-only view)."""
        art = self.articles[self.blocks[i]["article"]]
        return self._titles[art["title_offset"]: art["title_offset"] + art["title_len"]]

    def text(self, i: int) -> str:
        """The body text of block ``i`` (original casing, whitespace-stripped)."""
        row = self.blocks[i]
        return self._text[row["text_offset"]: row["text_offset"] + row["text_len"]].tobytes().decode("utf-8")

    def title(self, i: int) -> str:
        return self._article_meta()[int(self.blocks[i]["article"])]["title"]

    def article_id(self, i: int) -> str:
        return self._article_meta()[int(self.blocks[i]["article"])]["id"]

    def spans(self, i: int) -> np.ndarray:
        """Salient spans of block ``i``: SPAN_DTYPE rows with offsets into ``body_ids(i)``."""
        row = self.blocks[i]
        return self._spans[row["span_offset"]: row["span_offset"] + row["n_spans"]]

    def span_lengths(self) -> np.ndarray:
        """Word-piece length of every salient span in the corpus, ``[n_spans]``."""
        return (self._spans["end"].astype(np.int64) - self._spans["start"]).astype(np.int64)

    def sentences(self, i: int) -> np.ndarray:
        """Sentence pieces of block ``i``: SENTENCE_DTYPE rows with offsets into ``body_ids(i)``."""
        row = self.blocks[i]
        return self._sentences[row["sent_offset"]: row["sent_offset"] + row["n_sents"]]

    def lengths(self) -> np.ndarray:
        """Title plus body word pieces of every block, ``[n_blocks]`` (for length bucketing)."""
        title_len = self.articles["title_len"][self.blocks["article"]]
        return (self.blocks["n_tokens"] + title_len).astype(np.int64)

    def block(self, i: int) -> Block:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range [0, {len(self)})")
        return Block(
            block_id=i,
            article_id=self.article_id(i),
            title=self.title(i),
            text=self.text(i),
            title_ids=np.array(self.title_ids(i), np.int64),
            body_ids=np.array(self.body_ids(i), np.int64),
            spans=np.array(self.spans(i)),
            sentences=np.array(self.sentences(i)),
        )

    # -- export ---------------------------------------------------------------------------------

    def records(self, tokenizer: Any = None, batch_size: int = 1024):
        """One plain dict per block: ``id`` (the block id), ``article_id``, ``title``, ``text``
        and ``spans``: each salient span's ``start``/``end`` (character offsets into ``text``,
        end exclusive: ``text[start:end]`` is the span), ``label``, and ``token_start``/
        ``token_end`` (word-piece offsets into :meth:`body_ids`).

        The character offsets come from tokenizing each block's text again with the corpus's
        tokenizer (``tokenizer``, else the one its manifest names); a span whose word pieces
        that does not give back (a word cut by a block edge) has ``start``/``end`` None.
        """
        if tokenizer is None:
            tokenizer = load_tokenizer(self.tokenizer_name)
        check_tokenizer(tokenizer, self, "export")
        encoder = word_piece_encoder(tokenizer)
        names = self.label_names
        for lo in range(0, len(self), batch_size):
            ids = range(lo, min(lo + batch_size, len(self)))
            texts = [self.text(i) for i in ids]
            encodings = encoder.encode_batch(texts, add_special_tokens=False)
            for i, text, enc in zip(ids, texts, encodings):
                spans = self.spans(i)
                chars = body_char_offsets(self.body_ids(i), enc) if len(spans) else None
                out = []
                for s in spans:
                    start, end = int(s["start"]), int(s["end"])
                    c0, c1 = int(chars[start, 0]), int(chars[end - 1, 1])
                    ok = c0 >= 0 and c1 >= 0
                    out.append({"start": c0 if ok else None, "end": c1 if ok else None,
                                "label": names[int(s["label"])], "token_start": start,
                                "token_end": end})
                yield {"id": i, "article_id": self.article_id(i), "title": self.title(i),
                       "text": text, "spans": out}

    @staticmethod
    def features():
        """The ``datasets.Features`` of :meth:`records` (and of :meth:`to_dataset`)."""
        import datasets

        return datasets.Features({
            "id": datasets.Value("int64"), "article_id": datasets.Value("string"),
            "title": datasets.Value("string"), "text": datasets.Value("string"),
            "spans": [{"start": datasets.Value("int32"), "end": datasets.Value("int32"),
                       "label": datasets.Value("string"),
                       "token_start": datasets.Value("int32"),
                       "token_end": datasets.Value("int32")}]})

    def to_dataset(self, tokenizer: Any = None):
        """The blocks as a ``datasets.Dataset`` (columns of :meth:`records`), in block order."""
        import datasets

        features = self.features()
        columns: dict[str, list] = {name: [] for name in features}
        for record in self.records(tokenizer):
            for name, value in record.items():
                columns[name].append(value)
        return datasets.Dataset.from_dict(columns, features=features)

    def to_parquet(self, path: str | os.PathLike) -> str:
        """Write :meth:`to_dataset` as one Parquet file, atomically; returns its path."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            self.to_dataset().to_parquet(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def body_char_offsets(body_ids: np.ndarray, encoding) -> np.ndarray:
    """The character range of each body word piece in the block's text, ``[n_tokens, 2]``:
    from ``encoding`` (the block's text tokenized again, ``tokenizers.Encoding``), aligned to
    the stored word pieces; ``-1`` where they differ (a word cut by the block's edge is read
    as a new word).
    """
    body = [int(x) for x in body_ids]
    offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
    out = np.full((len(body), 2), -1, np.int64)
    if list(encoding.ids) == body:
        return offsets
    import difflib

    matcher = difflib.SequenceMatcher(None, body, list(encoding.ids), autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
            out[i1:i2] = offsets[j1:j2]
    return out


def check_tokenizer(tokenizer, store: "BlockStore", what: str = "retriever") -> None:
    """An encoder (the retriever unless ``what`` says otherwise) must read the word pieces the
    corpus was cut into; the error names the corpus, its tokenizer and the encoder's."""
    sha = tokenizer_sha256(tokenizer)
    want = store.manifest["tokenizer"]["sha256"]
    if sha != want:
        raise ValueError(
            f"{store.path}: the corpus was tokenized with {store.tokenizer_name!r}, which differs "
            f"from the {what}'s tokenizer {tokenizer.name_or_path!r}; rebuild the corpus with "
            f"data.tokenizer set to the {what}'s checkpoint"
        )
