"""What a report reads from a run directory: metric records, the refresher's records, the latest
examples table, the planned number of steps, the saved summary line, and which stage ran."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import yaml

logger = logging.getLogger(__name__)

#: Stage key -> the page's title.
STAGE_TITLES = {
    "pretrain": "REALM pretraining",
    "finetune_openqa": "Open-QA fine-tuning",
    "train_retriever": "Retriever training (DPR)",
    "ict": "ICT warm start of the retriever",
    "masked_lm": "Masked-LM training",
    "run": "Training run",
}

#: File of a run directory holding its entry script's last stdout line (the summary), if saved.
SUMMARY_FILE = "summary.json"


def numeric(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the records where ``key`` is a number."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def expand(records: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The metric names of ``keys`` present in the records; a key ending in ``/`` or ``@``
    stands for every metric under that prefix (sorted)."""
    present = {k for r in records for k in r}
    out = []
    for key in keys:
        if key.endswith(("/", "@")):
            out.extend(sorted(k for k in present if k.startswith(key)))
        elif key in present:
            out.append(key)
    return out


def swap_steps(records: list[dict[str, Any]]) -> list[int]:
    """Steps at which a new index generation came into use."""
    steps, last = [], None
    for r in records:
        g = r.get("index/generation")
        if g is not None and g != last:
            if last is not None:
                steps.append(r["step"])
            last = g
    return steps


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The JSON records of a file that may be written as it is read (a torn line is skipped);
    [] when there is no such file."""
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


def last_table(run_dir: str) -> Optional[dict[str, Any]]:
    """The newest examples table the run logged (``Tracker.log_table``), or None."""
    tables = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "table" in r]
    return tables[-1] if tables else None


def planned_steps(run_dir: str, records: list[dict[str, Any]]) -> int:
    """The run's ``train.steps`` from its saved ``config.yaml`` (what the summary's quarters are
    quarters of); the last logged step when there is no readable config."""
    last = max((r["step"] for r in records), default=0)
    try:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
            steps = (yaml.safe_load(f) or {}).get("train", {}).get("steps")
    except (OSError, yaml.YAMLError, AttributeError):
        steps = None
    return steps if isinstance(steps, int) and steps > 0 else last


def read_summary(run_dir: str) -> dict[str, Any]:
    """``RUN_DIR/summary.json`` (the stage's summary line, where it was saved), or {}."""
    path = os.path.join(run_dir, SUMMARY_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError) as err:
        logger.warning("%s not read (%s): the report uses metrics.jsonl alone", path, err)
        return {}
    return summary if isinstance(summary, dict) else {}


def detect_stage(records: list[dict[str, Any]]) -> str:
    """Which stage logged these records (a key of :data:`STAGE_TITLES`), from what it logged."""
    present = {k for r in records for k in r}
    if present & {"ru_expected", "loss_null", "index/staleness_steps"}:
        return "pretrain"
    if "answerable" in present or "final/exact_match" in present:
        return "finetune_openqa"
    if "positive_over_hard" in present or any(k.startswith("final/dev_") for k in present):
        return "train_retriever"
    if "in_batch_accuracy" in present:
        return "ict"
    if "masked_accuracy" in present:
        return "masked_lm"
    return "run"
