"""`realm.Searcher`: the retrieval API over a corpus gives what the evaluation path ranks (same
block ids and scores as `launch/evaluate.py retrieval`'s run file), with the lengths the
retriever was trained with; the run file's qrels score it as the report does."""

import json
import os

import numpy as np
import pytest

from realm.data.qa import read_qa
from realm.data.store import BlockStore
from realm.evaluate.cli import main as evaluate_main


@pytest.fixture(scope="module")
def run_dir(tiny_retriever, squad_tiny, tmp_path_factory):
    """A run directory as a stage leaves it: `retriever/` and the run's resolved `config.yaml`
    (its corpus; blocks read at 48 word pieces, fewer than the corpus's 160: the length
    matters)."""
    run = tmp_path_factory.mktemp("run")
    os.symlink(tiny_retriever, run / "retriever")
    (run / "config.yaml").write_text(f"corpus: {squad_tiny / 'corpus'}\nretriever:\n"
                                     "  max_query_tokens: 64\n  max_block_tokens: 48\n",
                                     encoding="utf-8")
    return run


def _evaluate(capsys, tmp_path, corpus, qa, *searcher):
    run_file = tmp_path / "run.trec"
    code = evaluate_main(["retrieval", *searcher, "--corpus", str(corpus), "--qa", str(qa),
                          "--k", "1,2,5", "--precision", "fp32", "--no-progress",
                          "--run-file", str(run_file)])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ranking: dict = {}
    for line in run_file.read_text().splitlines():
        qid, _, block, rank, score, _ = line.split()
        ranking.setdefault(qid, []).append((int(block), float(score)))
    return report, ranking


def test_a_dense_searcher_ranks_as_the_evaluation_does(squad_tiny, run_dir, tmp_path, capsys):
    from realm import Searcher
    from realm.retrieval.search import trained_lengths

    corpus = squad_tiny / "corpus"
    qa = read_qa(str(squad_tiny / "qa.jsonl"))
    store = BlockStore(corpus)
    assert trained_lengths(run_dir / "retriever", store) == (64, 48)  # the run's config
    # evaluate.py with no length flags reads the same trained lengths
    report, ranking = _evaluate(capsys, tmp_path, corpus, squad_tiny / "qa.jsonl",
                                "--retriever", str(run_dir))
    searcher = Searcher.from_pretrained(run_dir, precision="fp32")  # the run's corpus
    assert searcher.store.path == str(corpus)
    assert (searcher.max_query_tokens, searcher.max_block_tokens) == (64, 48)
    hits = searcher.batch_search([ex.question for ex in qa], k=5)
    assert len(hits) == len(qa) == report["questions"]
    for ex, n, mine in zip(qa, range(len(qa)), hits):
        theirs = ranking[ex.id or str(n)]
        assert [h.block_id for h in mine] == [b for b, _ in theirs]
        np.testing.assert_allclose([h.score for h in mine], [s for _, s in theirs], atol=2e-6)
        assert all(h.title == store.title(h.block_id) and h.text == store.text(h.block_id)
                   for h in mine)
    # the lengths matter: blocks read whole (the corpus's 160) rank differently
    whole = Searcher.from_pretrained(run_dir, corpus=corpus, precision="fp32",
                                     max_block_tokens=160)
    assert whole.search([ex.question for ex in qa], 5).block_ids.tolist() != [
        [h.block_id for h in row] for row in hits]


