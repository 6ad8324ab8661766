"""Data for the "proof that it learns" experiment: masked examples X whose facts live in Z.

X are the Wikipedia lead sections (``vital_level4_summaries_en.jsonl``) whose titles also name an
article of the early-2015 dump (``enwiki2015_first30k_articles.jsonl.gz``); Z are the first
``z_chars`` characters of those 2015 articles: another version of the same facts, not the text X
was cut from. A retriever trained from the MLM signal alone should learn to fetch, for a masked
lead sentence, the 2015 article with the same title.

:func:`build_signal` writes, under one output directory::

    sources/x_train.jsonl, sources/x_heldout.jsonl, sources/z.jsonl   the records of each corpus
    x_train/      lead sections of the training titles (corpus directory, with salient spans)
    x_heldout/    lead sections of ``heldout`` other titles (queries for same-title recall)
    z/            the cut 2015 articles of every matched title (the knowledge corpus, no spans)
    manifest.json written last: its presence means all three corpora are complete

Titles match after :func:`title_key`: Unicode NFC, whitespace (and ``_``) collapsed, and the
first letter of each word case-folded. Wikipedia titles are case-sensitive past their first
letter, and between versions a title often changes only in the capitals of its words
(``Scientific revolution`` / ``Scientific Revolution``); a case difference inside a word is
another article (``MUMPS``, the language, is not ``Mumps``, the disease).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import time
import unicodedata
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from realm import __version__
from realm.config import DataConfig, SpansConfig
from realm.data.blocks import split_sentences
from realm.data.build import OutputExistsError, build_corpus, input_fingerprint
from realm.data.readers import Article, CorpusReader
from realm.data.store import MANIFEST, BlockStore
from realm.fsutil import fsync_dir

logger = logging.getLogger(__name__)

CORPORA = ("x_train", "x_heldout", "z")
SIGNAL_KIND = "wiki_signal"
SIGNAL_VERSION = 1

#: A disambiguation page: its first line ends "... may refer to:" (or "most commonly refers to:").
_DISAMBIGUATION = re.compile(r"\brefers? to:?\s*$")
#: WikiExtractor keeps section headings as short lines ending in a period ("Etymology.").
_HEADING_MAX_WORDS = 4


def title_key(title: str) -> str:
    """The key two Wikipedia titles are matched by (see the module docstring).

    >>> title_key("Scientific  Revolution") == title_key("Scientific_revolution")
    True
    >>> title_key("MUMPS") == title_key("Mumps")
    False
    """
    words = unicodedata.normalize("NFC", title).replace("_", " ").split()
    return " ".join(w[:1].casefold() + w[1:] for w in words)


def _is_heading(line: str) -> bool:
    line = line.strip()
    return (line.endswith(".") and line.count(".") == 1 and len(line.split()) <= _HEADING_MAX_WORDS
            and not line[:1].islower())


def cut_text(text: str, max_chars: int) -> str:
    """The beginning of ``text``, at most ``max_chars`` characters, cut at a boundary.

    The cut falls at the end of the last paragraph that fits when that keeps at least half of
    ``max_chars``, else at the end of the last sentence that fits (sentences as
    :func:`realm.data.blocks.split_sentences` finds them), else (a first sentence longer than
    the limit) at the last space. Section headings left dangling at the end are dropped.

    Returns:
        A prefix of ``text.strip()``, stripped; ``""`` when nothing fits.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    text = text.strip()
    if len(text) > max_chars:
        ends = [e for _, e in split_sentences(text) if e <= max_chars]
        paragraph_ends = [e for e in ends if not text[e:].split("\n", 1)[0].strip()]
        if paragraph_ends and paragraph_ends[-1] >= max_chars // 2:
            cut = paragraph_ends[-1]
        elif ends:
            cut = ends[-1]
        else:
            cut = max(text.rfind(" ", 0, max_chars + 1), 0)
        text = text[:cut].rstrip()
    lines = text.split("\n")
    while len(lines) > 1 and _is_heading(lines[-1]):
        lines.pop()
    return "\n".join(lines).rstrip()


@dataclasses.dataclass
class MatchStats:
    """What matching the two files saw (all counts; reported in the manifest and summary)."""

    leads: int = 0
    leads_duplicate_titles: int = 0
    articles_read: int = 0
    articles_bad_or_empty: int = 0
    articles_duplicate_titles: int = 0
    matched_titles: int = 0
    dropped_disambiguation: int = 0
    dropped_short: int = 0


def read_leads(path: str) -> tuple[dict[str, Article], MatchStats]:
    """Lead sections by :func:`title_key` (the first of duplicate keys kept, the rest counted)."""
    stats = MatchStats()
    leads: dict[str, Article] = {}
    for article in CorpusReader(path, on_bad_record="error"):
        stats.leads += 1
        key = title_key(article.title)
        if key in leads:
            stats.leads_duplicate_titles += 1
            logger.warning("%s: title %r repeats an earlier lead; kept the first", article.where,
                           article.title)
            continue
        leads[key] = article
    return leads, stats


