"""Build a corpus directory: blocks of word pieces with salient spans.

    python launch/prepare_corpus.py --input package:wiki-leads \
        --output runs/corpus/leads [--config configs/corpus.yaml] [key=value ...]

The last stdout line is a JSON summary (articles, blocks, spans, skipped records, seconds).
`--parquet FILE` also writes the blocks (id, article_id, title, text, spans) as Parquet, for
`datasets.load_dataset("parquet", data_files=FILE)` or pandas; from Python,
`BlockStore(DIR).to_dataset()` gives the same table as a `datasets.Dataset`.
"""

import sys

from realm.cli import config_parser, emit_summary, override, parse
from realm.errors import OutputExistsError
from realm.data.build import build_corpus
from realm.errors import CorpusFormatError


def main(argv=None) -> int:
    parser = config_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="corpus file/directory (sets data.input)")
    parser.add_argument("--output", required=True, help="corpus directory to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing corpus built from other inputs or parameters")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--parquet", metavar="FILE",
                        help="also export the blocks (id, article_id, title, text, spans) as Parquet")
    args, config = parse(parser, argv,
                         lambda a: [override("data.input", a.input)] if a.input else [])
    try:
        summary = build_corpus(config.data, config.spans, args.output, overwrite=args.overwrite,
                               config_yaml=config.to_yaml(), progress=not args.no_progress)
        if args.parquet:
            from realm.data.store import BlockStore

            summary["parquet"] = BlockStore(args.output).to_parquet(args.parquet)
    except (CorpusFormatError, OutputExistsError, ValueError, OSError) as err:
        # (OSError: an output under a file, a read-only or full disk; the message names the path)
        print(f"prepare_corpus: error: {err}", file=sys.stderr)
        return 1
    emit_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
