"""QA files: formats, regular-expression answers, bad records named by file and line."""

import pytest

from realm.errors import QAFormatError
from realm.data.qa import BlockTexts, read_qa
from realm.data.store import BlockStore
from realm.hub import load_tokenizer


def _write(tmp_path, text, name="qa.jsonl"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_answers_answer_and_gold_passage(tmp_path):
    path = _write(tmp_path, '{"question": " Who? ", "answers": ["A", "B"], "gold_passage": 7}\n\n'
                            '{"question": "Where?", "answer": "Paris", "id": 3}\n')
    qa = read_qa(path)
    assert [(q.question, q.answers, q.gold_passage, q.id) for q in qa] == [
        ("Who?", ["A", "B"], "7", None), ("Where?", ["Paris"], None, "3")]
    assert len(read_qa(path, limit=1)) == 1


@pytest.mark.parametrize("line, message", [
    ("{not json", "malformed JSON"),
    ('["a list"]', "expected an object"),
    ('{"answers": ["a"]}', "field 'question'"),
    ('{"question": "q", "answers": ["a", ""]}', "field 'answers'"),
    ('{"question": "q", "answers": []}', "field 'answers'"),
    ('{"question": "q", "answers": 5}', "field 'answers'"),
])
def test_bad_record_names_file_and_line(tmp_path, line, message):
    path = _write(tmp_path, '{"question": "ok", "answers": ["a"]}\n' + line + "\n")
    with pytest.raises(QAFormatError, match=rf"qa.jsonl:2: {message}"):
        read_qa(path)


def test_invalid_regex_answer_names_the_line(tmp_path):
    path = _write(tmp_path, '{"question": "q", "answers": ["Long Island|New\\\\s?York"]}\n'
                            '{"question": "q2", "answers": ["(unclosed"]}\n')
    assert len(read_qa(path)) == 2  # as plain strings both are fine
    with pytest.raises(QAFormatError, match=r"qa.jsonl:2: answer '\(unclosed' is not a valid "
                                            r"regular expression"):
        read_qa(path, regex=True)


def test_curated_trec_regex_file(shared_data):
    qa = read_qa(str(shared_data / "openqa" / "curatedtrec_train_regex.jsonl"), regex=True)
    assert len(qa) == 1696 and any("|" in a for q in qa for a in q.answers)


def test_empty_file_invalid_utf8_and_missing_file(tmp_path):
    with pytest.raises(QAFormatError, match="no QA records"):
        read_qa(_write(tmp_path, "\n\n"))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "q", "answers": ["a"]}\n{"question": "\xff"}\n')
    with pytest.raises(QAFormatError, match="bad.jsonl:2: invalid UTF-8"):
        read_qa(str(bad))
    with pytest.raises(QAFormatError, match="cannot open"):
        read_qa(str(tmp_path / "missing.jsonl"))


def test_hf_dataset_offline_is_a_clear_error():
    with pytest.raises(QAFormatError, match=r"hf:no_such_dataset_xyz:validation: cannot load"):
        read_qa("hf:no_such_dataset_xyz:validation")
    with pytest.raises(QAFormatError, match="expected hf:NAME"):
        read_qa("hf:nq_open")


def test_regex_answers_map_to_token_aligned_spans(squad_tiny):
    store = BlockStore(str(squad_tiny / "corpus"))
    tok = load_tokenizer(store.manifest["tokenizer"]["path"])
    texts = BlockTexts(store, tok)
    block = next(i for i in range(len(store)) if "Denver Broncos" in store.text(i))
    body = store.body_ids(block)
    spans = texts.regex_spans(block, 2, len(body), [r"denver\s+broncos"], max_width=10)
    assert spans
    for start, w in spans:
        assert texts.span_text(block, 2, start, start + w) == "Denver Broncos"
        assert tok.decode(body[start: start + w + 1].tolist()) == "denver broncos"
    assert texts.regex_spans(block, 2, len(body), [r"enver"], max_width=10) == []  # mid-word
