"""Saved model directories: one writer and one reader for every kind realm saves.

A saved directory (retriever, knowledge-augmented encoder, span reader, Open-QA model) is built
in a temp directory beside its target and renamed into place (:class:`atomic_directory`); its
``README.md`` model card and then its ``manifest.json`` are written last (:func:`write_manifest`:
kind, format version, the model's fields and its base model as a Hub id, creation time, realm
version, every file's size), and :func:`read_manifest` checks kind and sizes on load.
:func:`record_evaluation` adds an evaluation's figures to a saved directory (manifest and card).
:func:`resolve_artifact` tells which kind a directory holds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from realm.cards import CARD, model_card, write_model_card
from realm.fsutil import fsync_dir
from realm.hub import base_model
from realm.version import __version__

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
#: Manifest keys that are not the model's own fields.
_BOOKKEEPING = ("kind", "format_version", "created", "realm_version", "metadata", "files")


def resolve_artifact(path: str | os.PathLike, kind: str) -> Path:
    """``path`` as a saved directory of ``kind`` (its manifest checked), or a clear error.

    Raises:
        FileNotFoundError: ``path`` is not a directory or has no manifest.
        ValueError: the manifest names another kind, or a listed file is missing or resized.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory (expected a saved {kind})")
    read_manifest(directory, kind)
    return directory


def read_manifest(directory: str | os.PathLike, kind: str) -> dict[str, Any]:
    """Read and check a saved model directory's manifest (kind and listed file sizes).

    Args:
        directory: A directory written by ``save_pretrained``.
        kind: The manifest kind expected (``"retriever"``, ``"knowledge_augmented_encoder"``, ...).
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {MANIFEST}: not a saved {kind}")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("kind") != kind:
        raise ValueError(f"{path}: kind is {manifest.get('kind')!r}, expected {kind!r}")
    for rel, size in manifest.get("files", {}).items():
        file = directory / rel
        if not file.is_file():
            raise ValueError(f"{directory}: {rel} is listed in {MANIFEST} but missing")
        if file.stat().st_size != size:
            raise ValueError(
                f"{directory}: {rel} has {file.stat().st_size} bytes, manifest says {size}"
            )
    return manifest


def save_tokenizer(tokenizer: Any, directory: Path) -> Optional[str]:
    """Save ``tokenizer`` (if any) under ``directory`` (its manifest entry, returned) and at the
    directory's top too, so that ``AutoTokenizer.from_pretrained(directory)`` loads it."""
    if tokenizer is None:
        return None
    tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    tokenizer.save_pretrained(str(directory))
    return TOKENIZER_DIR


def load_saved_tokenizer(directory: Path, manifest: dict[str, Any]) -> Any:
    """The tokenizer a saved model directory holds, or None when it was saved without one."""
    if not manifest.get("tokenizer"):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory / manifest["tokenizer"]))


def write_manifest(
    directory: Path,
    kind: str,
    format_version: int,
    fields: dict[str, Any],
    metadata: Optional[dict[str, Any]],
) -> None:
    """Write ``README.md`` (the model card) and then ``manifest.json`` last into a model directory
    being built: kind and format, the model's own ``fields`` and ``base_model`` (the Hub id it
    started from, :func:`realm.hub.base_model`: from ``base_checkpoint``, or an Open-QA model's
    ``reader_source`` / ``generator_source``), then creation time, realm version, metadata and
    every file's size."""
    source = next((fields[k] for k in ("base_checkpoint", "reader_source", "generator_source")
                   if fields.get(k)), None)
    fields = {**fields, "base_model": base_model(source)}
    write_model_card(directory, kind, fields, metadata)
    manifest = {
        "kind": kind,
        "format_version": format_version,
        **fields,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "realm_version": __version__,
        "metadata": metadata or {},
        "files": _file_sizes(directory),
    }
    write_json(directory / MANIFEST, manifest)


def record_evaluation(directory: str | os.PathLike, metrics: dict[str, Any],
                      dataset: Optional[str], split: str = "dev",
                      task: str = "question-answering") -> dict[str, Any]:
    """Add an evaluation's figures to a saved model directory: its manifest's
    ``metadata["evaluation"]`` (replacing an earlier one of the same ``dataset`` and ``split``)
    and its card (``## Evaluation`` and the metadata's ``model-index``, rewritten from the
    manifest); returns the new manifest. Both files are replaced atomically.

    Args:
        directory: A directory :func:`write_manifest` wrote.
        metrics: Name -> value (``exact_match``, ``f1``, ``answer_recall@5``...); non-numbers
            are left out.
        dataset: The questions read (a file path or a Hub id).
        split: ``dev``, ``test``...
        task: The Hub task type of the figures.
    """
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    meta = dict(manifest.get("metadata") or {})
    entry = {"task": task, "dataset": dataset, "split": split,
             "metrics": {k: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)}}
    meta["evaluation"] = [e for e in meta.get("evaluation", [])
                          if (e.get("dataset"), e.get("split")) != (dataset, split)] + [entry]
    manifest["metadata"] = meta
    return rewrite_manifest(directory, manifest)


def rewrite_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """Replace a saved directory's ``manifest.json`` with ``manifest`` and its card with the one
    that manifest gives (the card's size updated in the manifest); both atomically. Returns the
    manifest written."""
    directory = Path(directory)
    fields = {k: v for k, v in manifest.items() if k not in _BOOKKEEPING}
    _replace_text(directory / CARD, model_card(manifest["kind"], fields, manifest.get("metadata")))
    manifest = {**manifest, "files": {**manifest.get("files", {}),
                                      CARD: (directory / CARD).stat().st_size}}
    _replace_text(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _replace_text(path: Path, text: str) -> None:
    """Write ``path`` by renaming a complete temp file over it (never through a link: a model in
    the Hub cache is a tree of links into shared blobs)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _file_sizes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to stable storage."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


class atomic_directory:
    """Context manager: yields a temp dir beside ``target``; on success renames it into place."""

    def __init__(self, target: Path, overwrite: bool = False):
        self.target = Path(target)
        self.overwrite = overwrite
        self.tmp: Optional[Path] = None

    def __enter__(self) -> Path:
        if self.target.exists() and not self.overwrite:
            raise FileExistsError(f"{self.target} exists (pass overwrite=True to replace it)")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        suffix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{suffix}"
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            logger.warning("writing %s failed; removing %s", self.target, self.tmp)
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            _fsync_tree(self.tmp)
            if self.target.exists():
                old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(self.target, old)
                try:
                    os.rename(self.tmp, self.target)
                except BaseException:
                    os.rename(old, self.target)  # put the previous version back
                    raise
                shutil.rmtree(old)
            else:
                os.rename(self.tmp, self.target)
            fsync_dir(self.target.parent)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
