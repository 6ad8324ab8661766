"""What every data recipe shares: the recipe record, local jsonl reading with one-line errors,
atomic jsonl writing, a public source behind one error that names ``--from``, and the
manifest written last into each recipe's folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from realm.errors import MissingInputError, QAFormatError
from realm.version import __version__

MANIFEST = "manifest.json"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """A data recipe: the files it writes under ``--output`` and how it builds them.

    Attributes:
        name: What ``python -m realm data NAME`` calls it.
        description: One line for ``--help``.
        folder: The folder under ``--output`` that holds its manifest.
        files: Files it always writes, relative to ``--output`` (a ``--from`` directory holds
            the same layout).
        build: ``build(output, source, progress) -> manifest`` (``source`` None: the public one).
    """

    name: str
    description: str
    folder: str
    files: tuple[str, ...]
    build: Callable[[str, Optional[str], bool], dict[str, Any]]


def data_command(name: str, output: str = "data") -> str:
    """The command that makes a recipe's files, e.g. ``python -m realm data squad-open
    --output data``."""
    return f"python -m realm data {name} --output {output}"


def local_path(source: str, relative: str, recipe: str) -> str:
    """``source/relative``, or a one-line error naming it when the ``--from`` copy lacks it."""
    path = os.path.join(source, relative)
    if not os.path.isfile(path):
        raise MissingInputError(f"{path}: no such file (a --from directory for {recipe} holds "
                                f"{relative})")
    return path


def read_jsonl(path: str, fields: Sequence[str]) -> list[dict[str, Any]]:
    """The records of a local jsonl file, each an object with ``fields``.

    Raises:
        MissingInputError: No such file.
        QAFormatError: A line that is not UTF-8 JSON, not an object, or lacks a field (the
            message names the file and line).
    """
    try:
        f = open(path, "rb")
    except OSError as err:
        raise MissingInputError(f"{path}: cannot open: {err.strerror}") from None
    out = []
    with f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise QAFormatError(f"{path}:{lineno}: not a UTF-8 JSON line: {err}") from None
            if not isinstance(record, dict) or any(k not in record for k in fields):
                raise QAFormatError(f"{path}:{lineno}: expected an object with "
                                    f"{', '.join(fields)}")
            out.append(record)
    return out


def check_answers(records: Iterable[dict[str, Any]], where: str) -> None:
    """Every record has a question string and a non-empty list of answer strings."""
    for i, r in enumerate(records, start=1):
        answers = r.get("answers")
        if not isinstance(r.get("question"), str) or not isinstance(answers, list) or \
                not answers or not all(isinstance(a, str) for a in answers):
            raise QAFormatError(f"{where}: record {i}: expected a question string and a "
                                f"non-empty list of answer strings")


def write_jsonl(output: str, relative: str, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Write ``records`` to ``output/relative`` (UTF-8, one object a line, written to a temp
    file and renamed into place). Returns the file's ``lines`` and ``sha256``."""
    path = os.path.join(output, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    sha, n = hashlib.sha256(), 0
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            line = json.dumps(record, ensure_ascii=False) + "\n"
            f.write(line)
            sha.update(line.encode("utf-8"))
            n += 1
    os.replace(tmp, path)
    return {"lines": n, "sha256": sha.hexdigest()}


def hub_url() -> str:
    """The Hub that ``datasets`` downloads from (``HF_ENDPOINT``)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def probe(url: str, timeout_s: float = 5.0) -> None:
    """Connect to ``url``'s host once (no proxy configured), so that no network fails at once
    instead of after the Hub client's retries. Raises OSError when it cannot connect."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # the proxy resolves the host, not this machine
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    socket.create_connection((parts.hostname, port), timeout=timeout_s).close()


def download_text(url: str, timeout_s: float = 60.0) -> str:
    """The UTF-8 text at ``url`` (gunzipped when it ends in ``.gz``)."""
    import gzip
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        data = response.read()
    return (gzip.decompress(data) if url.endswith(".gz") else data).decode("utf-8")


def offline() -> bool:
    """Whether ``datasets`` (and so every recipe) is told to stay offline."""
    return "1" in (os.environ.get("HF_DATASETS_OFFLINE"), os.environ.get("HF_HUB_OFFLINE"))


def public(recipe: str, output: str, what: str, load: Callable[[], Any], url: str) -> Any:
    """``load()`` after :func:`probe` of ``url``, or one line naming ``--from`` when the public
    source cannot be reached (no network, offline mode, a moved file)."""
    try:
        if offline():
            raise ConnectionError("offline mode (HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is 1)")
        probe(url)
        return load()
    except Exception as err:  # any failure of the download: one line, the way out named
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise MissingInputError(
            f"{recipe}: cannot load {what} ({type(err).__name__}: {reason}); without network, "
            f"build from a local copy of the files: {data_command(recipe, output)} "
            f"--from DIR") from None


def progress_bar(iterable: Iterable, desc: str, total: Optional[int], enabled: bool):
    """A tqdm bar over ``iterable`` (tqdm imported only when a recipe runs)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, mininterval=1.0)


def write_manifest(output: str, recipe: Recipe, source: Optional[str], files: dict[str, Any],
                   **extra: Any) -> dict[str, Any]:
    """``output/<folder>/manifest.json``, written last: the recipe, its source (``public`` or
    the ``--from`` directory), each file's lines and sha256, and ``extra``. Returns it."""
    manifest = {"kind": "data", "recipe": recipe.name,
                "source": "public" if source is None else os.path.abspath(source),
                "command": data_command(recipe.name, output) + (
                    f" --from {source}" if source else ""),
                "files": files, **extra,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "realm_version": __version__}
    path = os.path.join(output, recipe.folder, MANIFEST)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(f"{path}.tmp", path)
    logger.info("%s: wrote %s into %s", recipe.name,
                ", ".join(f"{k} ({v['lines']:,} lines)" for k, v in files.items()), output)
    return manifest
