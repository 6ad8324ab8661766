"""Build the wiki-signal experiment's corpora: X (lead sections, train and held-out) and Z.

    python launch/prepare_wiki_signal.py --output runs/corpus/signal [--heldout 200] \
        [--z-chars 2000] [--seed 0] [--span-max-articles N] \
        [--config configs/wiki_signal_data.yaml] [key=value ...]

X = lead sections whose titles are also 2015 articles (salient spans); Z = the first ~z-chars
characters of those 2015 articles. The last stdout line is a JSON summary (matched titles,
train/held-out titles, blocks and spans per corpus, seconds).
"""

import os
import sys

from realm.cli import config_parser, emit_summary, parse
from realm.data.build import OutputExistsError
from realm.data.readers import CorpusFormatError
from realm.data.signal import build_signal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKI = os.path.join(os.path.dirname(REPO), "shared", "data", "wikipedia")


def main(argv=None) -> int:
    parser = config_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(config=os.path.join(REPO, "configs", "wiki_signal_data.yaml"))
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--leads", default=os.path.join(WIKI, "vital_level4_summaries_en.jsonl"),
                        help="lead sections (X)")
    parser.add_argument("--articles",
                        default=os.path.join(WIKI, "enwiki2015_first30k_articles.jsonl.gz"),
                        help="articles of another version (Z)")
    parser.add_argument("--heldout", type=int, default=200, help="matched titles held out")
    parser.add_argument("--z-chars", type=int, default=2000, help="characters of an article in Z")
    parser.add_argument("--min-z-chars", type=int, default=200,
                        help="drop titles whose cut article is shorter")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/held-out split")
    parser.add_argument("--span-max-articles", type=int, default=None, metavar="N",
                        help="keep only the X spans that the same title's Z article holds and "
                             "that at most N Z articles hold (default: keep every span)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace corpora built from other inputs or parameters")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args, config = parse(parser, argv)
    try:
        summary = build_signal(args.leads, args.articles, args.output, config.data, config.spans,
                               heldout=args.heldout, z_chars=args.z_chars,
                               min_z_chars=args.min_z_chars, seed=args.seed,
                               overwrite=args.overwrite, progress=not args.no_progress,
                               span_max_articles=args.span_max_articles)
    except (CorpusFormatError, OutputExistsError, ValueError) as err:
        print(f"prepare_wiki_signal: error: {err}", file=sys.stderr)
        return 1
    emit_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
