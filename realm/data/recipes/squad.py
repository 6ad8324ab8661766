"""SQuAD-open: the 2,067 paragraphs of SQuAD v1.1 dev (48 Wikipedia articles) as the knowledge
corpus, its questions split by article into train (39 articles), dev (5) and a held-out test (4).

The split is fixed by the article titles below, so the public source and a local copy give the
same files: ``passages.jsonl`` (``id`` ``squad-dev-N`` in SQuAD's paragraph order, ``title``,
``text`` the paragraph unchanged), ``qa_train.jsonl`` / ``qa_dev.jsonl`` / ``qa_test.jsonl``
(``id``, ``question`` as written, ``answers`` the distinct answer texts in SQuAD's order,
``gold_passage``, ``title``), in SQuAD's order. Titles have SQuAD's underscores as spaces.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional
from urllib.parse import unquote

from realm.data.recipes.common import (Recipe, hub_url, local_path, public, read_jsonl,
                                       write_jsonl, write_manifest)
from realm.errors import MissingInputError, QAFormatError

FOLDER = "squad_open"
HUB_NAME = "rajpurkar/squad"  # v1.1; its validation split is the dev set
SQUAD_JSON = "dev-v1.1.json"  # the original file, accepted in a --from directory
#: The dev articles (questions evaluated while developing).
DEV_TITLES = ("Computational complexity theory", "Victoria (Australia)", "Packet switching",
              "Construction", "Imperialism")
#: The held-out test articles: their questions go to qa_test.jsonl, never tuned against.
TEST_TITLES = ("Apollo program", "American Broadcasting Company", "Doctor Who", "Chloroplast")
#: The training articles.
TRAIN_TITLES = (
    "Super Bowl 50", "Warsaw", "Normans", "Nikola Tesla", "Teacher", "Martin Luther",
    "Southern California", "Sky (United Kingdom)", "Huguenot", "Steam engine", "Oxygen",
    "1973 oil crisis", "European Union law", "Amazon rainforest", "Ctenophora",
    "Fresno, California", "Black Death", "Geology", "Newcastle upon Tyne",
    "Victoria and Albert Museum", "Genghis Khan", "Pharmacy", "Immune system",
    "Civil disobedience", "Private school", "Harvard University", "Jacksonville, Florida",
    "Economic inequality", "University of Chicago", "Yuan dynasty", "Kenya",
    "Intergovernmental Panel on Climate Change", "Prime number", "Rhine", "Scottish Parliament",
    "Islamism", "United Methodist Church", "French and Indian War", "Force")
SPLITS = ("qa_train", "qa_dev", "qa_test")
FILES = tuple(f"{FOLDER}/{name}.jsonl" for name in ("passages", "qa_train", "qa_dev"))


def article_title(title: str) -> str:
    """SQuAD's article title as a Wikipedia title (``Fresno,_California`` -> ``Fresno,
    California``)."""
    return unquote(title).replace("_", " ")


def squad_open(articles: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """SQuAD-open from SQuAD v1.1 dev's articles (its json's ``data``: ``title``,
    ``paragraphs`` of ``context`` and ``qas`` with ``id``, ``question``, ``answers[].text``).

    Returns:
        ``{"passages", "qa_train", "qa_dev", "qa_test"}``: lists of records (module docstring).

    Raises:
        QAFormatError: The articles are not SQuAD v1.1 dev's 48 (the message names the
            titles that differ).
    """
    titles = [article_title(a.get("title", "")) for a in articles]
    expected = set(TRAIN_TITLES) | set(DEV_TITLES) | set(TEST_TITLES)
    if sorted(titles) != sorted(expected):
        extra, lacking = sorted(set(titles) - expected), sorted(expected - set(titles))
        raise QAFormatError(f"not SQuAD v1.1 dev: {len(titles)} articles, unexpected "
                            f"{extra[:3]}, missing {lacking[:3]}")
    out: dict[str, list[dict[str, Any]]] = {"passages": [], **{s: [] for s in SPLITS}}
    for article, title in zip(articles, titles):
        split = "qa_dev" if title in DEV_TITLES else "qa_test" if title in TEST_TITLES \
            else "qa_train"
        for paragraph in article["paragraphs"]:
            pid = f"squad-dev-{len(out['passages'])}"
            out["passages"].append({"id": pid, "title": title, "text": paragraph["context"]})
            for qa in paragraph["qas"]:
                answers = list(dict.fromkeys(a["text"] for a in qa["answers"]))
                out[split].append({"id": qa["id"], "question": qa["question"],
                                   "answers": answers, "gold_passage": pid, "title": title})
    return out


def articles_from_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """SQuAD's articles from the ``datasets`` rows (one per question: ``id``, ``title``,
    ``context``, ``question``, ``answers.text``), paragraphs in their order."""
    articles: list[dict[str, Any]] = []
    for row in rows:
        if not articles or articles[-1]["title"] != row["title"]:
            articles.append({"title": row["title"], "paragraphs": []})
        paragraphs = articles[-1]["paragraphs"]
        if not paragraphs or paragraphs[-1]["context"] != row["context"]:
            paragraphs.append({"context": row["context"], "qas": []})
        paragraphs[-1]["qas"].append({"id": row["id"], "question": row["question"],
                                      "answers": [{"text": t} for t in row["answers"]["text"]]})
    return articles


def articles_from_local(source: str) -> list[dict[str, Any]]:
    """SQuAD's articles from a local directory: the original ``dev-v1.1.json``, or a copy of
    this recipe's files (``squad_open/passages.jsonl`` and the ``qa_*.jsonl`` there)."""
    raw = os.path.join(source, SQUAD_JSON)
    if os.path.isfile(raw):
        with open(raw, encoding="utf-8") as f:
            try:
                return json.load(f)["data"]
            except (ValueError, KeyError, TypeError) as err:
                raise QAFormatError(f"{raw}: not SQuAD's json ({err})") from None
    if not os.path.isfile(os.path.join(source, FILES[0])):
        raise MissingInputError(f"{source}: holds neither {SQUAD_JSON} (SQuAD v1.1 dev) nor "
                                f"{', '.join(FILES)}")
    passages = read_jsonl(local_path(source, FILES[0], "squad-open"), ("id", "title", "text"))
    articles: list[dict[str, Any]] = []
    paragraph = {}
    for p in passages:
        if not articles or articles[-1]["title"] != p["title"]:
            articles.append({"title": p["title"], "paragraphs": []})
        paragraph[p["id"]] = {"context": p["text"], "qas": []}
        articles[-1]["paragraphs"].append(paragraph[p["id"]])
    for split in SPLITS:
        relative = f"{FOLDER}/{split}.jsonl"
        if split == "qa_test" and not os.path.isfile(os.path.join(source, relative)):
            continue  # a copy without the held-out questions
        path = local_path(source, relative, "squad-open")
        for i, qa in enumerate(read_jsonl(path, ("id", "question", "answers", "gold_passage"))):
            if qa["gold_passage"] not in paragraph:
                raise QAFormatError(f"{path}: record {i + 1}: gold_passage "
                                    f"{qa['gold_passage']!r} is not in {FILES[0]}")
            paragraph[qa["gold_passage"]]["qas"].append(
                {"id": qa["id"], "question": qa["question"],
                 "answers": [{"text": a} for a in qa["answers"]]})
    return articles


