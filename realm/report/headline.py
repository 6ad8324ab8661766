"""The report's headline box: the run's summary numbers, with confidence intervals.

For pretraining: retrieval utility (RU, log p(y|z,x) - log p(y|null,x), so 0 is the null
document) over the first and the last quarter of the planned steps with a 95% confidence
interval, masked accuracy with retrieval and with the null document alone (and their paired
difference), generations used, staleness (max / mean), and the held-out span recall at the
start and the end with its paired sign test where the run's saved summary holds it. The
quarters are the summary's (``realm.training.pretrain.quarter_means``): a record logged at step
``s`` belongs to the first quarter when ``s <= steps / 4``, to the last when ``s > 3 steps / 4``.

For the other stages: the loss over the first and last quarter, and every figure logged once
(an Open-QA run's final exact match, F1 and answer recall@k) as a table.
"""

from __future__ import annotations

import html
import math
from typing import Any, Optional

import numpy as np

from realm.report.records import STAGE_TITLES, numeric

#: Two-sided 95% Student t quantiles by degrees of freedom (beyond the table: the next lower
#: entry, which errs wide).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021,
       60: 2.000, 120: 1.980}

#: How the box's intervals are made (said in the box).
CI_METHOD = ("95% confidence intervals: Student t over the logged records of the quarter (each "
             "the mean of logging.log_every steps; records treated as independent).")

#: Summary keys the box reads from the run's saved summary line when it has them.
SUMMARY_ONLY = ("span_recall_start", "span_recall_end", "span_recall_gained", "span_recall_lost",
                "span_recall_p", "span_recall_examples")


def t95(df: int) -> float:
    """The two-sided 95% Student t quantile for ``df`` degrees of freedom (``df >= 1``)."""
    return T95[max(d for d in T95 if d <= df)]


def mean_ci(values: list[float]) -> dict[str, Any]:
    """``{mean, low, high, n}``: the mean and its 95% Student t interval (None with one value,
    everything None with none), rounded to 5 digits."""
    n = len(values)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(np.mean(values))
    if n == 1:
        return {"mean": round(mean, 5), "low": None, "high": None, "n": 1}
    half = t95(n - 1) * float(np.std(values, ddof=1)) / math.sqrt(n)
    return {"mean": round(mean, 5), "low": round(mean - half, 5), "high": round(mean + half, 5),
            "n": n}


def quarter_values(records: list[dict[str, Any]], steps: int, metric: str
                   ) -> dict[str, list[float]]:
    """The values of ``metric`` in the first and the last quarter of ``steps`` (the summary's
    rule), as ``{"first_quarter": [...], "last_quarter": [...]}``."""
    xs, ys = numeric(records, metric)
    return {"first_quarter": [y for x, y in zip(xs, ys) if x <= steps / 4],
            "last_quarter": [y for x, y in zip(xs, ys) if x > 3 * steps / 4]}


def paired_gain(records: list[dict[str, Any]], steps: int, metric: str, control: str
                ) -> dict[str, list[float]]:
    """Per record ``metric - control`` (both logged), by quarter as :func:`quarter_values`."""
    diffs = [{"step": r["step"], "gain": r[metric] - r[control]} for r in records
             if all(isinstance(r.get(k), (int, float)) for k in (metric, control))]
    return quarter_values(diffs, steps, "gain")


