"""Every error realm raises across files, in one place (the CLI reports these in one line).

Input errors name the file, line, field or key; run errors say what failed and where.
"""

from __future__ import annotations


# ---------------------------------------------------------------------------------------------
# Bad input: configuration, corpora, question files, model directories


class ConfigError(ValueError):
    """A configuration key, type or value is wrong. The message names the key."""


class CorpusFormatError(ValueError):
    """A corpus file or record is malformed. The message names the file and line or field."""


class CorpusError(ValueError):
    """A corpus directory is missing, incomplete or corrupt. The message names the file."""


class OutputExistsError(FileExistsError):
    """The output directory holds something other than this exact corpus."""


class QAFormatError(ValueError):
    """A QA record is malformed; the message names the file and line."""


class CorpusMismatchError(ValueError):
    """The corpus given (or named by the model) is missing or not the one the model indexes."""


class MissingInputError(FileNotFoundError):
    """An input a stage or a data recipe needs is missing, or a public data source cannot be
    reached; the message names it and the command (or ``--from``) that makes it."""


# ---------------------------------------------------------------------------------------------
# Run directories and index generations


class GenerationError(ValueError):
    """A generation is missing, incomplete, corrupt, or does not fit the reader's corpus/dim."""


class RunDirError(ValueError):
    """A run directory cannot be opened (a URL no installed fsspec file system can open) or
    written, or a file the run keeps there is malformed (a pointer naming a path the store never
    writes, a ``metrics.jsonl`` line that is not UTF-8 JSON). The message names the file."""


class StoreLockedError(RuntimeError):
    """Another process (a trainer, or a refresher) holds this run directory's lock; the message
    names its pid and host."""


class ResumeError(ValueError):
    """A checkpoint cannot be resumed safely: it was made from another corpus, model shape or
    stage; a file of it is planted, malformed or unreadable; or the installed loaders would
    unpickle it. The message names the file or both sides."""


# ---------------------------------------------------------------------------------------------
# Runs


class RefresherFailed(RuntimeError):
    """The refresher cannot give the trainer an index (it died for good, or never committed one
    in time); the message quotes its log."""


class WriteError(OSError):
    """Files could not be written (a full disk, permissions, a file-size limit): the message
    names the path, the cause (:func:`realm.fsutil.write_failure`) and what was kept."""


class CheckpointError(WriteError):
    """A checkpoint could not be written (the message names the path and the cause)."""


class StageFailed(RuntimeError):
    """A preparation stage run as its own process failed (the message carries its error)."""