def build_squad_open(output: str, source: Optional[str] = None,
                     progress: bool = True) -> dict[str, Any]:
    """Write SQuAD-open into ``output/squad_open/`` from ``source`` (a local directory) or, with
    none, from the ``datasets`` hub; returns the manifest."""
    if source is None:
        def load() -> list[dict[str, Any]]:
            import datasets

            return articles_from_rows(datasets.load_dataset(HUB_NAME, split="validation"))

        articles = public("squad-open", output, f"{HUB_NAME} (SQuAD v1.1 dev) through datasets",
                          load, hub_url())
    else:
        articles = articles_from_local(source)
    records = squad_open(articles)
    files = {}
    for name, rows in records.items():
        if rows or name != "qa_test":  # a local copy may have no held-out questions
            files[f"{FOLDER}/{name}.jsonl"] = write_jsonl(output, f"{FOLDER}/{name}.jsonl", rows)
    return write_manifest(output, RECIPE, source, files,
                          splits={"dev": list(DEV_TITLES), "test": list(TEST_TITLES),
                                  "train": list(TRAIN_TITLES)})


RECIPE = Recipe(
    name="squad-open",
    description="SQuAD-open: SQuAD v1.1 dev's 2,067 paragraphs as the corpus, its questions "
                "split by article (train 39, dev 5, test 4)",
    folder=FOLDER, files=FILES, build=build_squad_open)
