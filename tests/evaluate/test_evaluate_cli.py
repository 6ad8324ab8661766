"""launch/evaluate.py end to end on a small real slice of SQuAD-open, and QA file errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from realm.errors import QAFormatError
from realm.data.qa import read_qa
from realm.index.mips import SearchResult

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def squad_slice(make_squad_slice, tmp_path_factory):
    """The first 120 SQuAD passages and 60 questions whose gold passage is among them."""
    return make_squad_slice(tmp_path_factory.mktemp("squad"), 120, slice(None, 60))


def _run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), *args, "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bm25_and_dense_reports(squad_slice, tiny_encoder):
    bm25 = _run("retrieval", "--bm25", "--corpus", str(squad_slice / "corpus"),
                "--qa", str(squad_slice / "qa.jsonl"), "--k", "1,5,20")
    assert bm25.returncode == 0, bm25.stderr[-2000:]
    b = json.loads(bm25.stdout.strip().splitlines()[-1])
    assert b["questions"] == 60 and b["blocks"] >= 120
    assert b["gold_recall@20"] > 0.8  # these questions were written against these passages
    assert b["answer_recall@1"] <= b["answer_recall@5"] <= b["answer_recall@20"]
    dense = _run("retrieval", "--retriever", tiny_encoder, "--corpus", str(squad_slice / "corpus"),
                 "--qa", str(squad_slice / "qa.jsonl"), "--k", "1,5,20")
    assert dense.returncode == 0, dense.stderr[-2000:]
    d = json.loads(dense.stdout.strip().splitlines()[-1])
    assert d["questions"] == 60 and "gold_recall@20" in d and "seconds" in d
    assert d["gold_recall@20"] < b["gold_recall@20"]  # an untrained 2-layer model vs BM25


@pytest.mark.slow
def test_trec_run_file_is_the_ranking_behind_the_recall(squad_slice, tmp_path):
    """`retrieval --run-file` writes `QID Q0 BLOCK RANK SCORE RUN` lines that trec_eval reads:
    20 per question, ranks 1..20, scores not increasing, and the figures recomputed from it
    equal the printed ones."""
    from realm.data.store import BlockStore
    from realm.metrics import answer_hits, recall_at_k

    run_file = tmp_path / "bm25.run"
    out = _run("retrieval", "--bm25", "--corpus", str(squad_slice / "corpus"),
               "--qa", str(squad_slice / "qa.jsonl"), "--k", "1,5,20", "--run-file", str(run_file))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["run_file"] == str(run_file)
    rows = [line.split() for line in run_file.read_text().splitlines()]
    assert all(len(r) == 6 and r[1] == "Q0" and r[5] == "bm25" for r in rows)
    qa = read_qa(str(squad_slice / "qa.jsonl"))
    store = BlockStore(squad_slice / "corpus")
    by_query: dict = {}
    for qid, _, block, rank, score, _ in rows:
        by_query.setdefault(qid, []).append((int(rank), int(block), float(score)))
    assert list(by_query) == [ex.id or str(n) for n, ex in enumerate(qa)]
    ranked = []
    for hits in by_query.values():
        assert [r for r, _, _ in hits] == list(range(1, 21))
        scores = [s for _, _, s in hits]
        assert scores == sorted(scores, reverse=True)
        assert all(0 <= b < len(store) for _, b, _ in hits)
        ranked.append([store.text(b) for _, b, _ in hits])
    again = recall_at_k(answer_hits(ranked, [ex.answers for ex in qa]), [1, 5, 20])
    assert {f"answer_recall@{k}": round(v, 4) for k, v in again.items()} == {
        k: report[k] for k in ("answer_recall@1", "answer_recall@5", "answer_recall@20")}


def test_each_mode_has_its_own_help():
    retrieval = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), "retrieval",
                                "--help"], capture_output=True, text=True, timeout=60)
    assert retrieval.returncode == 0 and "--run-file" in retrieval.stdout
    assert "--queries" not in retrieval.stdout and "--model" not in retrieval.stdout
    openqa = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), "openqa",
                             "--corpus", "c", "--qa", "q"], capture_output=True, text=True,
                            timeout=60)
    assert openqa.returncode == 2 and "--model" in openqa.stderr


@pytest.mark.slow
def test_retrieval_accepts_a_run_directory(squad_slice, tiny_retriever, tmp_path):
    """`--retriever RUN_DIR` (a pretraining or ICT run) reads the run's `retriever/`."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.symlink(tiny_retriever, run_dir / "retriever")
    args = ("--corpus", str(squad_slice / "corpus"), "--qa", str(squad_slice / "qa.jsonl"),
            "--k", "1,5")
    by_run = _run("retrieval", "--retriever", str(run_dir), *args)
    direct = _run("retrieval", "--retriever", tiny_retriever, *args)
    assert by_run.returncode == 0 and direct.returncode == 0, by_run.stderr[-2000:]
    a, b = (json.loads(x.stdout.strip().splitlines()[-1]) for x in (by_run, direct))
    assert {k: v for k, v in a.items() if "recall" in k} == {
        k: v for k, v in b.items() if "recall" in k}


