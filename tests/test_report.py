"""The run report: its headline box holds the numbers of the run's summary (the same quarters,
with their confidence intervals), RU-by-label bars carry their counts, curves are smoothed,
bookkeeping sits in the appendix, and figures logged once are a table, not a panel."""

import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from realm.config import load_config, save_config
from realm.report import headline_numbers, write_report
from realm.report.plots import moving_mean, smoothing_window
from realm.tracking import Tracker, read_metrics
from realm.training.pretrain import quarter_means

REPO = Path(__file__).resolve().parents[1]
STEPS = 40
LABELS = ("PERSON", "DATE", "GPE")


class Values(HTMLParser):
    """``data-key`` -> ``data-value`` of the headline box's cells, and its text."""

    def __init__(self):
        super().__init__()
        self.values, self.depth, self.text = {}, 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and attrs.get("class") == "headline":
            self.depth = 1
        elif self.depth and tag == "section":
            self.depth += 1
        if self.depth and "data-key" in attrs:
            self.values[attrs["data-key"]] = float(attrs["data-value"])

    def handle_endtag(self, tag):
        if self.depth and tag == "section":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.text.append(data)


def _headline(page: str) -> tuple[dict[str, float], str]:
    parser = Values()
    parser.feed(page)
    return parser.values, " ".join(parser.text)


def _pretrain_run(run_dir: Path, seed: int = 0) -> list[dict]:
    """A pretraining run's metrics through the real tracker: RU rising from 0.1 to 0.9 nats,
    accuracy with retrieval above the null document's, a new generation every 10 steps, some
    entity labels, an examples table; and the run's saved config (train.steps)."""
    rng = np.random.default_rng(seed)
    save_config(load_config(overrides=[f"train.steps={STEPS}", f"train.run_dir={run_dir}"]),
                str(run_dir))
    tracker = Tracker(str(run_dir))
    for step in range(1, STEPS + 1):
        record = {"loss": 9 - step / 10 + rng.normal(0, 0.3), "lr": 1e-4,
                  "examples_per_s": 3 + rng.normal(0, 0.1),
                  "ru_expected": 0.1 + 0.8 * step / STEPS + rng.normal(0, 0.2),
                  "ru_top1": 0.2 + rng.normal(0, 0.3), "p_null": 0.05, "retrieval_entropy": 1.3,
                  "masked_accuracy": 0.2 + step / 400 + rng.normal(0, 0.02),
                  "masked_accuracy_null": 0.15 + rng.normal(0, 0.02), "loss_null": 9.5,
                  "index/generation": step // 10, "index/staleness_steps": step % 10 + 1,
                  "index/staleness_s": 2.0 * (step % 10)}
        for label in LABELS[: 1 + step % 3]:  # PERSON in every record, DATE in 2/3, GPE in 1/3
            record[f"ru_by_label/{label}"] = rng.normal(0.5, 0.5)
        tracker.log(record, step=step)
        if step % 20 == 0:
            tracker.log_table("examples", ["masked_text", "gold"], [["a [MASK] b", "x"]], step)
    tracker.close()
    return read_metrics(str(run_dir))


def test_headline_box_holds_the_summary_numbers(tmp_path):
    run = tmp_path / "run"
    records = _pretrain_run(run)
    page = Path(write_report(str(run))).read_text(encoding="utf-8")
    values, text = _headline(page)
    # the same quarters as the run's summary line, by the function that writes it
    summary = quarter_means(records, STEPS, {
        "ru": "ru_expected", "masked_accuracy": "masked_accuracy",
        "masked_accuracy_null": "masked_accuracy_null"})
    for key, want in summary.items():
        assert values[key] == want, key
    assert values["generations_swapped"] == len({r["index/generation"] for r in records}) == 5
    assert values["max_staleness_steps"] == 10
    assert values["mean_staleness_steps"] == pytest.approx(
        np.mean([r["index/staleness_steps"] for r in records]), abs=0.01)
    # the box is the page's first block: before every figure, and it says what it computed
    assert page.index("class='headline'") < page.index("<img")
    assert "Student t" in text and f"planned {STEPS} steps" in text
    # the last quarter's interval: t(9) = 2.262 over its 10 records (steps 31..40)
    last = [r["ru_expected"] for r in records if r["step"] > 30]
    half = 2.262 * np.std(last, ddof=1) / math.sqrt(len(last))
    numbers = json.loads((run / "report" / "headline.json").read_text())
    assert numbers["ru_last_quarter_n"] == 10
    assert numbers["ru_last_quarter_ci"] == pytest.approx(
        [np.mean(last) - half, np.mean(last) + half], abs=1e-5)
    assert f"[{np.mean(last) - half:.3f}, {np.mean(last) + half:.3f}]" in text
    assert "Retrieval helps" in text  # RU 0.8 +- 0.2 on 10 records: the interval is above 0
    gain = [r["masked_accuracy"] - r["masked_accuracy_null"] for r in records if r["step"] > 30]
    assert values["masked_accuracy_gain_last_quarter"] == pytest.approx(np.mean(gain), abs=1e-5)


