"""Data recipes (``python -m realm data NAME``): SQuAD-open and Leads-Open rebuilt from local
copies reproduce the shared files byte for byte; an unreachable public source, a local copy that
lacks a file and a stage whose inputs are missing each fail in one line naming the way out."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from realm.config import load_config
from realm.data.recipes import RECIPES, build, check_inputs, input_paths
from realm.data.recipes.inputs import maker
from realm.data.recipes.leads import AnswerIndex, answer_tokens, dev_quota, split_leads
from realm.data.recipes.squad import TEST_TITLES, articles_from_rows, squad_open
from realm.errors import MissingInputError, QAFormatError

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# ---------------------------------------------------------------------------------------------
# SQuAD-open


def test_squad_open_from_a_local_copy_reproduces_the_shared_files(shared_data, tmp_path):
    manifest = build("squad-open", str(tmp_path), source=str(shared_data), progress=False)
    for name in ("passages", "qa_train", "qa_dev"):
        made = tmp_path / "squad_open" / f"{name}.jsonl"
        assert made.read_bytes() == (shared_data / "squad_open" / f"{name}.jsonl").read_bytes()
    assert {k: v["lines"] for k, v in manifest["files"].items()} == {
        "squad_open/passages.jsonl": 2067, "squad_open/qa_train.jsonl": 8595,
        "squad_open/qa_dev.jsonl": 712}
    assert not (tmp_path / "squad_open" / "qa_test.jsonl").exists()  # the copy has no test
    assert json.loads((tmp_path / "squad_open" / "manifest.json").read_text()) == manifest


def _squad_json(shared_data):
    """SQuAD v1.1 dev's json as the original file has it, rebuilt from the shared passages and
    questions: titles with underscores, answers as {text, answer_start} with SQuAD's repeats, and
    one made-up question per paragraph of the 4 held-out articles (their questions are not
    shared)."""
    articles, by_id = [], {}
    for p in _lines(shared_data / "squad_open" / "passages.jsonl"):
        if not articles or articles[-1]["title"] != p["title"].replace(" ", "_"):
            articles.append({"title": p["title"].replace(" ", "_"), "paragraphs": []})
        by_id[p["id"]] = {"context": p["text"], "qas": []}
        articles[-1]["paragraphs"].append(by_id[p["id"]])
        if p["title"] in TEST_TITLES:
            by_id[p["id"]]["qas"].append({"id": f"test-{p['id']}", "question": "Which article?",
                                          "answers": [{"text": p["title"], "answer_start": 0}]})
    for split in ("qa_train", "qa_dev"):
        for q in _lines(shared_data / "squad_open" / f"{split}.jsonl"):
            answers = [{"text": a, "answer_start": 0} for a in q["answers"]]
            by_id[q["gold_passage"]]["qas"].append(
                {"id": q["id"], "question": q["question"], "answers": answers + answers[:1]})
    return articles


def test_squad_open_from_squads_own_json_splits_by_article(shared_data, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    articles = _squad_json(shared_data)
    (raw / "dev-v1.1.json").write_text(json.dumps({"version": "1.1", "data": articles}))
    manifest = build("squad-open", str(tmp_path / "out"), source=str(raw), progress=False)
    for name in ("passages", "qa_train", "qa_dev"):
        made = tmp_path / "out" / "squad_open" / f"{name}.jsonl"
        assert made.read_bytes() == (shared_data / "squad_open" / f"{name}.jsonl").read_bytes()
    test = _lines(tmp_path / "out" / "squad_open" / "qa_test.jsonl")
    passages = {p["id"]: p for p in _lines(tmp_path / "out" / "squad_open" / "passages.jsonl")}
    assert {q["title"] for q in test} == set(TEST_TITLES)
    assert len(test) == sum(p["title"] in TEST_TITLES for p in passages.values())
    assert all(passages[q["gold_passage"]]["title"] == q["title"] for q in test)
    assert manifest["files"]["squad_open/qa_test.jsonl"]["lines"] == len(test)
    # the datasets rows (one per question) regroup into the same articles and the same files
    rows = [{"id": qa["id"], "title": a["title"], "context": p["context"],
             "question": qa["question"], "answers": {"text": [x["text"] for x in qa["answers"]]}}
            for a in articles for p in a["paragraphs"] for qa in p["qas"]]
    assert squad_open(articles_from_rows(rows)) == squad_open(articles)


def test_other_articles_than_squad_dev_are_refused(shared_data):
    articles = _squad_json(shared_data)
    with pytest.raises(QAFormatError, match=r"not SQuAD v1\.1 dev: 47 articles.*'Force'"):
        squad_open(articles[:-1])


# ---------------------------------------------------------------------------------------------
# Leads-Open


def test_leads_open_rebuilt_from_the_shipped_question_sets_reproduces_the_split(shared_data,
                                                                               tmp_path):
    manifest = build("leads-open", str(tmp_path), source=str(shared_data), progress=False)
    for name in ("train", "dev"):
        made = tmp_path / "openqa_leads" / f"{name}.jsonl"
        assert made.read_bytes() == (shared_data / "openqa_leads" / f"{name}.jsonl").read_bytes()
    for name in ("nq_open_dev_dpr", "trivia_open_dev_dpr", "wq_train", "efficientqa_dev"):
        made = tmp_path / "openqa" / f"{name}.jsonl"
        assert made.read_bytes() == (shared_data / "openqa" / f"{name}.jsonl").read_bytes()
    assert manifest["counts"]["dev"] == {"nq": 446, "trivia": 674, "wq": 276, "efficientqa": 104}
    assert manifest["n_lead_sections"] == 10033 and manifest["seed"] == 20261201


def test_answers_match_whole_runs_of_letter_and_digit_tokens():
    assert answer_tokens("Weekly Shōnen Jump: $20, The-Dream") == [
        "weekly", "sho", "nen", "jump", "20", "the", "dream"]
    index = AnswerIndex(["Weekly Shōnen Jump costs $20.", "Chicago Bulls"])
    assert "Shō" in index and "shonen" not in index  # the accent ends a token
    assert "$20" in index and "jump costs 20" in index and "JUMP" in index
    assert "costs jump" not in index and "#" not in index  # order counts; no token: no match
    assert "20 Chicago" not in index  # never across two passages
    assert index.has_answer(["nowhere", "Bulls"]) and not index.has_answer(["Bull"])


def test_the_split_is_stratified_by_source_and_deterministic():
    questions = [{"question": f"q{i}", "answers": ["a"], "source": s}
                 for s, n in (("a", 50), ("b", 30), ("c", 20)) for i in range(n)]
    train, dev = split_leads(questions, dev_size=10, seed=1)
    assert sorted(q["source"] for q in dev) == ["a"] * 5 + ["b"] * 3 + ["c"] * 2
    assert sorted(map(id, train + dev)) == sorted(map(id, questions))
    assert (train, dev) == split_leads(questions, dev_size=10, seed=1)
    assert dev != split_leads(questions, dev_size=10, seed=2)[1]
    assert dev_quota({"a": 1, "b": 1, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}
    assert dev_quota({"x": 4603, "y": 3046, "z": 1881, "w": 708}, 1500) == {
        "x": 674, "y": 446, "z": 276, "w": 104}


# ---------------------------------------------------------------------------------------------
# Failures: one line naming the way out


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_an_unreachable_public_source_is_one_line_naming_from(name, tmp_path):
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "realm", "data", name, "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env=ENV, cwd=tmp_path)
    assert done.returncode == 1 and time.monotonic() - t0 < 30
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"realm data {name} --output {tmp_path / 'out'} --from DIR" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_local_copy_without_a_file_names_it(tmp_path):
    (tmp_path / "copy" / "openqa").mkdir(parents=True)
    with pytest.raises(MissingInputError, match="openqa/nq_open_dev_dpr.jsonl: no such file"):
        build("leads-open", str(tmp_path / "out"), source=str(tmp_path / "copy"))
    with pytest.raises(MissingInputError, match="holds neither dev-v1.1.json"):
        build("squad-open", str(tmp_path / "out"), source=str(tmp_path / "copy"))
    (tmp_path / "copy" / "openqa" / "nq_open_dev_dpr.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(QAFormatError, match=r"nq_open_dev_dpr.jsonl:1: expected an object with"):
        build("leads-open", str(tmp_path / "out"), source=str(tmp_path / "copy"))


@pytest.mark.parametrize("script,recipe,path", [
    ("finetune_openqa.py", "squad-open", "data/squad_open/qa_train.jsonl"),
    ("train_retriever.py", "leads-open", "data/openqa_leads/train.jsonl")])
def test_a_missing_qa_file_fails_in_seconds_through_the_launch_script(script, recipe, path,
                                                                     tmp_path):
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "launch" / script), "--no-progress"],
                          capture_output=True, text=True, timeout=120, env=ENV, cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert done.returncode == 1 and elapsed < 5, (elapsed, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert path in lines[0] and f"python -m realm data {recipe} --output data" in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing built before the check


def test_inputs_are_checked_through_the_warm_start_and_pass_once_built(shared_data, tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' data/... paths are relative to the working dir
    squad = load_config(REPO / "configs" / "openqa_squad.yaml")
    with pytest.raises(MissingInputError) as err:
        check_inputs(squad, "finetune_openqa")
    assert str(err.value).count("does not exist") == 3
    assert str(err.value).endswith("make them with: python -m realm data squad-open --output data "
                                   "(no network: add --from DIR, a local copy)")
    leads = load_config(REPO / "configs" / "openqa_leads.yaml", [
        f"openqa.train_qa={shared_data / 'openqa_leads' / 'train.jsonl'}",
        f"openqa.dev_qa={shared_data / 'openqa_leads' / 'dev.jsonl'}",
        f"openqa.reader_warm_start={REPO / 'configs' / 'openqa_squad.yaml'}"])
    with pytest.raises(MissingInputError, match=r"openqa_squad.yaml\): openqa.train_qa: "
                                                r"data/squad_open/qa_train.jsonl does not exist"):
        check_inputs(leads, "finetune_openqa")
    build("squad-open", "data", source=str(shared_data), progress=False)
    check_inputs(squad, "finetune_openqa")
    check_inputs(leads, "finetune_openqa")
    check_inputs(squad, "train_retriever")  # reads data.input only
    with pytest.raises(MissingInputError, match="corpus: nowhere: not a corpus directory"):
        check_inputs(load_config(overrides=["corpus=nowhere"]), "pretrain")


def test_the_data_command_is_read_off_the_missing_path():
    recipes = RECIPES.values()
    assert maker("data/squad_open/qa_dev.jsonl", recipes) == \
        "python -m realm data squad-open --output data"
    assert maker("/x/y/openqa_leads/dev.jsonl", recipes) == \
        "python -m realm data leads-open --output /x/y"
    assert maker("openqa_leads/train.jsonl", recipes) == \
        "python -m realm data leads-open --output ."
    assert maker("data/openqa/wq_train.jsonl", recipes) == \
        "python -m realm data leads-open --output data"
    assert maker("data/elsewhere/dev.jsonl", recipes) is None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_reads_only_what_a_recipe_makes(path):
    assert "../shared" not in path.read_text(encoding="utf-8")
    config = load_config(path)
    stage = "train_retriever" if config.retriever_training.train_qa else "finetune_openqa"
    inputs = [(key, p) for key, p, _ in input_paths(config, stage)
              if key != "openqa.reader_warm_start" and p != "/path/to/enwiki.jsonl.gz"]
    assert all(maker(p, RECIPES.values()) and p.startswith("data/") for _, p in inputs), inputs


def test_python_m_realm_data_writes_the_files_and_a_summary_line(shared_data, tmp_path):
    shutil.copytree(shared_data / "squad_open", tmp_path / "copy" / "squad_open")
    done = subprocess.run([sys.executable, "-m", "realm", "data", "squad-open", "--output",
                           "data", "--from", "copy", "--no-progress"], capture_output=True,
                          text=True, timeout=120, env=ENV, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["files"] == {"squad_open/passages.jsonl": 2067,
                                "squad_open/qa_train.jsonl": 8595, "squad_open/qa_dev.jsonl": 712}
    assert summary["manifest"] == "data/squad_open/manifest.json"
    assert (tmp_path / "data" / "squad_open" / "qa_dev.jsonl").read_bytes() == \
        (shared_data / "squad_open" / "qa_dev.jsonl").read_bytes()
