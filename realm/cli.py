"""What every entry script shares: ``--config FILE key=value ...`` parsing, logging, the JSON line."""

from __future__ import annotations

import argparse
import json
import logging
import os
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


def run_stage(
    description: str,
    run: Callable[..., dict[str, Any]],
    argv: Optional[Sequence[str]] = None,
    default_config: Optional[str] = None,
    errors: tuple[type[BaseException], ...] = (),
    on_interrupt: str = "",
) -> int:
    """A training stage's ``main``: parse ``--config``/overrides (``default_config`` when no
    ``--config``) and ``--no-progress``, call ``run(config, progress=...)``, print its summary on
    the main process.

    Returns 0; 1 for one of ``errors`` (logged, e.g. a bad input file); 130 on Ctrl-C, after
    ``run`` has left its checkpoint (``on_interrupt`` is added to the message).
    """
    parser = config_parser(description)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(config=default_config)
    args, config = parse(parser, argv)
    try:
        summary = run(config, progress=not args.no_progress)
    except errors as err:
        logger.error("%s: %s", parser.prog, err)
        return 1
    except KeyboardInterrupt:
        logger.warning("interrupted%s; re-run the same command to resume from the newest "
                       "checkpoint in %s", on_interrupt, config.train.run_dir)
        return 130
    if os.environ.get("RANK", "0") == "0":  # the main process (accelerate/torchrun set RANK)
        emit_summary(summary)
    return 0
