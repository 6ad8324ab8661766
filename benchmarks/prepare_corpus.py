"""Corpus-build throughput: blocks/s, NER sentences/s against a bare ``nlp.pipe``, peak RSS.

    python benchmarks/prepare_corpus.py [--n-process 1] [--batch-size 512]
    python benchmarks/prepare_corpus.py --input enwiki2015_first30k_articles.jsonl.gz --slice 3000

For each corpus (the 10k lead sections; with ``--input``, also the first ``--slice`` articles of
that file, e.g. a local copy of the 2015 Wikipedia sample)
it builds a corpus directory with ``realm.data.build.build_corpus`` and then, in the same process,
runs a bare ``nlp.pipe`` over exactly the sentences the build saw. ``ner_ratio`` is the build's
sentences/s over the bare pipe's sentences/s: how close the whole pipeline (reading, tokenizing,
blocking, aligning, writing) runs to spaCy alone. Prints one JSON object.
"""

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time

from realm.config import DataConfig, SpansConfig
from realm.data.blocks import split_sentences
from realm.data.build import build_corpus
from realm.data.readers import CorpusReader
from realm.data.spans import load_ner

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(name: str, source: str, max_articles, args) -> dict:
    data = DataConfig(input=source, max_articles=max_articles, on_bad_record="skip")
    spans = SpansConfig(n_process=args.n_process, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = build_corpus(data, spans, os.path.join(tmp, "c"), progress=False)
        build_s = time.perf_counter() - t0
        with open(os.path.join(tmp, "c", "manifest.json")) as f:
            manifest = json.load(f)
    rss_build = peak_rss_mb()
    sentences = []
    for article in CorpusReader(source, on_bad_record="skip", max_articles=max_articles):
        sentences.extend(article.text[s:e] for s, e in split_sentences(article.text))
    nlp = load_ner(spans.spacy_model)
    t0 = time.perf_counter()
    for _ in nlp.pipe(sentences, batch_size=args.batch_size, n_process=args.n_process):
        pass
    bare_s = time.perf_counter() - t0
    n_sent = manifest["counts"]["sentences"]
    assert n_sent == len(sentences), (n_sent, len(sentences))
    return {
        "corpus": name,
        "articles": summary["articles"],
        "blocks": summary["blocks"],
        "spans": summary["spans"],
        "spans_per_block": round(summary["spans"] / summary["blocks"], 3),
        "spans_per_block_by_label": {k: round(v / summary["blocks"], 3)
                                     for k, v in summary["spans_by_label"].items()},
        "sentences": n_sent,
        "build_s": round(build_s, 2),
        "timings": manifest["timings"],
        "blocks_per_s": round(summary["blocks"] / build_s, 1),
        "ner_sentences_per_s": round(n_sent / build_s, 1),
        "bare_nlp_pipe_sentences_per_s": round(n_sent / bare_s, 1),
        "ner_ratio": round((n_sent / build_s) / (n_sent / bare_s), 3),
        "peak_rss_mb_after_build": round(rss_build, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="a second corpus input (file, directory, hf:NAME) to "
                                        "build beside the lead sections")
    parser.add_argument("--slice", type=int, default=3000, help="articles of --input")
    parser.add_argument("--n-process", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = [bench("wiki_leads_10k", "package:wiki-leads", None, args)]
    if args.input:
        name = os.path.basename(args.input.rstrip("/")).split(".")[0]
        results.append(bench(f"{name}_first{args.slice}", args.input, args.slice, args))
    print(json.dumps({"benchmark": "prepare_corpus", "n_process": args.n_process,
                      "batch_size": args.batch_size, "results": results,
                      "peak_rss_mb": round(peak_rss_mb(), 1)}))


if __name__ == "__main__":
    sys.exit(main())
