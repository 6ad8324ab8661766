"""Loading configs: one dataclass per concern, YAML files, dotted ``key=value`` overrides.

A config is built in three layers, later ones winning::

    defaults (the dataclasses below)  <-  YAML file (--config)  <-  key=value overrides

Every value is checked against its field's type when it is set, and every dataclass validates
its own ranges in ``__post_init__``. Errors name the offending key and list the valid ones:

    >>> load_config(overrides=["data.max_block_tokens=0"])
    Traceback (most recent call last):
    ...
    realm.errors.ConfigError: data.max_block_tokens: must be > 0, got 0
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from typing import Any, Literal, Optional

import yaml

from realm.config.stages import Config
from realm.errors import ConfigError


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks that name the key.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:  # a section whose keys are all commented out: its defaults
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_fields_list(tp)}, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and (key, value) in REMOVED_VALUES:
            raise ConfigError(f"{key}: {value!r} was removed ({REMOVED_VALUES[key, value]}); "
                              f"valid values: {', '.join(map(str, choices))}")
        if value not in choices:
            raise ConfigError(
                f"{key}: invalid value {value!r}; valid values: {', '.join(map(str, choices))}"
            )
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .inf / .nan: every setting here is a finite number
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a bug in a dataclass here


def _fields_list(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


_RESEARCH = "research, see research/README.md"

#: Keys the product no longer has, with where they went: a config that still names one is
#: refused with this one line rather than as an unknown key.
REMOVED_KEYS: dict[str, str] = {
    **{f"pretrain.{name}": _RESEARCH for name in (
        "reader_warmup_steps", "reader_warmup_batch_size", "reader_warmup_other_weight",
        "reader_warmup_spanless_blocks", "reader_warmup_examples", "source_only")},
}

#: Keys that moved, with the key that replaced them: a config that still names one is refused
#: with one line naming the new key.
REPLACED_KEYS: dict[str, str] = {
    **{f"{section}.corpus": "corpus" for section in (
        "pretrain", "ict", "refresh", "openqa", "retriever_training", "mlm")},
    "pretrain.cache_dir": "cache_dir",
}

#: Values of a key that the product no longer has (the key itself stays).
REMOVED_VALUES: dict[tuple[str, Any], str] = {
    ("pretrain.retriever_signal", value): _RESEARCH for value in ("centered", "in_batch", "bank")
}


def _unknown_key(cls: type, name: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    key = f"{prefix}.{name}" if prefix else name
    if key in REMOVED_KEYS:
        return ConfigError(f"{key} was removed ({REMOVED_KEYS[key]})")
    if key in REPLACED_KEYS:
        new = REPLACED_KEYS[key]
        where = "the top-level key" if "." not in new else "the key"
        return ConfigError(f"{key} was replaced by {where} {new}")
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r}{hint}; valid keys here: {', '.join(names)}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name not in names:
            raise _unknown_key(cls, name, prefix)
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], cls: type, dotted: str, value: Any) -> None:
    """Set ``a.b.c=value`` in a nested dict, checking each part is a real key of ``cls``."""
    parts = dotted.split(".")
    node, node_cls, prefix = tree, cls, ""
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(node_cls)}
        if part not in names:
            raise _unknown_key(node_cls, part, prefix)
        prefix = f"{prefix}.{part}" if prefix else part
        if i == len(parts) - 1:
            node[part] = value
            return
        sub_cls = typing.get_type_hints(node_cls)[part]
        if not dataclasses.is_dataclass(sub_cls):
            raise ConfigError(f"{prefix}: is a value, not a section; cannot set {dotted!r}")
        if node.get(part) is None:  # absent, or an empty section in the YAML file
            node[part] = {}
        elif not isinstance(node[part], dict):
            raise ConfigError(
                f"{prefix}: expected a mapping of {_fields_list(sub_cls)}, got {node[part]!r}"
            )
        node = node[part]
        node_cls = sub_cls


def parse_override(text: str) -> tuple[str, Any]:
    """``"data.max_block_tokens=128"`` -> ``("data.max_block_tokens", 128)`` (values are YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. data.max_block_tokens=128")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {err}") from None
    return key, value


def load_config(
    path: Optional[str | os.PathLike] = None,
    overrides: Optional[list[str]] = None,
    cls: type = Config,
) -> Any:
    """Defaults <- YAML file <- ``key=value`` overrides, validated. Errors name the key (and file)."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:  # a directory, unreadable, not UTF-8
            raise ConfigError(f"{path}: cannot read config file: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of {_fields_list(cls)}")
        try:  # the file on its own first, so that its errors (and only those) name it
            _build(cls, loaded)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        tree = loaded
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, cls, key, value)
    return _build(cls, tree)


def save_config(config: Any, run_dir: str | os.PathLike, name: str = "config.yaml") -> str:
    """Write the resolved config into a run directory (atomically) and return its path."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def config_reference(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf field: the source of docs/configuration.md."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(config_reference(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()  # type: ignore[misc]
        rows.append((key, _type_name(tp), json.dumps(default), f.metadata.get("help", "")))
    return rows


def reference_markdown() -> str:
    """The key table of docs/configuration.md (a test keeps that file in step with this code)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, text in config_reference():
        lines.append(f"| `{key}` | {tp} | `{default}` | {text} |")
    return "\n".join(lines) + "\n"


def write_reference(path: str = "docs/configuration.md") -> None:
    """Replace the key table at the end of ``path`` with the current one."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head = text[: text.index("| key | type |")]
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + reference_markdown())


def override(key: str, value: Any) -> str:
    """A ``key=value`` override whose value is taken as is (``#``, ``:`` or ``null`` in a path)."""
    return f"{key}={json.dumps(value)}"  # a JSON string is a YAML double-quoted scalar
