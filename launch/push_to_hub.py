"""Upload a model directory realm wrote (a retriever, a knowledge-augmented encoder, a reader or
an Open-QA model; its model card, manifest, weights and tokenizer) to the Hugging Face Hub.

    python launch/push_to_hub.py runs/dpr-leads/retriever USER/realm-dpr-leads [--private]
    python launch/push_to_hub.py DIR REPO_ID --dry-run        # list the files, upload nothing

Needs a login (`huggingface-cli login` or HF_TOKEN) and the network; with HF_HUB_OFFLINE set it
stops with a clear error. The last stdout line is a JSON summary.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="a model directory (holding manifest.json)")
    parser.add_argument("repo_id", help="the Hub repository, USER/NAME")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--dry-run", action="store_true", help="list the files and stop")
    args = parser.parse_args(argv)
    from realm.cli import emit_summary
    from realm.hub import files_to_push, push_to_hub

    try:
        files = files_to_push(args.directory)
        if args.dry_run:
            emit_summary({"repo_id": args.repo_id, "files": files, "uploaded": False})
            return 0
        url = push_to_hub(args.directory, args.repo_id, private=args.private)
    except (ValueError, RuntimeError) as err:
        print(f"push_to_hub: error: {err}", file=sys.stderr)
        return 1
    emit_summary({"repo_id": args.repo_id, "url": url, "files": files, "uploaded": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