def match_articles(leads: dict[str, Article], articles_path: str, z_chars: int, min_z_chars: int,
                   stats: MatchStats, progress: bool = True) -> dict[str, Article]:
    """Stream the articles file and keep, per lead title, the first article's cut text.

    Only cut texts are kept, so memory is bounded by ``len(leads) * z_chars``. Empty and
    malformed records are skipped and counted (Wikipedia dumps hold a few empty articles);
    disambiguation pages and texts shorter than ``min_z_chars`` after the cut are dropped and
    counted.

    Returns:
        ``{title_key: Article(text=cut text)}`` in the articles file's order.
    """
    reader = CorpusReader(articles_path, on_bad_record="skip")
    matched: dict[str, Article] = {}
    seen: set[str] = set()
    bar = tqdm(reader, unit=" articles", desc="match titles", disable=not progress, mininterval=1.0)
    for article in bar:
        key = title_key(article.title)
        if key not in leads:
            continue
        if key in seen:
            stats.articles_duplicate_titles += 1
            continue
        seen.add(key)
        if _DISAMBIGUATION.search(article.text.strip().split("\n", 1)[0]):
            stats.dropped_disambiguation += 1
            continue
        text = cut_text(article.text, z_chars)
        if len(text) < min_z_chars:
            stats.dropped_short += 1
            continue
        matched[key] = dataclasses.replace(article, text=text)
    bar.close()
    stats.articles_read = reader.stats.records
    stats.articles_bad_or_empty = reader.stats.skipped_bad + reader.stats.skipped_short
    stats.matched_titles = len(matched)
    logger.info("%d of %d lead titles matched an article of %s (%d disambiguation pages and %d "
                "short texts dropped)", len(matched), len(leads), articles_path,
                stats.dropped_disambiguation, stats.dropped_short)
    return matched