def headline_numbers(records: list[dict[str, Any]], steps: int, stage: str,
                     summary: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The headline box's numbers, named as the run's summary names them.

    Args:
        records: The run's scalar metric records (each with ``step``).
        steps: The run's planned steps (``train.steps``): the quarters are quarters of it.
        stage: The stage that logged them (:func:`realm.report.records.detect_stage`).
        summary: The run's saved summary line, if any: its generations, staleness and span
            recall are taken over (they see every step; the records every ``log_every``).

    Returns:
        ``{stage, steps, last_step, NAME_first_quarter, NAME_last_quarter, ...}`` with, for
        each quartered metric, ``NAME_PART_ci`` = ``[low, high]`` and ``NAME_PART_n``.
    """
    summary = summary or {}
    out: dict[str, Any] = {"stage": stage, "steps": steps,
                           "last_step": max((r["step"] for r in records), default=0)}
    quartered = {"ru": "ru_expected", "masked_accuracy": "masked_accuracy",
                 "masked_accuracy_null": "masked_accuracy_null", "loss": "loss",
                 "loss_null": "loss_null"}
    parts = {name: quarter_values(records, steps, metric) for name, metric in quartered.items()}
    parts["masked_accuracy_gain"] = paired_gain(records, steps, "masked_accuracy",
                                                "masked_accuracy_null")
    for name, by_part in parts.items():
        for part, values in by_part.items():
            if values:
                ci = mean_ci(values)
                out[f"{name}_{part}"] = ci["mean"]
                out[f"{name}_{part}_ci"] = [ci["low"], ci["high"]]
                out[f"{name}_{part}_n"] = ci["n"]
    _, generations = numeric(records, "index/generation")
    if generations:
        out["generations_swapped"] = summary.get("generations_swapped", len(set(generations)))
    _, stale = numeric(records, "index/staleness_steps")
    if stale:
        out["max_staleness_steps"] = summary.get("max_staleness_steps", int(max(stale)))
        out["mean_staleness_steps"] = round(float(np.mean(stale)), 2)
    _, stale_s = numeric(records, "index/staleness_s")
    if stale_s:
        out["mean_staleness_s"] = round(float(np.mean(stale_s)), 2)
    out.update({k: summary[k] for k in SUMMARY_ONLY if summary.get(k) is not None})
    once = {}
    for key in sorted({k for r in records for k in r} - {"step", "time"}):
        xs, ys = numeric(records, key)
        if len(xs) == 1:
            once[key] = ys[0]
    if once:
        out["logged_once"] = once
    return out


def figure_order(key: str) -> tuple:
    """Sort key of figures logged once: exact match, F1, recall@k by k, then the rest."""
    name = key.rsplit("/", 1)[-1]
    head, _, k = name.partition("@")
    rank = next((i for i, w in enumerate(("exact_match", "f1", "recall")) if w in head), 3)
    return (rank, head, int(k) if k.isdigit() else 0, name)


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bold(numbers: dict[str, Any], key: str, spec: str = "") -> str:
    """The number ``key`` in bold, the exact value in ``data-value``."""
    value = numbers[key]
    return f"<b data-key='{key}' data-value='{value!r}'>{value:{spec}}</b>"


def _cell(numbers: dict[str, Any], key: str, digits: int = 3, signed: bool = False) -> str:
    """A table cell: the value and its interval, the exact value in ``data-value``."""
    value = numbers.get(key)
    if value is None:
        return "<td>-</td>"
    low, high = numbers.get(f"{key}_ci", [None, None])
    text = f"{value:+.{digits}f}" if signed else _fmt(value, digits)
    if low is not None:
        text += f" [{_fmt(low, digits)}, {_fmt(high, digits)}]"
    n = numbers.get(f"{key}_n")
    title = f" title='{n} record{'s' * (n != 1)}'" if n else ""
    return f"<td data-key='{key}' data-value='{value!r}'{title}>{html.escape(text)}</td>"


def _verdict(numbers: dict[str, Any]) -> str:
    """One sentence: does retrieval beat the null document in the last quarter?"""
    value, (low, high) = numbers.get("ru_last_quarter"), numbers.get("ru_last_quarter_ci",
                                                                      [None, None])
    if value is None:
        return ("No retrieval utility in the last quarter yet "
                f"(step {numbers['last_step']} of {numbers['steps']}).")
    if low is None:
        return f"Last-quarter RU is {value:+.3f} nats (one record: no interval)."
    if low > 0:
        return (f"Retrieval helps: in the last quarter the retrieved blocks raise log p(y|x) by "
                f"{value:.3f} nats [{low:.3f}, {high:.3f}] over the null document.")
    if high < 0:
        return (f"Retrieval hurts: in the last quarter RU is {value:.3f} nats "
                f"[{low:.3f}, {high:.3f}], below the null document.")
    return (f"Not distinguishable from the null document: last-quarter RU {value:+.3f} nats, "
            f"interval [{low:.3f}, {high:.3f}] holds 0.")


def headline_html(numbers: dict[str, Any]) -> str:
    """The box (a ``<section class='headline'>``) for :func:`headline_numbers`' output."""
    e = html.escape
    rows = [("ru", "Retrieval utility (nats): log p(y|z,x) - log p(y|null,x), expected over "
             "p(z|x)", False),
            ("masked_accuracy", "Masked accuracy with retrieval", False),
            ("masked_accuracy_null", "Masked accuracy, the null document alone", False),
            ("masked_accuracy_gain", "Masked accuracy gain (with - without, paired)", True),
            ("loss", "Loss (nats)", False),
            ("loss_null", "Loss, the null document alone (nats)", False)]
    pretrain = numbers["stage"] == "pretrain"
    if pretrain:
        rows = [r for r in rows if not r[0].startswith("loss")]
    parts = ["<section class='headline'>",
             f"<h2>Headline: {e(STAGE_TITLES.get(numbers['stage'], numbers['stage']))}</h2>"]
    if pretrain:
        parts.append(f"<p class='verdict'>{e(_verdict(numbers))}</p>")
    table = []
    for name, label, signed in rows:
        if any(f"{name}_{p}" in numbers for p in ("first_quarter", "last_quarter")):
            cells = "".join(_cell(numbers, f"{name}_{part}", signed=signed)
                            for part in ("first_quarter", "last_quarter"))
            table.append(f"<tr><th>{e(label)}</th>{cells}</tr>")
    if table:
        parts += ["<table><tr><th></th><th>first quarter</th><th>last quarter</th></tr>", *table,
                  "</table>"]
    parts.append("<ul>")
    if "generations_swapped" in numbers:
        parts.append(f"<li>Index generations used: {_bold(numbers, 'generations_swapped')}</li>")
    if "max_staleness_steps" in numbers:
        seconds = (f" ({numbers['mean_staleness_s']:.1f} s on average)"
                   if "mean_staleness_s" in numbers else "")
        parts.append(f"<li>Index staleness: max {_bold(numbers, 'max_staleness_steps')} steps, "
                     f"mean {_bold(numbers, 'mean_staleness_steps', '.1f')} steps{seconds}</li>")
    if "span_recall_start" in numbers and "span_recall_end" in numbers:
        get = numbers.get
        p = (f"p = {_bold(numbers, 'span_recall_p', '.3g')}" if "span_recall_p" in numbers
             else "p -")
        parts.append(
            f"<li>Held-out span recall ({get('span_recall_examples', '?')} masked sentences; "
            "does the top-k hold the masked span?): start "
            f"{_bold(numbers, 'span_recall_start', '.3f')} &rarr; end "
            f"{_bold(numbers, 'span_recall_end', '.3f')} (gained {get('span_recall_gained', '?')}, "
            f"lost {get('span_recall_lost', '?')}; paired sign test {p})</li>")
    parts.append("</ul>")
    once = numbers.get("logged_once", {})
    if once and not pretrain:
        parts.append("<table><tr><th>logged once (the final evaluation)</th><th>value</th></tr>")
        for key, value in sorted(once.items(), key=lambda kv: figure_order(kv[0])):
            parts.append(f"<tr><th>{e(key)}</th><td data-key='{e(key)}' data-value='{value!r}'>"
                         f"{value:.5g}</td></tr>")
        parts.append("</table>")
    parts.append(f"<p class='note'>Quarters of the planned {numbers['steps']} steps (last record "
                 f"at step {numbers['last_step']}). {e(CI_METHOD)}</p></section>")
    return "\n".join(parts)
