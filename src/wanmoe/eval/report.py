"""Comparison reports: a markdown table and PNG bar plots of metrics per set-up.

Rows are ``{setup name: {metric name: value}}``; a set-up missing a metric gets an empty cell / no bar.
matplotlib is imported lazily and switched to the non-interactive Agg backend inside ``plot_bars`` only
(importing this module changes no process-wide state).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["metric_names", "markdown_table", "plot_bars", "write_report"]

Rows = Mapping[str, Mapping[str, float]]


def metric_names(rows: Rows) -> list[str]:
    """All metric names in first-seen order across set-ups."""
    names: list[str] = []
    for metrics in rows.values():
        names.extend(m for m in metrics if m not in names)
    return names


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    a = abs(value)
    return f"{value:.4g}" if a >= 1e-3 or a == 0 else f"{value:.3e}"


def markdown_table(rows: Rows, metrics: Sequence[str] | None = None) -> str:
    """GitHub markdown table: one row per set-up, one column per metric (4 significant digits)."""
    if not rows:
        raise ValueError("rows is empty: nothing to report")
    cols = list(metrics) if metrics is not None else metric_names(rows)
    lines = ["| setup | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, vals in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(vals.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_bars(rows: Rows, path: str | os.PathLike, metrics: Sequence[str] | None = None) -> Path:
    """One PNG with a bar chart per metric (set-ups on the x axis); returns the path written."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless; set here, not at import (no import-time side effects)
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("rows is empty: nothing to plot")
    cols = list(metrics) if metrics is not None else metric_names(rows)
    names = list(rows)
    fig, axes = plt.subplots(1, len(cols), figsize=(max(3.0, 0.6 * len(names) + 1.5) * len(cols), 3.6),
                             squeeze=False)
    for ax, metric in zip(axes[0], cols):
        vals = [rows[n].get(metric) for n in names]
        finite = [(i, v) for i, v in enumerate(vals) if v is not None and math.isfinite(v)]
        ax.bar([i for i, _ in finite], [v for _, v in finite], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(rows: Rows, out_dir: str | os.PathLike, *, title: str = "wanmoe evaluation",
                 notes: str = "") -> Path:
    """Write ``report.md`` (title, optional notes, table, embedded plot) and ``metrics.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_bars(rows, out / "metrics.png")
    text = f"# {title}\n\n" + (notes.strip() + "\n\n" if notes.strip() else "")
    text += markdown_table(rows) + f"\n![metrics]({png.name})\n"
    md = out / "report.md"
    md.write_text(text)
    return md