def split_titles(keys: list[str], heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """A fixed random split of title keys into (train, held-out); independent of input order."""
    keys = sorted(set(keys))
    if not 0 < heldout < len(keys):
        raise ValueError(f"heldout must be in [1, {len(keys) - 1}] for {len(keys)} matched "
                         f"titles, got {heldout}")
    perm = np.random.default_rng(seed).permutation(len(keys))
    held = {keys[i] for i in perm[:heldout]}
    return [k for k in keys if k not in held], [k for k in keys if k in held]


def _write_jsonl(path: str, articles: list[Article]) -> None:
    """Write records atomically (temp file, fsync, rename): a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for a in articles:
            f.write(json.dumps({"id": a.id, "title": a.title, "text": a.text}, ensure_ascii=False))
            f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: str, obj: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def build_signal(
    leads_path: str,
    articles_path: str,
    output: str,
    data: DataConfig,
    spans: SpansConfig,
    heldout: int = 200,
    z_chars: int = 2000,
    min_z_chars: int = 200,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    span_max_articles: int | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the experiment's three corpora under ``output``.

    Args:
        leads_path: Lead sections (any corpus format with ``title``, ``text``).
        articles_path: The other version's articles (``.jsonl.gz`` streamed).
        output: Directory to create (``x_train/``, ``x_heldout/``, ``z/``, ``manifest.json``).
        data: Blocking parameters of all three corpora (``tokenizer``, ``max_block_tokens``,
            ``chunk_articles``); ``data.input`` is ignored.
        spans: Salient spans of the X corpora (Z never has spans).
        heldout: Matched titles held out of training (their leads form ``x_heldout``).
        z_chars: Most characters of an article kept in Z.
        min_z_chars: Matched titles whose cut text is shorter are dropped.
        seed: Seed of the train/held-out split.
        overwrite: Replace corpora built with other inputs or parameters.
        progress: Progress bars.
        span_max_articles: Keep only the X spans that the same title's Z article holds and that
            at most this many Z articles hold (:class:`SameTitleSpans`); None keeps every span.

    Returns:
        The summary: counts (matched titles, train/held-out, blocks and spans per corpus),
        ``reused`` and seconds.

    Raises:
        CorpusFormatError: A bad lead record, or an unreadable file (names file and line).
        OutputExistsError: ``output`` holds another build and ``overwrite`` is false.
        ValueError: Bad parameters, or too few matched titles for ``heldout``.
    """
    t0 = time.perf_counter()
    if z_chars < 1 or min_z_chars < 0 or min_z_chars > z_chars:
        raise ValueError(f"need 0 <= min_z_chars <= z_chars and z_chars >= 1, got z_chars="
                         f"{z_chars}, min_z_chars={min_z_chars}")
    if span_max_articles is not None and span_max_articles < 1:
        raise ValueError(f"span_max_articles must be >= 1 or None, got {span_max_articles}")
    params = {"heldout": heldout, "z_chars": z_chars, "min_z_chars": min_z_chars, "seed": seed}
    if span_max_articles is not None:  # (absent when None: earlier builds keep their fingerprint)
        params["span_max_articles"] = span_max_articles
    data_params = {k: v for k, v in dataclasses.asdict(data).items()
                   if k not in ("input", "chunk_articles")}
    span_params = ({k: v for k, v in dataclasses.asdict(spans).items()
                    if k not in ("batch_size", "n_process")} if spans.enabled else {"enabled": False})
    inputs = {"leads": {"path": os.path.abspath(leads_path), **input_fingerprint(leads_path)},
              "articles": {"path": os.path.abspath(articles_path), **input_fingerprint(articles_path)}}
    blob = json.dumps({"version": SIGNAL_VERSION, "params": params, "data": data_params,
                       "spans": span_params,
                       "inputs": {k: v["sha256"] for k, v in inputs.items()}}, sort_keys=True)
    fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:32]

    output = os.path.abspath(output)
    manifest_path = os.path.join(output, MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            existing = json.load(f)
        if existing.get("fingerprint") == fingerprint:
            logger.info("%s already holds this build (fingerprint %s); nothing to do", output,
                        fingerprint)
            return _summary(existing, output, reused=True, seconds=time.perf_counter() - t0)
        if not overwrite:
            raise OutputExistsError(
                f"{output}: holds a {existing.get('kind')} build from other inputs or parameters "
                f"(fingerprint {existing.get('fingerprint')}, this build {fingerprint}); choose "
                "another output or pass --overwrite")
        os.remove(manifest_path)  # from here on the directory no longer claims to be complete
    elif os.path.isdir(output) and set(os.listdir(output)) - {"sources", *CORPORA}:
        raise OutputExistsError(f"{output}: exists and holds files other than a wiki-signal build")

    leads, stats = read_leads(leads_path)
    matched = match_articles(leads, articles_path, z_chars, min_z_chars, stats, progress)
    train_keys, held_keys = split_titles(list(matched), heldout, seed)
    train_set, held_set = set(train_keys), set(held_keys)
    records = {
        "x_train": [a for k, a in leads.items() if k in train_set],  # lead-file order
        "x_heldout": [a for k, a in leads.items() if k in held_set],
        "z": list(matched.values()),  # article-file order
    }
    sources = os.path.join(output, "sources")
    os.makedirs(sources, exist_ok=True)
    corpora = {}
    span_filter = None
    for name in ("z", "x_train", "x_heldout"):  # Z first: the span filter of X reads it
        path = os.path.join(sources, f"{name}.jsonl")
        _write_jsonl(path, records[name])
        logger.info("building %s/%s from %d records", output, name, len(records[name]))
        corpus_data = dataclasses.replace(data, input=path, format="jsonl", max_articles=None,
                                          min_text_chars=1, on_bad_record="error")
        corpus_spans = spans if name != "z" else dataclasses.replace(spans, enabled=False)
        corpora[name] = build_corpus(corpus_data, corpus_spans, os.path.join(output, name),
                                     overwrite=overwrite, progress=progress,
                                     span_filter=span_filter)
        if name == "z" and span_max_articles is not None and spans.enabled:
            logger.info("indexing the word-piece runs of %s/z for the span filter", output)
            span_filter = SameTitleSpans(BlockStore(os.path.join(output, "z")), span_max_articles)

    manifest = {
        "kind": SIGNAL_KIND,
        "version": SIGNAL_VERSION,
        "fingerprint": fingerprint,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "realm_version": __version__,
        "inputs": inputs,
        "params": {**params, "data": data_params, "spans": span_params},
        "title_match": "title_key: NFC, whitespace collapsed, first letter of each word case-folded",
        "counts": {**dataclasses.asdict(stats), "train_titles": len(train_keys),
                   "heldout_titles": len(held_keys)},
        "corpora": {name: {k: s[k] for k in ("fingerprint", "articles", "blocks", "tokens", "spans",
                                             "spans_filtered_out")}
                    for name, s in corpora.items()},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _write_json(manifest_path, manifest)
    return _summary(manifest, output, reused=False, seconds=time.perf_counter() - t0)


def _summary(manifest: dict[str, Any], output: str, reused: bool, seconds: float) -> dict[str, Any]:
    c, corpora = manifest["counts"], manifest["corpora"]
    summary: dict[str, Any] = {
        "output": output,
        "reused": reused,
        "leads": c["leads"],
        "articles_read": c["articles_read"],
        "matched_titles": c["matched_titles"],
        "dropped_disambiguation": c["dropped_disambiguation"],
        "dropped_short": c["dropped_short"],
        "train_titles": c["train_titles"],
        "heldout_titles": c["heldout_titles"],
    }
    for name in CORPORA:
        summary[f"{name}_blocks"] = corpora[name]["blocks"]
    for name in CORPORA[:2]:
        summary[f"{name}_spans"] = corpora[name]["spans"]
        summary[f"{name}_spans_filtered_out"] = corpora[name].get("spans_filtered_out", 0)
    summary["z_blocks_per_article"] = round(corpora["z"]["blocks"] / corpora["z"]["articles"], 3)
    summary["seconds"] = round(seconds, 3)
    return summary



class SpanArticles:
    """Which articles of a corpus hold a given run of word pieces, for runs up to ``max_len``.

    Every run of 1..``max_len`` word pieces inside an article's title or within its body (blocks
    of one article are contiguous, so runs cross block boundaries but never articles) is hashed
    (64-bit polynomial, wrapping) and kept with its article, once per (hash, article). A lookup
    is a binary search.

    Args:
        store: The corpus (Z).
        max_len: Longest run indexed; longer runs are never found.
    """

    _MULT = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, store: BlockStore, max_len: int = 16) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        arts = np.asarray(store.articles)
        segments = []  # the token runs of every article's title and body, and their article
        for a, art in enumerate(arts):
            first, n = int(art["first_block"]), int(art["n_blocks"])
            segments.append((np.concatenate([store.body_ids(b) for b in range(first, first + n)]), a))
            segments.append((np.asarray(store.title_ids(first)), a))
        lengths = np.array([len(seg) for seg, _ in segments], np.int64)
        tokens = np.concatenate([seg for seg, _ in segments]).astype(np.uint64) + np.uint64(1)
        owner = np.repeat([a for _, a in segments], lengths)
        seg_end = np.repeat(np.cumsum(lengths), lengths)  # where each token's segment ends
        keys, arts_out = [], []
        h = np.zeros(len(tokens), np.uint64)
        positions = np.arange(len(tokens))
        with np.errstate(over="ignore"):
            for n in range(1, max_len + 1):
                valid = positions + n <= seg_end
                if not valid.any():
                    break
                shifted = np.zeros(len(tokens), np.uint64)
                shifted[: len(tokens) - n + 1] = tokens[n - 1:]
                h = h * self._MULT + shifted
                keys.append(h[valid] ^ np.uint64(n))
                arts_out.append(owner[valid])
        keys_all = np.concatenate(keys)
        arts_all = np.concatenate(arts_out)
        order = np.lexsort((arts_all, keys_all))
        keys_all, arts_all = keys_all[order], arts_all[order]
        first_of_pair = np.ones(len(keys_all), bool)
        first_of_pair[1:] = (keys_all[1:] != keys_all[:-1]) | (arts_all[1:] != arts_all[:-1])
        self.keys = keys_all[first_of_pair]
        self.article_ids = arts_all[first_of_pair].astype(np.int32)

    def _hash(self, tokens: np.ndarray) -> np.uint64:
        h = np.uint64(0)
        with np.errstate(over="ignore"):
            for t in np.asarray(tokens, np.uint64) + np.uint64(1):
                h = h * self._MULT + t
        return h ^ np.uint64(len(tokens))

    def articles(self, tokens: np.ndarray) -> np.ndarray:
        """Ids of the articles holding ``tokens`` (sorted; empty when none, or too long)."""
        if not 0 < len(tokens) <= self.max_len:
            return np.zeros(0, np.int32)
        key = self._hash(tokens)
        lo, hi = np.searchsorted(self.keys, key, side="left"), np.searchsorted(self.keys, key, side="right")
        return self.article_ids[lo:hi]


class SameTitleSpans:
    """A span filter for X (:class:`realm.data.build.SpanFilter`): keep a salient span only when
    the Z article of the same title holds it (so retrieving that article can fill it in) and at
    most ``max_articles`` Z articles do (so retrieving just any article cannot).

    Args:
        z: The knowledge corpus.
        max_articles: Most Z articles that may hold a kept span.
        max_len: Longest span that can be kept (in word pieces).
    """

    def __init__(self, z: BlockStore, max_articles: int, max_len: int = 16) -> None:
        if max_articles < 1:
            raise ValueError(f"max_articles must be >= 1, got {max_articles}")
        self.index = SpanArticles(z, max_len)
        self.max_articles = max_articles
        firsts = np.asarray(z.articles["first_block"])
        self.article_of = {title_key(z.title(int(b))): a for a, b in enumerate(firsts)}
        self.key = f"same_title:max_articles={max_articles}:max_len={max_len}:z={z.fingerprint}"

    def keep(self, title: str, tokens: np.ndarray) -> bool:
        article = self.article_of.get(title_key(title))
        if article is None:
            return False
        holders = self.index.articles(tokens)  # sorted
        return len(holders) <= self.max_articles and article in holders
