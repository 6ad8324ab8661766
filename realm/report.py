"""An offline dashboard of a run: ``RUN_DIR/report/index.html`` with PNG plots of its metrics.

What a user without wandb would want to see of a run, drawn from the files every stage writes
(``metrics.jsonl``, and for pretraining ``refresher/metrics.jsonl``): loss beside the null
document's loss, expected and top-1 retrieval utility (RU), RU by entity label, p(null),
retrieval entropy, masked accuracy with and without retrieval, index staleness with a marker at
every generation swapped in, the refresher's timeline and throughput, and the latest examples
table. Panels whose metrics a run does not log are left out, so the same page serves ICT, DPR
and Open-QA runs (their loss, accuracy, recall and learning-rate curves), and every other scalar
the run logged gets a small panel of its own.

``python launch/report.py RUN_DIR`` writes it; pretraining rewrites it every
``logging.report_every`` steps (:class:`ReportHook`). matplotlib is imported when a report is
drawn, with the Agg backend (no display needed).
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Optional

from realm.tracking import read_metrics

logger = logging.getLogger(__name__)

#: (file stem, title, metrics drawn, y label) of the fixed panels, in page order. A metric
#: name ending in "/" stands for every metric under that prefix.
PANELS: list[tuple[str, str, list[str], str]] = [
    ("loss", "Loss, with retrieval and beside the null document alone",
     ["loss", "loss_null"], "nats"),
    ("ru", "Retrieval utility: log p(y|z,x) - log p(y|null,x)",
     ["ru_expected", "ru_top1"], "nats"),
    ("ru_by_label", "RU by entity label of the masked span", ["ru_by_label/"], "nats"),
    ("p_null", "p(null | x): the null document's retrieval probability", ["p_null"], ""),
    ("entropy", "Retrieval entropy over the k blocks and the null document",
     ["retrieval_entropy"], "nats"),
    ("masked_accuracy", "Masked-token accuracy, with retrieval and with the null document",
     ["masked_accuracy", "masked_accuracy_null"], ""),
    ("staleness", "Index staleness (steps since the snapshot the index in use embedded)",
     ["index/staleness_steps"], "steps"),
    ("accuracy", "Accuracy", ["accuracy", "in_batch_accuracy", "eval/accuracy"], ""),
    ("recall", "Recall", ["eval/recall@1", "eval/recall@5", "eval/recall@20",
                          "eval/recall@100"], ""),
    ("lr", "Learning rate", ["lr"], ""),
    ("throughput", "Training throughput", ["examples_per_s"], "examples / s"),
]

#: Metrics not worth a panel of their own (bookkeeping, or drawn as markers).
SKIP = {"step", "time", "index/swaps", "index/rejected", "index/generation",
        "index/encoder_step", "index/generations_used", "refresh/alive", "train/threads"}


def _numeric(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _expand(records: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The panel's metric names present in the records (prefixes expanded, sorted)."""
    present = {k for r in records for k in r}
    out = []
    for key in keys:
        if key.endswith("/"):
            out.extend(sorted(k for k in present if k.startswith(key)))
        elif key in present:
            out.append(key)
    return out


def _swap_steps(records: list[dict[str, Any]]) -> list[int]:
    """Steps at which a new index generation came into use."""
    steps, last = [], None
    for r in records:
        g = r.get("index/generation")
        if g is not None and g != last:
            if last is not None:
                steps.append(r["step"])
            last = g
    return steps


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:  # a garbled line: skipped below
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line being written as the run goes on
                    continue
    return out


def _last_table(run_dir: str) -> Optional[dict[str, Any]]:
    tables = [r for r in _read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "table" in r]
    return tables[-1] if tables else None


