"""``python -m realm data NAME [--output DIR] [--from LOCAL_DIR]``: build the files a shipped
config reads (``launch/get_data.py`` runs the same).

    python -m realm data squad-open --output data                       # from the public sources
    python -m realm data leads-open --output data --from ../copy/of/data  # no network

The last stdout line is one JSON object: the files written with their line counts and the
manifest's path (``DIR/<folder>/manifest.json``: sources, sha256 of each file, counts). Exit 1 with one line for a source that
cannot be reached (naming ``--from``) or a local copy that lacks a file or has a bad record.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from realm.cli import emit_summary, print_error, setup_logging
from realm.data.recipes import RECIPES, build
from realm.data.recipes.common import MANIFEST
from realm.errors import CorpusFormatError, MissingInputError, QAFormatError

logger = logging.getLogger("realm.data")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m realm data",
        description="Build the data files a shipped config reads, from their public sources "
                    "or from a local copy (--from).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="recipes:\n" + "\n".join(f"  {r.name:12s} {r.description}"
                                        for r in RECIPES.values()))
    parser.add_argument("name", choices=sorted(RECIPES), metavar="NAME",
                        help="the recipe: " + ", ".join(RECIPES))
    parser.add_argument("--output", default="data",
                        help="where the files go (default: data, where the configs look)")
    parser.add_argument("--from", dest="source", metavar="LOCAL_DIR",
                        help="build from a local directory holding the same files (e.g. "
                             "squad_open/*.jsonl, openqa/*.jsonl) instead of the public sources")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        manifest = build(args.name, args.output, args.source, progress=not args.no_progress)
    except (MissingInputError, QAFormatError, CorpusFormatError) as err:
        print_error(parser.prog, err)
        return 1
    emit_summary({"recipe": args.name, "output": args.output, "source": manifest["source"],
                  "files": {path: f["lines"] for path, f in manifest["files"].items()},
                  "manifest": os.path.join(args.output, RECIPES[args.name].folder, MANIFEST)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
