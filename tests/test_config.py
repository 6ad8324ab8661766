"""Typed config: defaults, YAML + ``key=value`` layering, typed overrides, errors naming keys."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

from realm.config import (NUMERIC_LABELS, Config, DataConfig, SpansConfig, config_reference,
    load_config, parse_override, save_config)
from realm.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED_CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _leaf_values(obj, prefix: str = "") -> dict:
    """{dotted key: value} for every non-section field of a config instance."""
    out = {}
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_leaf_values(value, key))
        else:
            out[key] = value
    return out


def _flatten(tree: dict, prefix: str = ""):
    """(dotted key, value) for every non-mapping value of a parsed YAML file."""
    for name, value in tree.items():
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, dict):
            yield from _flatten(value, key)
        elif value is not None:
            yield key, value


def _error(overrides=None, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Defaults, layering, round trip


def test_defaults_are_valid_and_documented_values():
    config = load_config()
    assert config == Config()
    assert config.data.max_block_tokens == 288
    assert config.data.on_bad_record == "error"
    assert config.data.input is None
    assert config.spans.exclude_labels == NUMERIC_LABELS
    # default_factory: two configs never share (and so never mutate) one list
    assert Config().spans.exclude_labels is not config.spans.exclude_labels


def test_file_then_overrides_win_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\ndata:\n  max_block_tokens: 64\n  min_text_chars: 20\n"
                    "spans:\n  enabled: false\n")
    config = load_config(path, ["data.max_block_tokens=128", "data.max_block_tokens=96"])
    assert config.seed == 3  # file over default
    assert config.data.min_text_chars == 20
    assert config.spans.enabled is False
    assert config.data.max_block_tokens == 96  # the last override wins
    assert config.data.chunk_articles == DataConfig().chunk_articles  # untouched default


def test_save_then_load_round_trips(tmp_path):
    config = load_config(overrides=[
        "seed=7", "data.input=corpus/my file.jsonl", "data.format=tsv", "data.max_articles=50",
        "data.on_bad_record=skip", "spans.include_labels=[PERSON, ORG]",
        "spans.exclude_labels=[]", "logging.log_level=DEBUG",
    ])
    path = save_config(config, tmp_path / "run")
    assert path == os.path.join(tmp_path / "run", "config.yaml")
    assert os.listdir(tmp_path / "run") == ["config.yaml"]  # no temporary file left behind
    loaded = load_config(path)
    assert loaded == config
    assert loaded.spans.include_labels == ["PERSON", "ORG"]
    assert loaded.data.max_articles == 50


def test_empty_yaml_file_and_empty_section_take_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert load_config(empty) == Config()
    commented = tmp_path / "commented.yaml"
    commented.write_text("data:\n  # max_block_tokens: 128\nspans:\n  enabled: false\n")
    assert load_config(commented).data == DataConfig()
    config = load_config(commented, ["data.max_block_tokens=64"])  # into the empty section
    assert config.data.max_block_tokens == 64
    assert config.spans.enabled is False


def test_whole_section_override_then_key_override():
    config = load_config(overrides=["data={max_block_tokens: 64, min_text_chars: 5}",
                                    "data.min_text_chars=9"])
    assert config.data.max_block_tokens == 64
    assert config.data.min_text_chars == 9


# ---------------------------------------------------------------------------------------------
# Overrides are YAML values, checked against the field types


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("data.max_block_tokens=128", "data.max_block_tokens", 128),
        ("spans.exclude_labels=[DATE]", "spans.exclude_labels", ["DATE"]),
        ("spans.include_labels=[PERSON, GPE]", "spans.include_labels", ["PERSON", "GPE"]),
        ("data.max_articles=null", "data.max_articles", None),
        ("data.max_articles=12", "data.max_articles", 12),
        ("spans.enabled=false", "spans.enabled", False),
        ("data.on_bad_record=skip", "data.on_bad_record", "skip"),
        ("data.input=runs/a=b.jsonl", "data.input", "runs/a=b.jsonl"),  # split at the first =
        ("data.input=", "data.input", ""),
    ],
)
def test_overrides_are_typed_from_yaml(override, key, expected):
    value = _leaf_values(load_config(overrides=[override]))[key]
    assert value == expected
    assert type(value) is type(expected)


def test_parse_override():
    assert parse_override(" data.max_block_tokens = 128") == ("data.max_block_tokens", 128)
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("data.max_block_tokens")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("=3")
    with pytest.raises(ConfigError, match=r"^data\.max_block_tokens: cannot parse value"):
        parse_override("data.max_block_tokens=[1")


# ---------------------------------------------------------------------------------------------
# Errors name the key and list the valid ones


def test_unknown_top_level_key_lists_sections():
    message = _error(["sead=1"])
    assert "unknown key 'sead'" in message
    assert "did you mean 'seed'" in message
    for name in _names(Config):
        assert name in message


def test_unknown_nested_key_suggests_and_lists_valid_keys():
    message = _error(["data.max_block_tokenz=5"])
    assert "unknown key 'data.max_block_tokenz'" in message
    assert "did you mean 'max_block_tokens'" in message
    assert "valid keys here: " + ", ".join(_names(DataConfig)) in message


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("data.max_block_tokens=abc", ["data.max_block_tokens:", "expected an integer", "'abc'"]),
        ("data.max_block_tokens=true", ["data.max_block_tokens:", "expected an integer"]),
        ("spans.enabled=3", ["spans.enabled:", "expected true or false", "3"]),
        ("data.max_articles=many", ["data.max_articles:", "int or null", "'many'"]),
        ("spans.exclude_labels=DATE", ["spans.exclude_labels:", "expected list of str"]),
        ("spans.include_labels=[1]", ["spans.include_labels:", "list of str or null"]),
        ("seed=1.5", ["seed:", "expected an integer"]),
        ("data=5", ["data:", "expected a mapping of", ", ".join(_names(DataConfig))]),
    ],
)
def test_wrong_type_names_the_key(override, fragments):
    message = _error([override])
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("data.max_block_tokens=0", ["data.max_block_tokens:", "must be > 0, got 0"]),
        ("data.max_block_tokens=8", ["data.max_block_tokens:", "must be >= 16"]),
        ("spans.n_process=0", ["spans.n_process:", "must be >= 1, got 0"]),
        ("spans.batch_size=-1", ["spans.batch_size:", "must be > 0"]),
        ("data.max_articles=0", ["data.max_articles:", "must be > 0 or null"]),
        ("data.min_text_chars=0", ["data.min_text_chars:", "must be >= 1"]),
        ("spans.spacy_model=' '", ["spans.spacy_model:", "must not be empty"]),
        ("pretrain.reader_lr_scale=-1", ["pretrain.reader_lr_scale:", "must be >= 0"]),
        ("pretrain.ict_lr=0", ["pretrain.ict_lr:", "must be > 0, got 0"]),
        ("pretrain.lm_lora_rank=0", ["pretrain.lm_lora_rank:", "must be > 0, got 0"]),
        ("pretrain.lm_lora_alpha=-1", ["pretrain.lm_lora_alpha:", "must be > 0"]),
        ("refresh.lag_steps=500", ["refresh.lag_steps:", "below refresh.every_steps (500)"]),
        ("refresh.lag_steps=-1", ["refresh.lag_steps:", "must be >= 0"]),
    ],
)
def test_impossible_value_names_the_key(override, fragments):
    message = _error([override])
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("only", ["null_only"])
def test_frozen_reader_with_nothing_else_to_train_is_refused(only):
    message = _error([f"pretrain.{only}=true", "pretrain.reader_lr_scale=0"])
    assert message.startswith("pretrain.reader_lr_scale:") and "nothing to train" in message
    assert load_config(None, ["pretrain.reader_lr_scale=0"]).pretrain.reader_lr_scale == 0


def test_lm_mode_lora_parses_with_its_adapter_shape():
    p = load_config(None, ["pretrain.reader_type=causal_lm", "pretrain.lm_mode=lora",
                           "pretrain.lm_lora_rank=4", "pretrain.lm_lora_alpha=8"]).pretrain
    assert (p.lm_mode, p.lm_lora_rank, p.lm_lora_alpha) == ("lora", 4, 8.0)
    assert (Config().pretrain.lm_lora_rank, Config().pretrain.lm_lora_alpha) == (8, 16.0)
    assert _error(["pretrain.lm_mode=qlora"]).endswith("valid values: frozen, lora, full")


def test_invalid_literal_lists_valid_values():
    message = _error(["data.on_bad_record=ignore"])
    assert message == "data.on_bad_record: invalid value 'ignore'; valid values: error, skip"
    assert "valid values: auto, jsonl, tsv, json, hf" in _error(["data.format=xml"])


def test_value_set_as_if_it_were_a_section():
    message = _error(["data.input.x=1"])
    assert message.startswith("data.input: is a value, not a section")
    assert "'data.input.x'" in message


def test_sections_validate_when_built_directly():
    with pytest.raises(ConfigError, match=r"spans\.n_process"):
        SpansConfig(n_process=0)
    with pytest.raises(ConfigError, match=r"data\.max_block_tokens"):
        DataConfig(max_block_tokens=0)


# ---------------------------------------------------------------------------------------------
# YAML file errors name the file


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  max_block_tokenz: 5\n")
    message = _error(path=path)
    assert message.startswith(f"{path}: unknown key 'data.max_block_tokenz'")
    assert "did you mean 'max_block_tokens'" in message
    assert ", ".join(_names(DataConfig)) in message


def test_removed_key_is_refused_in_one_line_saying_so(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("pretrain:\n  k: 4\n  reader_warmup_steps: 1000\n")
    assert _error(path=path) == (f"{path}: pretrain.reader_warmup_steps was removed "
                                 "(research, see research/README.md)")
    assert _error(["pretrain.source_only=true"]) == (
        "pretrain.source_only was removed (research, see research/README.md)")
    message = _error(["pretrain.retriever_signal=bank"])
    assert message.startswith("pretrain.retriever_signal: 'bank' was removed (research")
    assert "\n" not in message and message.endswith("valid values: marginal, relative, positive, pdist")


OLD_CORPUS_KEYS = [(f"{section}.corpus", "corpus") for section in (
    "pretrain", "ict", "refresh", "openqa", "retriever_training", "mlm")]


@pytest.mark.parametrize("old,new", [*OLD_CORPUS_KEYS, ("pretrain.cache_dir", "cache_dir")])
def test_replaced_key_is_refused_in_one_line_naming_the_new_key(old, new, tmp_path):
    line = f"{old} was replaced by the top-level key {new}"
    assert _error([f"{old}=somewhere"]) == line
    section, name = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"seed: 1\n{section}:\n  {name}: somewhere\n")
    assert _error(path=path) == f"{path}: {line}"


def test_corpus_and_cache_dir_overrides_land_at_the_top_level(tmp_path):
    config = load_config(overrides=["corpus=runs/corpus/leads", "cache_dir=/tmp/realm-cache"])
    assert (config.corpus, config.cache_dir) == ("runs/corpus/leads", "/tmp/realm-cache")
    assert Config().corpus is None and Config().cache_dir == "runs/cache"
    for section in ("pretrain", "ict", "refresh", "openqa", "retriever_training", "mlm"):
        assert "corpus" not in _names(type(getattr(config, section))), section
    assert "cache_dir" not in _names(type(config.pretrain))
    path = tmp_path / "new.yaml"
    path.write_text("corpus: runs/corpus/leads\ncache_dir: /tmp/realm-cache\n")
    assert load_config(path) == config
    assert load_config(save_config(config, tmp_path)) == config


def test_bad_value_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("spans:\n  n_process: 0\n")
    assert _error(path=path) == f"{path}: spans.n_process: must be >= 1, got 0"


def test_override_error_is_not_blamed_on_the_file(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text("data:\n  max_block_tokens: 64\n")
    message = _error(["data.max_block_tokens=abc"], path)
    assert message == "data.max_block_tokens: expected an integer, got 'abc'"


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("- data\n- spans\n", "the top level must be a mapping of seed, corpus, cache_dir, data"),
        ("7\n", "the top level must be a mapping"),
        ("data: [\n", "not valid YAML"),
    ],
)
def test_malformed_file_names_the_file(tmp_path, body, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    message = _error(path=path)
    assert message.startswith(f"{path}: ")
    assert fragment in message


def test_missing_or_unreadable_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert _error(path=missing) == f"config file {str(missing)!r} does not exist"
    message = _error(path=tmp_path)  # a directory
    assert message.startswith(f"{tmp_path}: cannot read config file")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"data:\n  input: caf\xe9.jsonl\n")
    assert _error(path=latin1).startswith(f"{latin1}: cannot read config file")


# ---------------------------------------------------------------------------------------------
# The reference table and the shipped configs


def test_config_reference_lists_every_leaf_with_help():
    rows = config_reference()
    defaults = _leaf_values(Config())
    assert [row[0] for row in rows] == list(defaults)  # every leaf, no sections, in order
    for key, type_name, default, help_text in rows:
        assert help_text.strip(), f"{key} has no help text"
        assert type_name.strip()
        assert json.loads(default) == defaults[key], key
    by_key = {row[0]: row for row in rows}
    assert by_key["data.max_block_tokens"][1:3] == ("int", "288")
    assert by_key["data.on_bad_record"][1] == "one of 'error', 'skip'"
    assert by_key["spans.include_labels"][1] == "list of str or null"


def test_configs_dir_ships_at_least_one_yaml():
    assert SHIPPED_CONFIGS, f"no *.yaml in {CONFIGS_DIR}"


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path, tmp_path):
    config = load_config(path)
    values = _leaf_values(config)
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    for key, value in _flatten(raw):  # every key the file sets is what the config holds
        assert values[key] == value, key
    assert load_config(save_config(config, tmp_path)) == config


@pytest.mark.parametrize("override", ["train.lr=.inf", "refresh.poll_s=.inf", "train.lr=.nan",
                                      "pretrain.retriever_lr_scale=-.inf"])
def test_non_finite_numbers_are_refused_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: expected a finite number"):
        load_config(overrides=[override])
