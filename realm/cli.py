"""What every entry script shares: ``--config FILE key=value ...`` parsing, logging, the JSON line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence

from realm.config import Config, load_config, override
from realm.report.records import SUMMARY_FILE
from realm.data.recipes import check_inputs
from realm.errors import (ConfigError, CorpusError, QAFormatError, RefresherFailed, ResumeError,
                          RunDirError, StageFailed, StoreLockedError, WriteError)

logger = logging.getLogger("realm")


def config_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--config`` and trailing ``key=value`` overrides (named as the
    user called it: ``pretrain.py``, or ``python -m realm pretrain``)."""
    main = os.path.basename(sys.argv[0]) == "__main__.py" and len(sys.argv) > 1
    parser = argparse.ArgumentParser(
        prog=f"python -m realm {sys.argv[1]}" if main else None,
        description=description,
        epilog="Overrides: dotted key=value pairs, e.g. data.max_block_tokens=128 "
        "spans.n_process=2 (see docs/configuration.md).",
    )
    parser.add_argument("--config", help="YAML config file (configs/*.yaml)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML: the file, then the overrides) "
                             "and exit")
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
        parser.exit(2, error_line(parser.prog, f"config: {err}"))
    if getattr(args, "print_config", False):
        sys.stdout.write(config.to_yaml())
        parser.exit(0)
    setup_logging(config.logging.log_level)
    return args, config


def error_line(prog: str, message: Any) -> str:
    """Every command's error, in one shape: ``PROG: error: MESSAGE`` (argparse's own, so a
    usage error reads the same), one line ending in a newline; a config error's message starts
    with ``config:``."""
    return f"{prog}: error: {message}\n"


