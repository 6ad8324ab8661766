"""Build a corpus directory: read -> tokenize -> block -> salient spans -> block store.

The build streams (a chunk of articles at a time, spaCy fed sentence by sentence), writes into a
temporary sibling directory, and renames it into place only after the manifest is written and
everything is fsynced. An interrupted build therefore leaves no directory that claims to be
complete; a later build removes the orphaned temporary directory. A build whose inputs,
tokenizer and parameters match an existing corpus (its fingerprint) is a no-op.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import shutil
import time
import uuid
from typing import Any, Iterator, Optional

import numpy as np
from tqdm.auto import tqdm

from realm.version import __version__
from realm.cache import cache_path
from realm.config import DataConfig, SpansConfig
from realm.data.blocks import BlockedArticle, block_article, tokenizer_sha256, word_piece_encoder
from realm.data.readers import Article, CorpusReader
from realm.data.spans import SpanFinder, align_spans
from realm.data.store import FORMAT_VERSION, MANIFEST, BlockStoreWriter
from realm.fsutil import fsync_dir, pid_alive, sha256_file
from realm.hub import load_tokenizer, resolve_model_path
from realm.errors import OutputExistsError

logger = logging.getLogger(__name__)


def corpus_cache_dir(cache_dir: str, data: DataConfig, spans: SpansConfig) -> str:
    """Where the ``data`` and ``spans`` sections' corpus is built in ``cache_dir`` (the key:
    both sections), by every stage that prepares it (``realm.training.prepare``)."""
    return cache_path(cache_dir, "corpus", [dataclasses.asdict(data), dataclasses.asdict(spans)])


# ---------------------------------------------------------------------------------------------
# Fingerprints


def input_fingerprint(path: str) -> dict[str, Any]:
    """Content hash of a corpus input (file, or every file of a directory); hub names as is."""
    if path.startswith("hf:"):
        return {"hub": path}
    if os.path.isfile(path):
        return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
    sha = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            sha.update(os.path.relpath(full, path).encode())
            sha.update(sha256_file(full).encode())
    return {"sha256": sha.hexdigest()}


def _spacy_version(model: str) -> Optional[str]:
    try:
        return importlib.metadata.version(model.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None


def build_fingerprint(data: DataConfig, spans: SpansConfig, input_fp: dict,
                      tokenizer_sha: str) -> str:
    """What the output depends on: inputs, tokenizer, and the parameters that change it."""
    params = dataclasses.asdict(data)
    for key in ("input", "tokenizer", "chunk_articles"):  # content-hashed or output-neutral
        params.pop(key)
    if spans.enabled:
        span_params = dataclasses.asdict(spans)
        span_params.pop("batch_size")
        span_params.pop("n_process")
        span_params["spacy_version"] = _spacy_version(spans.spacy_model)
    else:
        span_params = {"enabled": False}
    blob = json.dumps(
        {"format_version": FORMAT_VERSION, "input": input_fp, "tokenizer": tokenizer_sha,
         "data": params, "spans": span_params},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Output directory handling


def clean_orphans(output: str) -> list[str]:
    """Remove temporary build directories of ``output`` left by builds that died."""
    parent, name = os.path.split(os.path.abspath(output))
    removed = []
    if not os.path.isdir(parent):
        return removed
    prefix = f".{name}.tmp-"
    for entry in os.listdir(parent):
        if not entry.startswith(prefix):
            continue
        try:
            pid = int(entry[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if not pid_alive(pid):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(entry)
            logger.warning("removed %s, left by an interrupted build", os.path.join(parent, entry))
    return removed


def _existing_manifest(output: str) -> Optional[dict[str, Any]]:
    if not os.path.exists(output):
        return None
    if not os.path.isdir(output):
        raise OutputExistsError(f"{output}: exists and is not a directory")
    manifest = os.path.join(output, MANIFEST)
    if not os.path.isfile(manifest):
        if os.listdir(output):
            raise OutputExistsError(f"{output}: exists, is not empty, and is not a corpus directory")
        return None
    with open(manifest, encoding="utf-8") as f:
        return json.load(f)


def _commit(tmp: str, output: str) -> None:
    """Move the finished build into place (replacing an old corpus only when asked to)."""
    parent = os.path.dirname(os.path.abspath(output))
    old = None
    if os.path.isdir(output):
        if os.listdir(output):
            old = f"{tmp}-old"
            os.rename(output, old)
        else:
            os.rmdir(output)
    os.rename(tmp, output)
    fsync_dir(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass
class _Pending:
    """An article whose sentences are still in spaCy."""

    article: Article
    blocked: BlockedArticle
    remaining: int
    spans: list = dataclasses.field(default_factory=list)


def build_corpus(
    data: DataConfig,
    spans: SpansConfig,
    output: str,
    overwrite: bool = False,
    config_yaml: Optional[str] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or reuse) the corpus directory ``output``.

    Args:
        data: Reading and blocking parameters (``data.input`` is the corpus to read).
        spans: Salient-span parameters.
        output: Corpus directory to create.
        overwrite: Replace an existing corpus built from other inputs or parameters.
        config_yaml: The resolved run config, saved as ``config.yaml`` in the corpus.
        progress: Show a progress bar.

    Returns:
        The summary: counts (articles, blocks, spans, skipped records), seconds, fingerprint,
        and ``reused`` (true when an identical corpus already existed).

    Raises:
        CorpusFormatError: Bad input (names file and line) with ``on_bad_record=error``.
        OutputExistsError: ``output`` holds something else and ``overwrite`` is false.
    """
    t_start = time.perf_counter()
    if not data.input:
        raise ValueError("data.input: no corpus given (use --input PATH or data.input=PATH)")
    reader = CorpusReader(data.input, data.format, data.on_bad_record, data.min_text_chars,
                          data.max_articles)
    tokenizer = load_tokenizer(data.tokenizer)
    backend = word_piece_encoder(tokenizer)
    tokenizer_sha = tokenizer_sha256(tokenizer)
    fingerprint = build_fingerprint(data, spans, input_fingerprint(reader.path), tokenizer_sha)

    output = os.path.abspath(output)
    existing = _existing_manifest(output)
    if existing is not None:
        if existing.get("fingerprint") == fingerprint:
            logger.info("%s already holds this corpus (fingerprint %s); nothing to do", output, fingerprint)
            return _summary(existing, output, reused=True, seconds=time.perf_counter() - t_start)
        if not overwrite:
            raise OutputExistsError(
                f"{output}: holds a corpus built from other inputs or parameters (fingerprint "
                f"{existing.get('fingerprint')}, this build {fingerprint}); choose another output "
                "or pass --overwrite"
            )
    clean_orphans(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    tmp = os.path.join(os.path.dirname(output),
                       f".{os.path.basename(output)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        writer = BlockStoreWriter(tmp, tokenizer.vocab_size)
        counts, timings = _run_pipeline(reader, backend, data, spans, writer, progress)
        files = writer.close()
        if writer.n_blocks == 0:
            raise ValueError(f"{reader.path}: no blocks were produced (every record was skipped)")
        manifest = {
            "kind": "corpus",
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "realm_version": __version__,
            "input": {"path": reader.path, "format": reader.format, **input_fingerprint(reader.path)},
            "tokenizer": {"name": data.tokenizer, "path": resolve_model_path(data.tokenizer),
                          "vocab_size": tokenizer.vocab_size, "sha256": tokenizer_sha},
            "token_dtype": writer.token_dtype.str,
            "params": {"data": dataclasses.asdict(data), "spans": dataclasses.asdict(spans)},
            "label_names": writer.label_names,
            "counts": {
                "records": reader.stats.records,
                "articles": writer.n_articles,
                "blocks": writer.n_blocks,
                "tokens": writer.n_tokens,
                "spans": writer.n_spans,
                "spans_by_label": dict(sorted(writer.label_counts.items(), key=lambda kv: -kv[1])),
                "sentences": counts["sentences"],
                "block_sentences": writer.n_sentences,
                "spans_dropped_misaligned": counts["misaligned"],
                "skipped_bad": reader.stats.skipped_bad,
                "skipped_short": reader.stats.skipped_short,
                "skipped_no_tokens": counts["no_tokens"],
            },
            "bad_records": reader.stats.bad_examples,
            "timings": {**timings, "total_s": round(time.perf_counter() - t_start, 3)},
            "files": files,
        }
        if config_yaml is not None:
            with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(config_yaml)
        manifest_tmp = os.path.join(tmp, MANIFEST + ".tmp")
        with open(manifest_tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(manifest_tmp, os.path.join(tmp, MANIFEST))
        fsync_dir(tmp)
        _commit(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if reader.stats.skipped_bad:
        logger.warning("%d bad records were skipped (see bad_records in %s)",
                       reader.stats.skipped_bad, os.path.join(output, MANIFEST))
    return _summary(manifest, output, reused=False, seconds=time.perf_counter() - t_start)


def _summary(manifest: dict[str, Any], output: str, reused: bool, seconds: float) -> dict[str, Any]:
    c = manifest["counts"]
    return {
        "output": output,
        "fingerprint": manifest["fingerprint"],
        "reused": reused,
        "records": c["records"],
        "articles": c["articles"],
        "blocks": c["blocks"],
        "tokens": c["tokens"],
        "spans": c["spans"],
        "spans_by_label": c["spans_by_label"],
        "skipped_bad": c["skipped_bad"],
        "skipped_short": c["skipped_short"],
        "skipped_no_tokens": c["skipped_no_tokens"],
        "seconds": round(seconds, 3),
    }


def _run_pipeline(reader, backend, data: DataConfig, spans_cfg: SpansConfig,
                  writer: BlockStoreWriter, progress: bool,
                  ) -> tuple[collections.Counter, dict[str, float]]:
    counts = collections.Counter()
    timings = collections.Counter()
    bar = tqdm(unit=" articles", desc="prepare_corpus", disable=not progress, mininterval=1.0,
               smoothing=0.05)

    finder = (SpanFinder(spans_cfg.spacy_model, spans_cfg.keeps, spans_cfg.date_regex,
                         spans_cfg.batch_size, spans_cfg.n_process) if spans_cfg.enabled else None)
    max_chars = finder.max_chars if finder is not None else None

    def too_long(article: Article, blocked: BlockedArticle) -> bool:
        """A sentence longer than spaCy reads is a bad record (named, or skipped)."""
        longest = max((int(e - s) for s, e in blocked.sentences), default=0)
        if max_chars is None or longest <= max_chars:
            return False
        reader.reject(f"{article.where}: a sentence of {longest} characters, longer than the "
                      f"{max_chars} spaCy reads (spans.spacy_model={spans_cfg.spacy_model})")
        return True

    def blocked_articles() -> Iterator[tuple[Article, BlockedArticle]]:
        articles = iter(reader)
        while True:
            t0 = time.perf_counter()
            chunk = list(itertools.islice(articles, data.chunk_articles))
            if bar.total is None and reader.total:  # known once the reader has started
                bar.total = reader.total
                bar.refresh()
            if not chunk:
                return
            t1 = time.perf_counter()
            texts = backend.encode_batch([a.text for a in chunk], add_special_tokens=False)
            titles = backend.encode_batch([a.title for a in chunk], add_special_tokens=False)
            out = []
            for article, enc, title in zip(chunk, texts, titles):
                blocked = block_article(article.text, np.asarray(title.ids, np.int64),
                                        np.asarray(enc.ids, np.int64),
                                        np.asarray(enc.offsets, np.int64).reshape(-1, 2),
                                        data.max_block_tokens)
                if len(blocked.block_tokens) == 0:
                    counts["no_tokens"] += 1
                    logger.warning("%s: text has no word pieces; skipped", article.where)
                    continue
                if too_long(article, blocked):
                    continue
                counts["sentences"] += len(blocked.sentences)
                out.append((article, blocked))
            t2 = time.perf_counter()
            timings["read_s"] += t1 - t0
            timings["tokenize_block_s"] += t2 - t1
            yield from out

    def finish(article: Article, blocked: BlockedArticle, found: list) -> None:
        t0 = time.perf_counter()
        aligned, dropped = align_spans(found, blocked.token_starts, blocked.token_ends,
                                       blocked.block_tokens)
        counts["misaligned"] += dropped
        writer.add_article(article.id, article.title, blocked.title_ids, article.text,
                           blocked.token_ids, blocked.block_tokens, blocked.block_chars, aligned,
                           blocked.sentence_tokens)
        timings["write_s"] += time.perf_counter() - t0
        bar.update(1)

    t_all = time.perf_counter()
    if not spans_cfg.enabled:
        for article, blocked in blocked_articles():
            finish(article, blocked, [])
    else:
        pending: dict[int, _Pending] = {}
        order: collections.deque[int] = collections.deque()

        def sentences() -> Iterator[tuple[str, tuple[int, int]]]:
            for seq, (article, blocked) in enumerate(blocked_articles()):
                pending[seq] = _Pending(article, blocked, len(blocked.sentences))
                order.append(seq)
                for start, end in blocked.sentences:
                    yield article.text[start:end], (seq, int(start))

        for found, (seq, offset) in finder.pipe(sentences()):
            entry = pending[seq]
            entry.spans.extend((s + offset, e + offset, label) for s, e, label in found)
            entry.remaining -= 1
            while order and pending[order[0]].remaining == 0:
                done = pending.pop(order.popleft())
                finish(done.article, done.blocked, done.spans)
        if pending:  # spaCy returned fewer docs than it was given: a bug somewhere, not data
            raise RuntimeError(f"{len(pending)} articles never came back from spaCy")
    bar.close()
    total = time.perf_counter() - t_all
    timings["ner_s"] = max(0.0, total - sum(timings.values())) if spans_cfg.enabled else 0.0
    return counts, {k: round(v, 3) for k, v in timings.items()}
