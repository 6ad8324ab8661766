"""Publishing to the Hugging Face Hub: a corpus as a datasets repository, and a model directory
with the corpus it names.

A corpus repository (:func:`export_corpus`) holds the blocks as Parquet shards
(``data/train-*.parquet``, the columns of :meth:`realm.data.store.BlockStore.records`, which
``datasets.load_dataset`` reads through the card's ``configs``) and, beside them, the realm block
store itself (``manifest.json``, ``*.bin``, ``articles.jsonl``) that ``BlockStore`` and a saved
Open-QA model open. A model repository (:func:`stage_model`) is the model directory as realm
wrote it; an Open-QA model's manifest names its corpus (``corpus.name``) as a Hub datasets
repository or a path relative to the model (``corpus/`` when bundled), so that
``OpenQA.from_pretrained`` on the downloaded model finds it (:func:`realm.hub.locate_corpus`)::

    python launch/push_to_hub.py runs/openqa/model USER/realm-qa --corpus-repo USER/realm-corpus
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from realm.artifacts import MANIFEST, atomic_directory, rewrite_manifest
from realm.cards import CARD, corpus_card
from realm.data.store import BlockStore
from realm.hub import files_to_push, hub_offline, is_hub_id, locate_corpus, push_to_hub

logger = logging.getLogger(__name__)

#: Where the Parquet shards of a corpus repository live (the card's ``configs`` name them).
DATA_FILES = "data/train-*.parquet"
#: Blocks per Parquet shard.
ROWS_PER_SHARD = 200_000
#: Where a bundled corpus sits inside a model repository (its manifest names it so).
BUNDLED_CORPUS = "corpus"


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # the same bytes, no copy (realm never writes a saved file in place)
    except OSError:
        shutil.copy2(src, dst)


def export_corpus(corpus: str | os.PathLike, out_dir: str | os.PathLike,
                  repo_id: Optional[str] = None, tokenizer: Any = None,
                  overwrite: bool = False) -> Path:
    """Write a corpus directory as a datasets repository directory, atomically.

    Args:
        corpus: A corpus directory (``launch/prepare_corpus.py``).
        out_dir: The repository directory to write (must not exist unless ``overwrite``).
        repo_id: Its Hub id, for the card's examples.
        tokenizer: The corpus's tokenizer (loaded from its manifest's name when None).

    Returns:
        ``out_dir``: ``README.md`` (a dataset card), ``data/train-*.parquet`` and the block store
        (its manifest without this machine's paths). ``datasets.load_dataset(out_dir)`` and
        ``BlockStore(out_dir)`` both read it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = BlockStore(corpus)
    target = Path(out_dir)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        for name in store.manifest["files"]:
            _link_or_copy(Path(store.path) / name, tmp / name)
        manifest = json.loads(json.dumps(store.manifest))
        manifest.setdefault("input", {})["path"] = os.path.basename(
            str(manifest.get("input", {}).get("path", "")))
        manifest.get("tokenizer", {}).pop("path", None)  # a local directory of this machine
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        schema = store.features().arrow_schema
        shards = max(1, -(-len(store) // ROWS_PER_SHARD))
        (tmp / "data").mkdir()
        records = store.records(tokenizer)
        for shard in range(shards):
            n = min(ROWS_PER_SHARD, len(store) - shard * ROWS_PER_SHARD)
            rows = [next(records) for _ in range(n)]
            table = pa.Table.from_pylist(rows, schema=schema)
            pq.write_table(table, tmp / "data" / f"train-{shard:05d}-of-{shards:05d}.parquet")
        (tmp / CARD).write_text(corpus_card(manifest, repo_id, DATA_FILES), encoding="utf-8")
    logger.info("wrote the corpus %s (%d blocks) as a datasets repository at %s", store.path,
                len(store), target)
    return target


def check_corpus_options(directory: str, manifest: dict[str, Any], corpus_name: Optional[str],
                         bundle_corpus: bool) -> Optional[dict[str, Any]]:
    """An Open-QA model's corpus reference (None for other kinds), once the options say where
    a pushed copy finds its corpus.

    Raises:
        ValueError: an Open-QA model with no published corpus and neither option (a pushed
            model could not answer), or a corpus option for another kind; the message says
            what to pass.
    """
    reference = manifest.get("corpus") if manifest.get("kind") == "openqa_model" else None
    if reference is None and (corpus_name or bundle_corpus):
        raise ValueError(f"{directory} is a {manifest.get('kind')}, not an Open-QA model: it "
                         "names no corpus (leave out --corpus-repo / --with-corpus)")
    if reference is not None and not (corpus_name or bundle_corpus
                                      or is_hub_id(str(reference.get("name") or ""))):
        raise ValueError(f"{directory} is an Open-QA model: it answers from its corpus "
                         f"({reference.get('path')}), which a pushed copy would not find; pass "
                         "--corpus-repo USER/NAME (the corpus as a datasets repository) or "
                         "--with-corpus (the corpus inside the model repository)")
    return reference


def stage_model(directory: str | os.PathLike, out_dir: str | os.PathLike,
                corpus_name: Optional[str] = None, bundle_corpus: bool = False,
                overwrite: bool = False) -> Path:
    """Write what a model repository holds: the files :func:`realm.hub.files_to_push` lists
    (linked, not copied), and for an Open-QA model a manifest naming its corpus as
    ``corpus_name`` (a Hub datasets id), or with ``bundle_corpus`` the corpus itself in
    ``corpus/`` (:func:`export_corpus`) named by that relative path. The card is rewritten
    from the new manifest.

    Raises:
        ValueError: see :func:`check_corpus_options`.
    """
    directory = Path(directory)
    files = files_to_push(str(directory))
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    reference = check_corpus_options(str(directory), manifest, corpus_name, bundle_corpus)
    target = Path(out_dir)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        for rel in files:
            _link_or_copy(directory / rel, tmp / rel)
        if reference is not None and (corpus_name or bundle_corpus):
            if bundle_corpus:
                source = locate_corpus(str(directory), reference)
                if source is None:
                    raise ValueError(f"{directory}: its corpus {reference.get('path')} is not "
                                     "here to bundle")
                export_corpus(source, tmp / BUNDLED_CORPUS)
            name = BUNDLED_CORPUS if bundle_corpus else corpus_name
            rewrite_manifest(tmp, {**manifest, "corpus": {**reference, "name": name}})
    return target


def publish(directory: str, repo_id: str, corpus_repo: Optional[str] = None,
            bundle_corpus: bool = False, to_dir: Optional[str] = None,
            private: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Push a model directory to the Hub (or, with ``to_dir``, write the repositories there
    instead: ``to_dir/NAME`` for ``USER/NAME``); an Open-QA model's corpus goes to
    ``corpus_repo`` as a datasets repository first, or inside the model (``bundle_corpus``).
    ``dry_run``: check the options and list the model's files; write nothing.

    Returns:
        A summary: the repositories, their URLs or directories, and the files of each.
    """
    files = files_to_push(directory)  # (a clear error where it is no model directory)
    manifest = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    check_corpus_options(directory, manifest, corpus_repo, bundle_corpus)
    out: dict[str, Any] = {"repo_id": repo_id, "uploaded": not (to_dir or dry_run)}
    if out["uploaded"] and hub_offline():  # before any export work
        raise RuntimeError(f"push_to_hub {repo_id}: HF_HUB_OFFLINE is set; pass --to-dir DIR "
                           "to write the repositories locally")
    if dry_run:
        return {**out, "corpus_repo": corpus_repo, "files": files}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(to_dir) if to_dir else Path(scratch)
        if corpus_repo:
            source = locate_corpus(directory, manifest.get("corpus") or {})
            if source is None:
                raise ValueError(f"{directory}: its corpus {manifest['corpus'].get('path')} is "
                                 "not here to publish")
            corpus_dir = export_corpus(source, root / corpus_repo.split("/")[-1], corpus_repo)
            out.update(corpus_repo=corpus_repo, corpus_files=files_to_push(str(corpus_dir)))
            if to_dir:
                out["corpus_dir"] = str(corpus_dir)
            else:
                out["corpus_url"] = push_to_hub(str(corpus_dir), corpus_repo, private=private,
                                                repo_type="dataset")
        model_dir = stage_model(directory, root / repo_id.split("/")[-1], corpus_repo,
                                bundle_corpus)
        out["files"] = files_to_push(str(model_dir))
        if to_dir:
            out["dir"] = str(model_dir)
        else:
            out["url"] = push_to_hub(str(model_dir), repo_id, private=private)
    return out
