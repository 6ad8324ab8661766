"""What every entry script shares: ``--config FILE key=value ...`` parsing, logging, the JSON line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable, Optional, Sequence

from realm.config import Config, ConfigError, load_config

logger = logging.getLogger("realm")


def config_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--config`` and trailing ``key=value`` overrides."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Overrides: dotted key=value pairs, e.g. data.max_block_tokens=128 "
        "spans.n_process=2 (see docs/configuration.md).",
    )
    parser.add_argument("--config", help="YAML config file (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def parse(
    parser: argparse.ArgumentParser,
    argv: Optional[Sequence[str]] = None,
    shortcuts: Optional[Callable[[argparse.Namespace], list[str]]] = None,
) -> tuple[argparse.Namespace, Config]:
    """Parse the command line into (args, validated Config); a bad config exits with code 2.

    ``shortcuts`` turns script-specific flags (``--input PATH``) into overrides applied last;
    build them with :func:`override` so that a path is taken literally, not parsed as YAML.
    """
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after flags
    overrides = list(args.overrides) + (shortcuts(args) if shortcuts else [])
    try:
        config = load_config(args.config, overrides)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: config error: {err}\n")
    setup_logging(config.logging.log_level)
    return args, config


def override(key: str, value: Any) -> str:
    """A ``key=value`` override whose value is taken as is (``#``, ``:`` or ``null`` in a path)."""
    return f"{key}={json.dumps(value)}"  # a JSON string is a YAML double-quoted scalar


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def emit_summary(summary: dict[str, Any]) -> None:
    """The last stdout line of every entry script: one JSON object."""
    sys.stdout.write(json.dumps(summary, sort_keys=False) + "\n")
    sys.stdout.flush()