@pytest.mark.slow
def test_ict_mode_bm25_finds_whole_sentences(squad_slice):
    out = _run("ict", "--bm25", "--corpus", str(squad_slice / "corpus"), "--holdout", "30", "--k", "1,5")
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["queries"] == 30 and r["ict_recall@5"] > 0.8  # the sentence is in its block


@pytest.mark.slow
def test_bad_qa_file_names_the_line(squad_slice, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q1", "answers": ["a"]}\n{"question": "q2", "answers": []}\n')
    with pytest.raises(QAFormatError, match=r"bad.jsonl:2: field 'answers'"):
        read_qa(str(bad))
    out = _run("retrieval", "--bm25", "--corpus", str(squad_slice / "corpus"), "--qa", str(bad))
    assert out.returncode == 1 and "bad.jsonl:2" in out.stderr


def test_nq_open_answer_field_is_read(shared_data):
    qa = read_qa(str(shared_data / "openqa" / "nq_open_dev_dpr.jsonl"), limit=5)
    assert len(qa) == 5 and all(q.answers for q in qa)


class _Fixed:
    """A searcher with a fixed ranking per query (for fusion arithmetic)."""

    def __init__(self, rankings):
        self.rankings = np.asarray(rankings, np.int64)

    def search(self, texts, k):
        ids = self.rankings[: len(texts), :k]
        return SearchResult(-np.arange(ids.shape[1], dtype=float)[None].repeat(len(ids), 0), ids)


def test_reciprocal_rank_fusion_arithmetic():
    from realm.retrieval.search import FusionSearcher

    a = _Fixed([[1, 2, 3, -1]])
    b = _Fixed([[3, 4, 1, 2]])
    scores, ids = FusionSearcher([a, b], depth=4, k_rrf=60).search(["q"], 4)
    # block 1: 1/61 + 1/63; block 3: 1/63 + 1/61 (a tie, the smaller id first); 2: 1/62 + 1/64
    assert ids[0].tolist() == [1, 3, 2, 4]
    assert scores[0, 0] == pytest.approx(1 / 61 + 1 / 63) and scores[0, 3] == pytest.approx(1 / 62)
    same = FusionSearcher([a, a], depth=4).search(["q"], 3)[1]
    assert same[0].tolist() == [1, 2, 3]  # fusing a ranking with itself keeps it
    with pytest.raises(ValueError, match="two"):
        FusionSearcher([a])


@pytest.mark.slow
def test_fusion_of_bm25_and_a_retriever_from_the_cli(squad_slice, tiny_retriever):
    args = ("--corpus", str(squad_slice / "corpus"), "--qa", str(squad_slice / "qa.jsonl"),
            "--k", "1,5,20")
    fused = _run("retrieval", "--retriever", tiny_retriever, "--fuse-bm25", *args)
    dense = _run("retrieval", "--retriever", tiny_retriever, *args)
    assert fused.returncode == 0 and dense.returncode == 0, fused.stderr[-2000:]
    f, d = (json.loads(x.stdout.strip().splitlines()[-1]) for x in (fused, dense))
    assert f["retriever"].startswith("rrf(") and f["questions"] == 60
    # BM25 finds these questions' passages (> 0.8 at 20): fused with it, an untrained model
    # ranks far better than alone
    assert f["gold_recall@20"] > d["gold_recall@20"] + 0.2
    bad = _run("retrieval", "--bm25", "--fuse-bm25", *args)
    assert bad.returncode == 2 and "--fuse-bm25" in bad.stderr


@pytest.mark.slow
def test_retrieval_compare_with_reports_the_paired_sign_test(squad_slice, tiny_retriever):
    """`retrieval --compare-with bm25` scores both on the same questions: per k, questions
    gained and lost, and the sign test; the figures agree with the two separate runs."""
    args = ("--corpus", str(squad_slice / "corpus"), "--qa", str(squad_slice / "qa.jsonl"),
            "--k", "1,5")
    out = _run("retrieval", "--retriever", tiny_retriever, "--compare-with", "bm25", *args)
    alone = _run("retrieval", "--bm25", *args)
    assert out.returncode == 0 and alone.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    bm25 = json.loads(alone.stdout.strip().splitlines()[-1])
    paired = report["paired"]
    assert paired["before"] == "bm25" and set(paired) == {"before", "answer", "gold"}
    for k in ("1", "5"):
        cell = paired["gold"][k]
        assert cell["before"] == bm25[f"gold_recall@{k}"]
        assert cell["after"] == report[f"gold_recall@{k}"]
        assert cell["after"] - cell["before"] == pytest.approx((cell["gained"] - cell["lost"]) / 60,
                                                               abs=1e-3)
    assert paired["gold"]["5"]["lost"] > paired["gold"]["5"]["gained"]  # BM25 wins here
    assert paired["gold"]["5"]["p_value"] < 0.01


@pytest.mark.slow
def test_compare_reports_paired_exact_match_and_refuses_other_questions(tmp_path):
    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"question": q, "prediction": "x", "gold": ["x"],
                                            "exact_match": em, "f1": f1}) + "\n"
                                for q, em, f1 in rows))
        return str(path)

    questions = [f"q{i}?" for i in range(6)]
    before = write("a.jsonl", [(q, i == 0, 1.0 if i == 0 else 0.0) for i, q in enumerate(questions)])
    # after: keeps q0, gains q1-q3 (one with partial F1 only: no gain), loses nothing
    after = write("b.jsonl", [(q, i in (0, 1, 2, 3), 1.0 if i < 4 else 0.5)
                              for i, q in enumerate(questions)])

    def compare(*paths):
        return subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), "compare",
                               *paths], capture_output=True, text=True, timeout=60)

    done = compare(before, after)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["questions"] == 6
    assert out["exact_match"] == {"before": round(1 / 6, 4), "after": round(4 / 6, 4),
                                  "gained": 3, "lost": 0, "p_value": 0.25}  # 2 * (1/2)^3
    assert out["f1"] == {"before": round(1 / 6, 4), "after": round(5 / 6, 4)}
    swapped = json.loads(compare(after, before).stdout.strip().splitlines()[-1])
    assert (swapped["exact_match"]["gained"], swapped["exact_match"]["lost"]) == (0, 3)
    other = write("c.jsonl", [("another?", False, 0.0)] + [(q, False, 0.0) for q in questions[1:]])
    bad = compare(before, other)
    assert bad.returncode == 1 and f"{other}:1" in bad.stderr and "different questions" in bad.stderr
    broken = tmp_path / "d.jsonl"
    broken.write_text(open(before).read() + '{"question": "q6?"}\n')
    bad = compare(str(broken), after)
    assert bad.returncode == 1 and f"{broken}:7" in bad.stderr and "Traceback" not in bad.stderr
