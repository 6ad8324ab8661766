"""The report page: ``RUN_DIR/report/index.html`` (+ its PNGs and ``headline.json``), and the
training hook that rewrites it as a run goes."""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Optional

from realm.report.headline import headline_html, headline_numbers
from realm.report.plots import Canvas, Figure
from realm.report.records import (STAGE_TITLES, detect_stage, expand, last_table, numeric,
                                  planned_steps, read_jsonl, read_summary, swap_steps)
from realm.tracking import read_metrics

logger = logging.getLogger(__name__)

#: Page sections, in order: key -> heading. "main" is the stage's own first section.
SECTIONS = {"retrieval": "Does retrieval help?", "training": "Training",
            "other": "Other metrics", "appendix": "Appendix: bookkeeping"}

#: The loss panel's title by stage (the null document is named only where it was scored).
LOSS_TITLES = {
    "pretrain": "Loss: -log sum_z p(z|x) p(y|z,x) over the k blocks and the null document",
    "finetune_openqa": "Training loss: -log p(answer | question), marginal over the top-k blocks",
    "train_retriever": "Retriever loss: softmax over in-batch and hard-negative passages",
    "ict": "ICT loss: softmax over the in-batch blocks",
    "masked_lm": "Masked-LM loss",
    "run": "Training loss",
}

#: (file stem, title, metrics drawn, y label, section) of the fixed panels, in page order. A
#: metric name ending in "/" or "@" stands for every metric under that prefix; "main" is the
#: stage's first section; a None title is the stage's loss title.
PANELS: list[tuple[str, Optional[str], list[str], str, str]] = [
    ("loss", None, ["loss", "loss_null"], "nats", "main"),
    ("ru", "Retrieval utility: log p(y|z,x) - log p(y|null,x) (0: the null document)",
     ["ru_expected", "ru_top1"], "nats", "retrieval"),
    ("masked_accuracy", "Masked-token accuracy", ["masked_accuracy", "masked_accuracy_null"], "",
     "main"),
    ("ru_by_label", "RU by entity label of the masked span", ["ru_by_label/"], "nats",
     "retrieval"),
    ("p_null", "p(null | x): the null document's retrieval probability", ["p_null"], "",
     "retrieval"),
    ("entropy", "Retrieval entropy over the k blocks and the null document",
     ["retrieval_entropy"], "nats", "retrieval"),
    ("accuracy", "Accuracy", ["accuracy", "in_batch_accuracy", "eval/accuracy"], "", "training"),
    ("recall", "Recall@k on held-out data", ["eval/recall@"], "", "training"),
    ("staleness", "Index staleness (steps since the snapshot the index in use embedded)",
     ["index/staleness_steps"], "steps", "appendix"),
    ("lr", "Learning rate", ["lr"], "", "appendix"),
    ("throughput", "Training throughput", ["examples_per_s"], "examples / s", "appendix"),
]

#: Panels with a dotted line at each generation swap.
SWAP_MARKED = {"ru", "p_null", "staleness"}

#: Legend names of the metrics whose name alone does not say what they are.
LABELS = {"loss": "loss (k blocks + null)", "loss_null": "loss_null (null document alone)",
          "masked_accuracy": "masked_accuracy (with retrieval)",
          "masked_accuracy_null": "masked_accuracy_null (null document alone)",
          "ru_expected": "ru_expected (over p(z|x))", "ru_top1": "ru_top1 (best-scored block)"}

#: Metrics not worth a panel of their own (bookkeeping, or drawn as markers).
SKIP = {"step", "time", "index/swaps", "index/rejected", "index/generation",
        "index/encoder_step", "index/generations_used", "refresh/alive", "train/threads"}

#: Metric prefixes whose panels go to the appendix.
BOOKKEEPING = ("index/", "refresh/", "train/", "prefetch/", "fallback_examples")


def write_report(run_dir: str, output: Optional[str] = None, max_other: int = 24) -> str:
    """Draw the run's report; returns the path of ``index.html``.

    The page opens with the headline box (:mod:`realm.report.headline`; its numbers also in
    ``headline.json``), then the stage's panels, the figures logged once as a table, the latest
    examples table, and an appendix of bookkeeping panels. It is written into a temporary
    directory beside ``output`` (default ``RUN_DIR/report``) and swapped in whole, so a reader
    never sees half a report.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``metrics.jsonl`` (names the file).
        RunDirError: a line of it is not UTF-8 JSON (names the file and the line).
    """
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(f"{metrics_path}: no metrics here; is {run_dir!r} a run "
                                "directory (train.run_dir of a stage)?")
    records = [r for r in read_metrics(run_dir) if "step" in r]
    stage = detect_stage(records)
    numbers = headline_numbers(records, planned_steps(run_dir, records), stage,
                               read_summary(run_dir))
    output = output or os.path.join(run_dir, "report")
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".report-", dir=parent)
    try:
        canvas = Canvas(tmp)
        left_out = _draw(canvas, run_dir, records, stage, set(numbers.get("logged_once", {})),
                         max_other)
        with open(os.path.join(tmp, "headline.json"), "w", encoding="utf-8") as f:
            json.dump(numbers, f, indent=1)
        _write_html(tmp, run_dir, records, numbers, canvas.figures, last_table(run_dir), left_out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(output):  # swap the whole directory in
        old = f"{output}.old-{os.getpid()}"
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)
    return os.path.join(output, "index.html")


