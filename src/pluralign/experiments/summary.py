"""Aggregate ``results.jsonl`` rows: mean and standard error per setting × method × n."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pluralign._atomic import atomic_write_text

__all__ = ["markdown_table", "summarize", "write_summary_csv"]


def summarize(rows: Iterable[dict[str, Any]], metrics: Iterable[str]) -> list[dict[str, Any]]:
    """One record per (setting, method, n): ``count``, and ``<metric>_mean`` / ``<metric>_se``.

    The standard error is ``std(ddof=1) / sqrt(count)`` (NaN for a single repeat). Metrics a
    method does not report (e.g. ``estimation_error`` of a context-free model) are left out of
    its mean.
    """
    metrics = [*list(metrics), "fit_seconds"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["method"], row["n"]), []).append(row)
    out = []
    for (setting, method, n), group in groups.items():
        record: dict[str, Any] = {"setting": setting, "method": method, "n": n, "count": len(group)}
        for metric in metrics:
            values = [float(r[metric]) for r in group if metric in r]
            values = [v for v in values if math.isfinite(v)]
            if not values:
                continue
            mean = sum(values) / len(values)
            if len(values) > 1:
                var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
                se = math.sqrt(var / len(values))
            else:
                se = float("nan")
            record[f"{metric}_mean"] = mean
            record[f"{metric}_se"] = se
        out.append(record)
    return out


def write_summary_csv(summary: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the summary as CSV, atomically; columns are the union over records."""
    columns: list[str] = []
    for record in summary:
        columns.extend(c for c in record if c not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary)
    return atomic_write_text(path, buffer.getvalue())


def markdown_table(summary: list[dict[str, Any]], metric: str, methods: list[str]) -> str:
    """A Markdown pivot of ``metric``: one row per (setting, n), one column per method,
    cells ``mean ± se``."""
    cells = {(r["setting"], r["n"], r["method"]): r for r in summary}
    keys = sorted({(r["setting"], r["n"]) for r in summary}, key=lambda k: (k[0], k[1]))
    lines = [
        "| setting | N | " + " | ".join(methods) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in methods) + " |",
    ]
    for setting, n in keys:
        row = []
        for method in methods:
            rec = cells.get((setting, n, method))
            if rec is None or f"{metric}_mean" not in rec:
                row.append("—")
                continue
            mean, se = rec[f"{metric}_mean"], rec.get(f"{metric}_se", float("nan"))
            row.append(f"{mean:.3g}" if math.isnan(se) else f"{mean:.3g} ± {se:.2g}")
        lines.append(f"| {setting} | {n} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
