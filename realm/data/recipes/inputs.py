"""Every input path of a stage's config checked before any work (:func:`require_inputs`): a
missing one fails in one line naming it and, when a data recipe writes it, the command that
makes it (``python -m realm data squad-open --output data``)."""

from __future__ import annotations

import os
from typing import Iterable, Optional

from realm.config import load_config
from realm.data.recipes.common import MANIFEST, Recipe, data_command
from realm.errors import MissingInputError

#: stage -> the config sections whose ``train_qa`` / ``dev_qa`` (and ``triplets``) it reads
QA_SECTIONS = {"train_retriever": ("retriever_training",), "finetune_openqa": ("openqa",)}


def _local(path: Optional[str]) -> bool:
    """A path on this machine (not ``hf:...``, ``package:...`` or a URL)."""
    return bool(path) and not path.startswith(("hf:", "package:")) and "://" not in path


def input_paths(config, stage: str) -> list[tuple[str, str, str]]:
    """``(key, path, kind)`` of every local input ``stage`` reads from ``config``; ``kind`` is
    ``file``, ``dir``, ``corpus`` (a corpus directory) or ``input`` (a corpus input: file or
    directory). An Open-QA reader warm start's config is followed (its keys prefixed)."""
    out = []
    if config.corpus:
        if _local(config.corpus):
            out.append(("corpus", config.corpus, "corpus"))
    elif _local(config.data.input):
        out.append(("data.input", config.data.input, "input"))
    for section in QA_SECTIONS.get(stage, ()):
        values = getattr(config, section)
        for key in ("train_qa", "dev_qa"):
            if _local(getattr(values, key)):
                out.append((f"{section}.{key}", getattr(values, key), "file"))
        if _local(getattr(values, "triplets", None)):
            out.append((f"{section}.triplets", values.triplets, "dir"))
    warm = config.openqa.reader_warm_start if stage == "finetune_openqa" else None
    if warm:
        out.append(("openqa.reader_warm_start", warm, "file"))
        if os.path.isfile(warm):
            out += [(f"openqa.reader_warm_start ({warm}): {key}", path, kind)
                    for key, path, kind in input_paths(load_config(warm), stage)]
    return out


def _problem(path: str, kind: str) -> Optional[str]:
    if kind == "corpus":
        if not os.path.isdir(path):
            return f"{path}: not a corpus directory (no such directory)"
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            return f"{path}: not a corpus directory (no {MANIFEST})"
        return None
    exists = {"file": os.path.isfile, "dir": os.path.isdir, "input": os.path.exists}[kind]
    return None if exists(path) else f"{path} does not exist"


def maker(path: str, recipes: Iterable[Recipe]) -> Optional[str]:
    """The command that writes ``path`` when a recipe does (its ``--output`` read off the path:
    ``data/squad_open/qa_dev.jsonl`` -> ``... squad-open --output data``); else None."""
    normal = os.path.normpath(path).replace(os.sep, "/")
    for recipe in recipes:
        for relative in recipe.files:
            if normal == relative or normal.endswith("/" + relative):
                return data_command(recipe.name, normal[: -len(relative)].rstrip("/") or ".")
    return None


def require_inputs(config, stage: str, recipes: Iterable[Recipe]) -> None:
    """Check that every local input of ``stage`` (:func:`input_paths`) exists, before any work.

    Args:
        config: The stage's :class:`realm.config.Config`.
        stage: The stage's name (``finetune_openqa``, ``train_retriever``, ``pretrain``, ...).
        recipes: The data recipes whose files may be missing (their commands are named).

    Raises:
        MissingInputError: One line naming each missing ``key: path`` and the commands that
            make them.
    """
    recipes = list(recipes)
    missing, commands = [], []
    for key, path, kind in input_paths(config, stage):
        problem = _problem(path, kind)
        if problem:
            missing.append(f"{key}: {problem}")
            command = maker(path, recipes)
            if command and command not in commands:
                commands.append(command)
    if missing:
        how = (f"; make {'it' if len(missing) == 1 else 'them'} with: "
               + " and ".join(commands) + " (no network: add --from DIR, a local copy)"
               ) if commands else ""
        raise MissingInputError("; ".join(missing) + how)