def _draw(canvas: Canvas, run_dir: str, records: list[dict[str, Any]], stage: str,
          once: set[str], max_other: int) -> int:
    """Every panel of the run into ``canvas``; returns how many metrics were left undrawn."""
    main = "retrieval" if stage == "pretrain" else "training"
    swaps = swap_steps(records)
    covered = set(SKIP) | once  # a figure logged once is a table row, not a panel
    for stem, title, keys, ylabel, section in PANELS:
        names = [n for n in expand(records, keys) if n not in covered]
        covered.update(names)
        series = [s for s in ((n, *numeric(records, n)) for n in names) if s[1]]
        if not series:
            continue
        section = main if section == "main" else section
        title = title or LOSS_TITLES[stage]
        if "loss_null" in names and stem == "loss":
            title = "Loss with retrieval, beside the same reader on the null document alone"
        if "masked_accuracy_null" in names and stem == "masked_accuracy":
            title += ", with retrieval and with the null document alone"
        if stem == "ru_by_label":
            canvas.half_bars(stem, title, series, ylabel, section)
        else:
            canvas.curves(stem, title, series, ylabel, section, labels=LABELS,
                          markers=swaps if stem in SWAP_MARKED else None, zero_line=stem == "ru")
    refresher = read_jsonl(os.path.join(run_dir, "refresher", "metrics.jsonl"))
    timed = [r for r in refresher if "time" in r and "refresh/encoder_step" in r]
    if timed:
        t0 = timed[0]["time"]
        canvas.curves("refresher_timeline",
                      "Refresher: the snapshot each committed generation embedded",
                      [("encoder step embedded", [r["time"] - t0 for r in timed],
                        [r["refresh/encoder_step"] for r in timed])], "trainer step",
                      "appendix", xlabel="seconds since the first generation")
    xs, ys = numeric(refresher, "refresh/blocks_per_s")
    if xs:
        canvas.curves("refresher_throughput", "Refresher: embedding throughput per generation",
                      [("blocks / s", xs, ys)], "blocks / s", "appendix",
                      xlabel="encoder step embedded")
    others = sorted({k for r in records for k in r} - covered)
    for name in others[:max_other]:
        xs, ys = numeric(records, name)
        if xs:
            canvas.curves("m_" + "".join(c if c.isalnum() else "_" for c in name), name,
                          [(name, xs, ys)], "",
                          "appendix" if name.startswith(BOOKKEEPING) else "other")
    return len(others) - max_other


def _figure_grid(figures: list[Figure]) -> str:
    e = html.escape
    return "<div class='grid'>" + "".join(
        f"<figure><img src='{e(f.file)}' alt='{e(f.caption)}'>"
        f"<figcaption>{e(f.caption)}</figcaption></figure>" for f in figures) + "</div>"


def _write_html(directory: str, run_dir: str, records: list[dict[str, Any]],
                numbers: dict[str, Any], figures: list[Figure], table: Optional[dict[str, Any]],
                left_out: int) -> None:
    e = html.escape
    last = records[-1] if records else {}
    name = os.path.basename(os.path.abspath(run_dir))
    stage = STAGE_TITLES.get(numbers["stage"], numbers["stage"])
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>realm report: {e(stage)}: {e(name)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1500px}"
        "img{max-width:100%;border:1px solid #ddd}"
        ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:1em}"
        "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;"
        "padding:3px 6px;vertical-align:top;text-align:left}"
        ".headline{border:2px solid #447;border-radius:6px;padding:0.5em 1em;background:#f6f7fb;"
        "max-width:1000px}.verdict{font-size:1.1em;font-weight:bold}"
        ".note{color:#555;font-size:0.85em}</style></head><body>",
        f"<h1>{e(stage)}: {e(name)}</h1>",
        headline_html(numbers),
        f"<p class='note'>{e(os.path.abspath(run_dir))}: {len(records)} metric records, last at "
        f"step {e(str(last.get('step', '-')))}; written {e(time.strftime('%Y-%m-%d %H:%M:%S'))}."
        "</p>",
    ]
    if not figures:
        parts.append("<p>No numeric metrics logged yet.</p>")
    for key, heading in SECTIONS.items():
        if key == "appendix":
            once = numbers.get("logged_once", {})
            if once and numbers["stage"] == "pretrain":  # (elsewhere the headline holds them)
                parts.append("<h2>Figures logged once</h2><table><tr><th>metric</th>"
                             "<th>value</th></tr>" + "".join(
                                 f"<tr><th>{e(k)}</th><td>{v:.5g}</td></tr>"
                                 for k, v in once.items()) + "</table>")
            if table:
                parts.append(f"<h2>Examples ({e(str(table.get('table')))}, step "
                             f"{e(str(table.get('step')))})</h2><table><tr>")
                parts.extend(f"<th>{e(str(c))}</th>" for c in table.get("columns", []))
                parts.append("</tr>")
                for row in table.get("rows", []):
                    parts.append("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row)
                                 + "</tr>")
                parts.append("</table>")
        in_section = [f for f in figures if f.section == key]
        if in_section:
            parts.append(f"<h2 id='{key}'>{e(heading)}</h2>{_figure_grid(in_section)}")
    if left_out > 0:
        parts.append(f"<p>{left_out} more metrics are in metrics.jsonl, not drawn.</p>")
    parts.append("</body></html>\n")
    with open(os.path.join(directory, "index.html"), "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


class ReportHook:
    """A training-core hook (main process) that rewrites the run's report every ``every`` steps.

    A report that cannot be drawn is logged and skipped: it never stops training.
    """

    def __init__(self, run_dir: str, every: int):
        self.run_dir, self.every = run_dir, every

    def after_step(self, step: int, model: Any) -> None:
        if self.every and step % self.every == 0:
            self.draw()

    def draw(self) -> None:
        """Rewrite the report now (a failure is logged, never raised)."""
        try:
            logger.info("report: %s", write_report(self.run_dir))
        except Exception as err:  # noqa: BLE001 - a dashboard must not end a run
            logger.warning("report of %s not written: %s", self.run_dir, err)