def print_error(prog: str, message: Any) -> None:
    """Write :func:`error_line` to stderr."""
    sys.stderr.write(error_line(prog, message))
    sys.stderr.flush()


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # faiss's loader logs every CPU-feature build it tries ("Could not load library ...
    # ModuleNotFoundError") at INFO: noise above a run's one error line
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def relative_paths(value: Any, cwd: Optional[str] = None) -> Any:
    """``value`` with every absolute path under the working directory made relative to it
    (in nested dicts and lists too): a summary line reads ``runs/pretrain/checkpoints/...``."""
    cwd = cwd or os.getcwd()
    if isinstance(value, dict):
        return {k: relative_paths(v, cwd) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_paths(v, cwd) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and \
            os.path.commonpath([cwd, os.path.abspath(value)]) == cwd and value != cwd:
        return os.path.relpath(value, cwd)
    return value


def emit_summary(summary: dict[str, Any]) -> None:
    """The last stdout line of every entry script: one JSON object (paths under the working
    directory relative to it)."""
    sys.stdout.write(json.dumps(relative_paths(summary), sort_keys=False) + "\n")
    sys.stdout.flush()


def _resolve(target: Any) -> Any:
    """``"package.module:attribute"`` -> the attribute, imported now; anything else as is."""
    if not isinstance(target, str):
        return target
    import importlib

    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclasses.dataclass(frozen=True)
class Stage:
    """A training stage as its command line knows it, named lazily (``module:attribute``
    strings) so that ``--help`` and ``--print-config`` answer without importing torch."""

    description: str
    run: str
    errors: tuple[str, ...] = ()
    on_interrupt: str = ""
    #: script flags that set a config key: (flag, key, help)
    flags: tuple[tuple[str, str, str], ...] = ()


#: What every stage reports in one line (``--debug``: a traceback): a missing or malformed input
#: file or directory, an output path that cannot be made.
INPUT_ERRORS = (QAFormatError, CorpusError, FileNotFoundError, NotADirectoryError,
                FileExistsError, PermissionError)

#: Every stage reads the one knowledge corpus: ``--corpus DIR`` is ``corpus=DIR``.
CORPUS_FLAG = ("--corpus", "corpus", "knowledge corpus directory (sets corpus)")

STAGES: dict[str, Stage] = {
    "pretrain": Stage("REALM pretraining beside the index refresher.",
                      "realm.training.pretrain:run_pretrain",
                      on_interrupt=" (the refresher is stopped)", flags=(CORPUS_FLAG,)),
    "ict": Stage("ICT warm start of the retriever (Inverse Cloze Task).",
                 "realm.training.ict:run_ict", flags=(CORPUS_FLAG,)),
    "adapt_mlm": Stage("MLM adaptation: continue an encoder as a BERT-style masked LM.",
                       "realm.training.adapt_mlm:run_adapt_mlm", errors=("builtins:ValueError",),
                       flags=(CORPUS_FLAG,)),
    "train_retriever": Stage("Supervised retriever training (DPR): BM25-mined positives and hard "
                             "negatives, in-batch negatives from every rank.",
                             "realm.training.dpr:run_train_retriever",
                             errors=("builtins:ValueError",), flags=(CORPUS_FLAG,)),
    "finetune_openqa": Stage("Open-QA fine-tuning: fixed index, query encoder and reader "
                             "trained.", "realm.training.openqa:run_finetune",
                             errors=("builtins:ValueError",), flags=(CORPUS_FLAG,)),
}


def stage_main(name: str, argv: Optional[Sequence[str]] = None,
               default_config: Optional[str] = None) -> int:
    """The ``main`` of the training stage ``name`` (:data:`STAGES`): what its launch script and
    its ``python -m realm STAGE`` run."""
    stage = STAGES[name]
    return run_stage(stage.description, stage.run, argv, default_config, errors=stage.errors,
                     on_interrupt=stage.on_interrupt, flags=stage.flags,
                     check=lambda config: check_inputs(config, name))


def run_stage(
    description: str,
    run: Callable[..., dict[str, Any]] | str,
    argv: Optional[Sequence[str]] = None,
    default_config: Optional[str] = None,
    errors: tuple[type[BaseException] | str, ...] = (),
    on_interrupt: str = "",
    flags: Sequence[tuple[str, str, str]] = (),
    check: Optional[Callable[[Config], None]] = None,
) -> int:
    """A training stage's ``main``: parse ``--config``/overrides (``default_config`` when no
    ``--config``) and ``--no-progress``, ``check(config)`` (its inputs exist: before the stage is
    imported, so a missing file fails in a second), call ``run(config, progress=...)``, print
    its summary on the main process. ``run`` and ``errors`` may be ``"module:attribute"``
    strings, imported only after the command line is parsed (``--help`` stays fast).

    Returns 0; 1 for one of ``errors`` (logged, e.g. a bad input file), 2 for a
    :class:`ConfigError` found while running (as for one found while parsing); 130 on Ctrl-C
    (143 on SIGTERM), after ``run`` has left its checkpoint (``on_interrupt`` is added to the
    message).
    """
    parser = config_parser(description)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true",
                        help="a traceback instead of a one-line error for a bad input")
    for flag, _, help_text in flags:
        parser.add_argument(flag, help=help_text)
    parser.set_defaults(config=default_config)

    def shortcuts(args: argparse.Namespace) -> list[str]:
        out = []
        for flag, key, _ in flags:
            value = getattr(args, flag.lstrip("-").replace("-", "_"))
            if value is not None:
                out.append(override(key, value))
        return out

    args, config = parse(parser, argv, shortcuts)
    # bad inputs (their messages name the file, directory or key); a diverged run; an index
    # refresher that cannot give the run an index; a checkpoint, encoder snapshot or metrics
    # record that cannot be written (a full disk: WriteError, CheckpointError among them); a
    # preparation stage (warm start) that failed in its own process; a run directory another
    # trainer holds, or that cannot be written; a checkpoint that cannot be resumed safely
    errors = tuple(_resolve(e) for e in (*errors, *INPUT_ERRORS)) + (
        FloatingPointError, RefresherFailed, WriteError, StageFailed, ConfigError,
        StoreLockedError, RunDirError, ResumeError)
    terminated: list[int] = []

    def on_sigterm(signum, frame):  # what schedulers send: the Ctrl-C path, checkpoint and all
        terminated.append(signum)
        raise KeyboardInterrupt

    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if check is not None:
            check(config)
        summary = _resolve(run)(config, progress=not args.no_progress)
    except errors as err:
        if args.debug:
            raise
        print_error(parser.prog, f"config: {err}" if isinstance(err, ConfigError) else err)
        return 2 if isinstance(err, ConfigError) else 1
    except KeyboardInterrupt:
        logger.warning("%s%s; re-run the same command to resume from the newest checkpoint "
                       "in %s", "terminated (SIGTERM)" if terminated else "interrupted",
                       on_interrupt, config.train.run_dir)
        return 143 if terminated else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if os.environ.get("RANK", "0") == "0":  # the main process (accelerate/torchrun set RANK)
        save_summary(summary, config.train.run_dir)
        emit_summary(summary)
    sys.stdout.flush()
    return 0


def save_summary(summary: dict[str, Any], run_dir: str) -> None:
    """``run_dir/summary.json``, written whole (a temp file renamed over it); a failure is
    logged, never raised: the run itself is done."""
    if not run_dir or not os.path.isdir(run_dir):
        return
    path = os.path.join(run_dir, SUMMARY_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as err:
        logger.warning("the summary was not saved to %s: %s", path, err)
        if os.path.exists(tmp):
            os.remove(tmp)
