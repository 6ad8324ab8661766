"""An offline report of a run: ``RUN_DIR/report/index.html`` with a headline box, PNG plots and
tables of its metrics.

What a researcher without wandb wants to see of a run, drawn from the files every stage writes
(``metrics.jsonl``, for pretraining ``refresher/metrics.jsonl``, and ``summary.json`` where the
summary line was saved). The page opens with a **headline box** (:mod:`realm.report.headline`):
for pretraining, retrieval utility over the first and last quarter with 95% confidence intervals
against the null document, masked accuracy with and without retrieval, generations used,
staleness and held-out span recall; for the other stages their loss and the figures logged once
(an Open-QA run's exact match, F1, answer recall@k) as a table. Then the stage's panels, each
curve drawn raw (faint) and as a moving mean (bold): loss beside the null document's loss,
expected and top-1 RU, RU by entity label (bars with the number of records behind each),
masked accuracy, p(null) and retrieval entropy; or the loss, accuracy and recall of ICT, DPR and
Open-QA runs. Every other scalar gets a small panel; bookkeeping (learning rate, throughput,
staleness, the refresher's timeline and throughput, index and thread counters) is in an
appendix at the end, after the latest examples table.

``python launch/report.py RUN_DIR`` writes it; pretraining rewrites it every
``logging.report_every`` steps (:class:`ReportHook`).
"""

from realm.report.headline import headline_numbers
from realm.report.page import ReportHook, write_report

__all__ = ["ReportHook", "headline_numbers", "write_report"]
