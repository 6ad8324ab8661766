"""Upload a model directory realm wrote (a retriever, a knowledge-augmented encoder, a reader or
an Open-QA model; its model card, manifest, weights and tokenizer) to the Hugging Face Hub.

    python launch/push_to_hub.py runs/dpr-leads/retriever USER/realm-dpr-leads [--private]
    python launch/push_to_hub.py runs/openqa/model USER/realm-qa --corpus-repo USER/realm-corpus
    python launch/push_to_hub.py runs/openqa/model USER/realm-qa --with-corpus
    python launch/push_to_hub.py DIR REPO_ID --dry-run        # list the files, upload nothing
    python launch/push_to_hub.py DIR REPO_ID --to-dir OUT     # write the repositories to OUT/

An Open-QA model answers from its corpus: `--corpus-repo` publishes the corpus as a datasets
repository first (Parquet that `datasets.load_dataset` reads, and the block store realm reads)
and names it in the pushed model's manifest; `--with-corpus` puts it inside the model
repository instead. Needs a login (`huggingface-cli login` or HF_TOKEN) and the network; with
HF_HUB_OFFLINE set it stops with a clear error (`--to-dir` works offline). The last stdout line
is a JSON summary.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="a model directory (holding manifest.json)")
    parser.add_argument("repo_id", help="the Hub repository, USER/NAME")
    parser.add_argument("--private", action="store_true", help="create the repositories private")
    parser.add_argument("--dry-run", action="store_true", help="list the files and stop")
    parser.add_argument("--corpus-repo", metavar="USER/NAME",
                        help="an Open-QA model: publish its corpus as this datasets repository")
    parser.add_argument("--with-corpus", action="store_true",
                        help="an Open-QA model: put its corpus inside the model repository")
    parser.add_argument("--to-dir", metavar="DIR",
                        help="write the repositories under DIR (DIR/NAME) instead of uploading")
    args = parser.parse_args(argv)
    from realm.cli import emit_summary
    from realm.data.publish import publish

    if args.corpus_repo and args.with_corpus:
        print("push_to_hub: error: give --corpus-repo or --with-corpus, not both",
              file=sys.stderr)
        return 1
    try:
        summary = publish(args.directory, args.repo_id, corpus_repo=args.corpus_repo,
                          bundle_corpus=args.with_corpus, to_dir=args.to_dir,
                          private=args.private, dry_run=args.dry_run)
    except (ValueError, RuntimeError, FileNotFoundError, FileExistsError) as err:
        print(f"push_to_hub: error: {err}", file=sys.stderr)
        return 1
    emit_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
