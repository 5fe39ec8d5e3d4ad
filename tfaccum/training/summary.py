"""``summary.csv`` and ``summary.md``: one row per run, compared with the baseline.

The baseline is the ``fp32`` run. A run is *within 0.5 %* when its final test error is
at most 0.5 percentage points above the baseline's (the paper's tolerance: with the
predicted precision a network converges to its baseline; one bit fewer degrades it by
more than that).
"""

from __future__ import annotations

import csv
import io
import os
from typing import List, Mapping, Optional

COLUMNS = ("run", "policy", "offset", "chunk_size", "bits", "epochs", "test_error_pct",
           "delta_vs_fp32_pct", "within_0.5pct", "train_time_s")
TOLERANCE_PCT = 0.5


def rows(results: List[Mapping]) -> List[dict]:
    """Table rows from run results (``result.json`` contents), baseline first."""
    results = sorted(results, key=lambda r: (r["run"]["policy"] != "fp32",
                                             r["run"]["chunk_size"], -r["run"]["offset"],
                                             r["name"]))
    base: Optional[float] = next((r["test_error_pct"] for r in results
                                  if r["run"]["policy"] == "fp32"), None)
    out = []
    for r in results:
        delta = None if base is None else r["test_error_pct"] - base
        out.append({
            "run": r["name"],
            "policy": r["run"]["policy"],
            "offset": r["run"]["offset"],
            "chunk_size": r["run"]["chunk_size"],
            "bits": r["bits"],
            "epochs": r["epochs"],
            "test_error_pct": round(r["test_error_pct"], 2),
            "delta_vs_fp32_pct": None if delta is None else round(delta, 2),
            "within_0.5pct": None if delta is None else bool(delta <= TOLERANCE_PCT),
            "train_time_s": round(r.get("train_time_s", 0.0), 1),
        })
    return out


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column == "within_0.5pct":
        return "yes" if value else "no"
    if column == "delta_vs_fp32_pct":
        return f"{value:+.2f}"
    if column == "test_error_pct":
        return f"{value:.2f}"
    return str(value)


def markdown(table: List[dict]) -> str:
    header = ["run", "policy", "offset", "chunk", "accumulator bits", "epochs",
              "test error %", "Δ vs fp32 (pp)", "within 0.5 %", "time s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        lines.append("| " + " | ".join(_cell(c, row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write(model_dir: str, results: List[Mapping], title: str = "") -> str:
    """Writes both files (atomically) and returns the Markdown table."""
    table = rows(results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    text = markdown(table)
    _atomic_write(os.path.join(model_dir, "summary.csv"), buffer.getvalue())
    _atomic_write(os.path.join(model_dir, "summary.md"),
                  (f"# {title}\n\n" if title else "") + text)
    return text


def _atomic_write(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