def test_the_saved_summary_line_adds_span_recall_and_wins_for_staleness(tmp_path):
    run = tmp_path / "run"
    records = _pretrain_run(run)
    summary = {"stage": "pretrain", "max_staleness_steps": 12, "generations_swapped": 5,
               "span_recall_start": 0.25, "span_recall_end": 0.375, "span_recall_gained": 7,
               "span_recall_lost": 2, "span_recall_p": 0.1797, "span_recall_examples": 40}
    (run / "summary.json").write_text(json.dumps(summary))
    values, text = _headline(Path(write_report(str(run))).read_text(encoding="utf-8"))
    for key in ("span_recall_start", "span_recall_end", "span_recall_p", "max_staleness_steps"):
        assert values[key] == summary[key], key
    assert "gained 7, lost 2" in text and "40 masked sentences" in text
    assert headline_numbers(records, STEPS, "pretrain")["max_staleness_steps"] == 10


def test_bars_carry_their_counts_and_bookkeeping_is_in_the_appendix(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    bar_label = matplotlib.axes.Axes.bar_label

    def spy(self, container, labels=None, **kwargs):
        drawn.append(list(labels))
        return bar_label(self, container, labels=labels, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar_label", spy)
    run = tmp_path / "run"
    records = _pretrain_run(run)
    page = Path(write_report(str(run))).read_text(encoding="utf-8")
    # first half: steps 1..20, second: 21..40; labels by how many records hold them
    counts = {half: [str(sum(f"ru_by_label/{label}" in r and (r["step"] <= 20) == (half == 0)
                             for r in records)) for label in LABELS] for half in (0, 1)}
    assert drawn == [counts[0], counts[1]] and counts[0] == ["20", "14", "7"]
    assert "how many logged records hold the label" in page
    appendix = page.index("id='appendix'")
    for stem in ("lr", "throughput", "staleness"):
        assert page.index(f"src='{stem}.png'") > appendix, stem
    for stem in ("loss", "ru", "masked_accuracy", "ru_by_label", "p_null", "entropy"):
        assert page.index(f"src='{stem}.png'") < appendix, stem
    assert page.index("Does retrieval help?") < page.index("<th>masked_text</th>") < appendix
    assert "moving mean over 5 records" in page  # 40 records: a window of 5
    assert "null document alone" in page


def test_moving_mean_is_the_centred_mean_of_its_window():
    ys = [1.0, 5.0, 2.0, 8.0, 3.0, 0.0, 4.0, 6.0, 2.0, 9.0, 1.0]
    w = smoothing_window(len(ys))
    assert w == 3 and smoothing_window(9) == 1 and smoothing_window(100) == 11
    want = [np.mean(ys[max(0, i - 1): i + 2]) for i in range(len(ys))]
    assert moving_mean(ys, w) == pytest.approx(want)


def test_open_qa_figures_logged_once_are_a_table_and_its_loss_title_is_its_own(tmp_path):
    run = tmp_path / "run"
    tracker = Tracker(str(run))
    for step in range(10, 70, 10):
        tracker.log({"loss": 12 - step / 20, "lr": 1e-4, "answerable": 0.3}, step=step)
    final = {"exact_match": 0.1533, "f1": 0.2009, "answer_recall@1": 0.1833,
             "answer_recall@20": 0.4267, "questions": 300}
    tracker.log({f"final/{k}": v for k, v in final.items()}, step=60)
    tracker.close()
    page = Path(write_report(str(run))).read_text(encoding="utf-8")
    values, text = _headline(page)
    for key, value in final.items():
        assert values[f"final/{key}"] == value, key
    assert "Open-QA fine-tuning" in text
    assert text.index("final/exact_match") < text.index("final/f1") < text.index(
        "final/answer_recall@1") < text.index("final/answer_recall@20")
    assert "m_final_" not in page and not list((run / "report").glob("m_final_*.png"))
    assert "Training loss: -log p(answer | question)" in page and "null" not in page.lower()
    assert values["loss_last_quarter"] == pytest.approx(np.mean([12 - 5 / 2, 12 - 6 / 2]))


def test_launch_report_writes_the_headline_first(tmp_path):
    run = tmp_path / "run"
    _pretrain_run(run)
    done = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(run)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    page = Path(out["report"]).read_text(encoding="utf-8")
    body = page[page.index("<body>"):]
    first_block = body[body.index("</h1>") + 5:].lstrip()
    assert first_block.startswith("<section class='headline'>")
    assert "first quarter" in first_block[:2000] and "Masked accuracy with retrieval" in page
