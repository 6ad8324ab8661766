"""The report's PNG figures: curves (raw records faint, a moving mean over them bold) and bars
(with the number of records behind each bar). matplotlib is imported when a :class:`Canvas` is
made, with the Agg backend (no display needed)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

#: Curves of fewer records than this are drawn raw only (points, no moving mean).
SMOOTH_FROM = 10


@dataclass
class Figure:
    """A drawn figure: its file in the report directory, caption, and page section."""

    file: str
    caption: str
    section: str


def smoothing_window(n: int) -> int:
    """The moving mean's width for a curve of ``n`` records: about a tenth of them, odd, at
    least 3; 1 (no smoothing) below :data:`SMOOTH_FROM` records."""
    if n < SMOOTH_FROM:
        return 1
    w = max(3, n // 10)
    return w + 1 - w % 2


def moving_mean(ys: list[float], window: int) -> np.ndarray:
    """The centred moving mean of ``ys`` over ``window`` records (fewer at the ends)."""
    y = np.asarray(ys, dtype=float)
    if window <= 1:
        return y
    kernel = np.ones(window)
    return np.convolve(y, kernel, mode="same") / np.convolve(np.ones_like(y), kernel, mode="same")


class Canvas:
    """Draws figures into ``directory`` and remembers them (:attr:`figures`) in drawing order."""

    def __init__(self, directory: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.directory = plt, directory
        self.figures: list[Figure] = []

    def _save(self, fig, stem: str, caption: str, section: str) -> None:
        fig.tight_layout()
        fig.savefig(os.path.join(self.directory, f"{stem}.png"), dpi=90)
        self.plt.close(fig)
        self.figures.append(Figure(f"{stem}.png", caption, section))

    def curves(self, stem: str, title: str, series: list[tuple[str, list, list]], ylabel: str,
               section: str, xlabel: str = "step", markers: Optional[list[int]] = None,
               labels: Optional[dict[str, str]] = None, zero_line: bool = False) -> None:
        """One panel of curves: each series' records faint and its moving mean bold (or its
        points, when short); dotted verticals at ``markers`` (the generation swaps); a black
        line at 0 with ``zero_line``."""
        fig, ax = self.plt.subplots(figsize=(7, 3.4))
        if zero_line:
            ax.axhline(0, color="black", linewidth=0.8)
        widths = set()
        for i, (name, xs, ys) in enumerate(series):
            color = f"C{i % 10}"
            label = (labels or {}).get(name, name)
            window = smoothing_window(len(xs))
            if window == 1:
                ax.plot(xs, ys, marker=".", color=color, label=label)
                continue
            widths.add(window)
            ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
            ax.plot(xs, moving_mean(ys, window), color=color, linewidth=1.8, label=label)
        for i, s in enumerate(markers or []):
            ax.axvline(s, color="grey", linestyle=":", linewidth=1,
                       label="generation swapped in" if i == 0 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1 or markers or widths:
            ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)
        caption = title
        if widths:
            caption += (f" (faint: each logged record; bold: moving mean over "
                        f"{'/'.join(map(str, sorted(widths)))} records)")
        self._save(fig, stem, caption, section)

    def half_bars(self, stem: str, title: str, series: list[tuple[str, list, list]],
                  ylabel: str, section: str) -> None:
        """Each series' mean over the first and the second half of the steps, side by side, the
        number of records behind each bar written on it (a curve per label is noise). Labels
        with the most records come first."""
        half = (max(max(xs) for _, xs, _ in series) + 1) / 2
        cells = []
        for name, xs, ys in series:
            first = [y for x, y in zip(xs, ys) if x <= half]
            second = [y for x, y in zip(xs, ys) if x > half]
            cells.append((name.rsplit("/", 1)[-1], first, second))
        cells.sort(key=lambda c: (-(len(c[1]) + len(c[2])), c[0]))
        at = np.arange(len(cells))
        fig, ax = self.plt.subplots(figsize=(7, 3.6))
        for offset, index, label in ((-0.2, 1, "first half of the steps"),
                                     (0.2, 2, "second half")):
            means = [np.mean(c[index]) if c[index] else np.nan for c in cells]
            bars = ax.bar(at + offset, means, 0.4, label=label)
            ax.bar_label(bars, labels=[str(len(c[index])) if c[index] else "" for c in cells],
                         fontsize=6, padding=1)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(at, [c[0] for c in cells], rotation=45, ha="right", fontsize=7)
        ax.set_title(title + " (mean; n on each bar: logged records)", fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        self._save(fig, stem, title + " (mean over the records of each half; the number on "
                   "each bar is how many logged records hold the label)", section)