def test_bm25_searches_as_the_evaluation_does_and_qrels_score_the_run(squad_tiny, tmp_path,
                                                                       capsys):
    from realm import Searcher

    corpus = squad_tiny / "corpus"
    qa = read_qa(str(squad_tiny / "qa.jsonl"))
    report, ranking = _evaluate(capsys, tmp_path, corpus, squad_tiny / "qa.jsonl", "--bm25")
    searcher = Searcher.from_pretrained("BM25", corpus=str(corpus))
    for n, (ex, mine) in enumerate(zip(qa, searcher.batch_search([e.question for e in qa], 5))):
        theirs = ranking[ex.id or str(n)]
        assert [h.block_id for h in mine] == [b for b, _ in theirs]
        np.testing.assert_allclose([h.score for h in mine], [s for _, s in theirs], atol=2e-6)
    # qrels beside the run file: success@k recomputed from the two files is the answer recall
    assert report["qrels"] == str(tmp_path / "run.qrels")
    relevant: dict = {}
    for line in (tmp_path / "run.qrels").read_text().splitlines():
        qid, zero, block, rel = line.split()
        assert zero == "0" and rel in ("0", "1")
        relevant.setdefault(qid, {})[int(block)] = int(rel)
    assert set(relevant) == set(ranking)  # every question judged, its whole pool
    assert 0 < report["answer_recall@5"] < 1  # both kinds of judgement occur
    for k in (1, 2, 5):
        success = np.mean([any(relevant[q].get(b, 0) for b, _ in ranking[q][:k])
                           for q in ranking])
        assert round(float(success), 4) == report[f"answer_recall@{k}"]


def test_one_query_gives_hits_and_bad_names_are_one_clear_error(squad_tiny, tiny_retriever,
                                                                 tmp_path):
    from realm import Searcher

    corpus = squad_tiny / "corpus"
    store = BlockStore(corpus)
    searcher = Searcher.from_pretrained(tiny_retriever, corpus=store, precision="fp32")
    # no run config beside it: the corpus's block size, the default query length
    assert (searcher.max_query_tokens, searcher.max_block_tokens) == (64, 160)
    hits = searcher.search("Which NFL team won Super Bowl 50?", k=3)
    result = searcher.search(["Which NFL team won Super Bowl 50?"], 3)
    assert [h.block_id for h in hits] == result.block_ids[0].tolist()
    assert [h.score for h in hits] == pytest.approx(result.scores[0].tolist())
    assert hits[0].text == store.text(hits[0].block_id) and hits[0].title
    bm25 = Searcher.from_pretrained("bm25", corpus=corpus).search("Denver Broncos", k=2)
    assert len(bm25) == 2 and "Denver" in bm25[0].title + bm25[0].text
    with pytest.raises(ValueError, match="give corpus=DIR"):
        Searcher.from_pretrained(tiny_retriever)  # no run config beside it names one
    with pytest.raises(TypeError, match="list of queries"):
        searcher.batch_search("one string", 2)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        Searcher.from_pretrained(tmp_path / "nowhere", corpus=corpus)
    with pytest.raises(ValueError, match="kind is 'corpus', expected 'retriever'"):
        Searcher.from_pretrained(corpus, corpus=corpus)
    with pytest.raises(FileNotFoundError, match="not a saved retriever"):
        Searcher.from_pretrained(tmp_path, corpus=corpus)


def test_a_run_with_relative_paths_is_searched_from_another_directory(
        tiny_retriever, squad_tiny, tmp_path, monkeypatch):
    """A stage launched in LAUNCH saves `corpus: cache/corpus` and `train.run_dir: runs/x`,
    both relative to LAUNCH; `Searcher.from_pretrained(LAUNCH/runs/x)` from another directory
    finds the corpus (it failed naming `cache/corpus` before the launch directory was
    inferred)."""
    from realm import Searcher

    launch = tmp_path / "launch"
    (launch / "cache").mkdir(parents=True)
    os.symlink(squad_tiny / "corpus", launch / "cache" / "corpus")
    run = launch / "runs" / "x"
    run.mkdir(parents=True)
    os.symlink(tiny_retriever, run / "retriever")
    (run / "config.yaml").write_text("corpus: cache/corpus\ntrain:\n  run_dir: runs/x\n",
                                     encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    searcher = Searcher.from_pretrained(run, precision="fp32")
    assert os.path.samefile(searcher.store.path, squad_tiny / "corpus")
    hits = searcher.search("who", k=3)
    assert len(hits) == 3 and all(h.title for h in hits)