def write_report(run_dir: str, output: Optional[str] = None, max_other: int = 24) -> str:
    """Draw the run's report; returns the path of ``index.html``.

    The page and its images are written into a temporary directory beside ``output`` (default
    ``RUN_DIR/report``) and swapped in whole, so a reader never sees half a report.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``metrics.jsonl`` (names the file).
        RunDirError: a line of it is not UTF-8 JSON (names the file and the line).
    """
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(f"{metrics_path}: no metrics here; is {run_dir!r} a run "
                                "directory (train.run_dir of a stage)?")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_dir) if "step" in r]
    refresher = _read_jsonl(os.path.join(run_dir, "refresher", "metrics.jsonl"))
    output = output or os.path.join(run_dir, "report")
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".report-", dir=parent)
    swaps = _swap_steps(records)
    figures: list[tuple[str, str]] = []  # (file, caption)

    def draw(stem: str, title: str, series: list[tuple[str, list, list]], ylabel: str,
             xlabel: str = "step", markers: Optional[list[int]] = None) -> None:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        for name, xs, ys in series:
            ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=name)
        for i, s in enumerate(markers or []):
            ax.axvline(s, color="grey", linestyle=":", linewidth=1,
                       label="generation swapped in" if i == 0 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1 or markers:
            ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)
        fig.tight_layout()
        fig.savefig(os.path.join(tmp, f"{stem}.png"), dpi=90)
        plt.close(fig)
        figures.append((f"{stem}.png", title))

    def bars(stem: str, title: str, series: list[tuple[str, list, list]], ylabel: str) -> None:
        """Each metric's mean over the first and the second half of the run, side by side
        (a curve per entity label is unreadable noise)."""
        import numpy as np

        half = (max(max(xs) for _, xs, _ in series) + 1) / 2
        labels = [name.rsplit("/", 1)[-1] for name, _, _ in series]
        first = [np.mean([y for x, y in zip(xs, ys) if x <= half] or [np.nan])
                 for _, xs, ys in series]
        second = [np.mean([y for x, y in zip(xs, ys) if x > half] or [np.nan])
                  for _, xs, ys in series]
        at = np.arange(len(series))
        fig, ax = plt.subplots(figsize=(7, 3.4))
        ax.bar(at - 0.2, first, 0.4, label="first half of the steps")
        ax.bar(at + 0.2, second, 0.4, label="second half")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(at, labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(title + " (mean)", fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(os.path.join(tmp, f"{stem}.png"), dpi=90)
        plt.close(fig)
        figures.append((f"{stem}.png", title + " (mean)"))

    covered = set(SKIP)
    for stem, title, keys, ylabel in PANELS:
        names = _expand(records, keys)
        covered.update(names)
        series = [(n, *_numeric(records, n)) for n in names]
        series = [s for s in series if s[1]]
        if series and stem == "ru_by_label":
            bars(stem, title, series, ylabel)
        elif series:
            draw(stem, title, series, ylabel,
                 markers=swaps if stem in ("staleness", "ru", "p_null") else None)
    if refresher:
        timed = [r for r in refresher if "time" in r and "refresh/encoder_step" in r]
        if timed:
            t0 = timed[0]["time"]
            times = [r["time"] - t0 for r in timed]
            steps = [r["refresh/encoder_step"] for r in timed]
            draw("refresher_timeline", "Refresher: the snapshot each committed generation embedded",
                 [("encoder step embedded", times, steps)], "trainer step",
                 xlabel="seconds since the first generation")
        xs, ys = _numeric(refresher, "refresh/blocks_per_s")
        if xs:
            draw("refresher_throughput", "Refresher: embedding throughput per generation",
                 [("blocks / s", xs, ys)], "blocks / s", xlabel="encoder step embedded")
    others = sorted({k for r in records for k in r} - covered)
    for name in others[:max_other]:
        xs, ys = _numeric(records, name)
        if xs:
            draw("m_" + "".join(c if c.isalnum() else "_" for c in name), name,
                 [(name, xs, ys)], "")
    table = _last_table(run_dir)
    _write_html(tmp, run_dir, records, figures, table, len(others) - max_other)
    if os.path.isdir(output):  # swap the whole directory in
        old = f"{output}.old-{os.getpid()}"
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)
    return os.path.join(output, "index.html")


def _write_html(directory: str, run_dir: str, records: list[dict[str, Any]],
                figures: list[tuple[str, str]], table: Optional[dict[str, Any]],
                left_out: int) -> None:
    e = html.escape
    last = records[-1] if records else {}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>realm report: {e(os.path.basename(os.path.abspath(run_dir)))}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1500px}"
        "img{max-width:100%;border:1px solid #ddd}"
        ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:1em}"
        "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;"
        "padding:3px 6px;vertical-align:top}</style></head><body>",
        f"<h1>{e(os.path.abspath(run_dir))}</h1>",
        f"<p>{len(records)} metric records, last at step {e(str(last.get('step', '-')))}; "
        f"written {e(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>",
    ]
    if not figures:
        parts.append("<p>No numeric metrics logged yet.</p>")
    parts.append("<div class='grid'>")
    for file, caption in figures:
        parts.append(f"<figure><img src='{e(file)}' alt='{e(caption)}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</div>")
    if left_out > 0:
        parts.append(f"<p>{left_out} more metrics are in metrics.jsonl, not drawn.</p>")
    if table:
        parts.append(f"<h2>Examples ({e(str(table.get('table')))}, step "
                     f"{e(str(table.get('step')))})</h2><table><tr>")
        parts.extend(f"<th>{e(str(c))}</th>" for c in table.get("columns", []))
        parts.append("</tr>")
        for row in table.get("rows", []):
            parts.append("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>")
        parts.append("</table>")
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
