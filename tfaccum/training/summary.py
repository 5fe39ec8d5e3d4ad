"""``summary.csv``, ``summary.md`` and a TensorBoard summary: the configurations of an
experiment compared with the float32 baseline, over seeds, with confidence intervals.

Every configuration (fp32, predicted, predicted-1, ...) runs once per seed, and for a
given seed every configuration starts from the same initial weights and sees the same
batches (and, for digits, tests on the same fold). So the comparison is *paired*: for
seed ``s`` the difference ``d_s = error(config, s) - error(fp32, s)`` cancels what the
seed does to both. Per configuration:

* the test error, mean over seeds ``± t_{0.975, k-1} sd / sqrt(k)`` (95 % Student-t
  interval over the ``k`` seeds);
* the paired difference to fp32, mean ``± t sd(d) / sqrt(k)``;
* a verdict from that interval, against the paper's tolerance of 0.5 percentage
  points: **within 0.5 pp** when its upper end is at most +0.5, **worse by more than
  0.5 pp** when its lower end is above +0.5, **inconclusive** otherwise (and always with
  a single seed, which has no interval).

``summary.md`` also holds, for every predicted configuration, the analysis against the
monitor: per emulated GEMM, the retention the plan predicted at its width and the one the
health probe measured on real data during training (last probe, mean over seeds; and the
lowest of any probe), flagged where it fell short of the prediction by more than the Monte
Carlo tolerance (:func:`tfaccum.analysis.measure.falls_short`).
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

TOLERANCE_PCT = 0.5
VERDICTS = ("within 0.5 pp", "worse by more than 0.5 pp", "inconclusive")

COLUMNS = ("run", "policy", "offset", "chunk_size", "bits", "seeds", "test_error_pct",
           "test_error_ci_pct", "delta_vs_fp32_pct", "delta_ci_low_pct", "delta_ci_high_pct",
           "verdict", "train_time_s")


def t_quantile(dof: int, p: float = 0.975) -> float:
    """Student's t quantile."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


def mean_ci(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """(mean, half-width of the 95 % t interval), the half-width None for one value."""
    k = len(values)
    if k == 0:
        raise ValueError("no values")
    mean = sum(values) / k
    if k < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
    return mean, t_quantile(k - 1) * sd / math.sqrt(k)


def verdict(mean: float, half_width: Optional[float],
            tolerance: float = TOLERANCE_PCT) -> str:
    """The verdict of a paired difference's interval (see the module docstring)."""
    if half_width is None or not math.isfinite(half_width):
        return "inconclusive"
    if mean + half_width <= tolerance:
        return "within 0.5 pp"
    if mean - half_width > tolerance:
        return "worse by more than 0.5 pp"
    return "inconclusive"


def _config_key(run: Mapping) -> Tuple:
    return (run["policy"], run["offset"], run["chunk_size"])


def rows(results: List[Mapping]) -> List[dict]:
    """One row per configuration, baseline first, from run results (``result.json``)."""
    groups: Dict[Tuple, List[Mapping]] = {}
    for r in results:
        groups.setdefault(_config_key(r["run"]), []).append(r)
    order = sorted(groups, key=lambda k: (k[0] != "fp32", k[2], -k[1], k[0]))
    base = {r["seed"]: r["test_error_pct"] for r in groups.get(("fp32", 0, 0), [])}
    out = []
    for key in order:
        runs = sorted(groups[key], key=lambda r: r["seed"])
        errors = [r["test_error_pct"] for r in runs]
        mean, half = mean_ci(errors)
        paired = [r["test_error_pct"] - base[r["seed"]] for r in runs if r["seed"] in base]
        if paired and key[0] != "fp32":
            d_mean, d_half = mean_ci(paired)
            judged = verdict(d_mean, d_half)
        elif key[0] == "fp32":
            d_mean, d_half, judged = 0.0, 0.0, "baseline"
        else:
            d_mean, d_half, judged = None, None, "no baseline"
        out.append({
            "run": runs[0]["name"],
            "policy": key[0], "offset": key[1], "chunk_size": key[2],
            "bits": runs[0]["bits"],
            "seeds": len(runs),
            "test_error_pct": round(mean, 3),
            "test_error_ci_pct": None if half is None else round(half, 3),
            "delta_vs_fp32_pct": None if d_mean is None else round(d_mean, 3),
            "delta_ci_low_pct": (None if d_mean is None or d_half is None
                                 else round(d_mean - d_half, 3)),
            "delta_ci_high_pct": (None if d_mean is None or d_half is None
                                  else round(d_mean + d_half, 3)),
            "verdict": judged,
            "train_time_s": round(sum(r.get("train_time_s", 0.0) for r in runs), 1),
        })
    return out


def _pm(mean, half, signed=False) -> str:
    if mean is None:
        return "-"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text + ("" if half is None else f" ± {half:.2f}")


def markdown(table: List[dict]) -> str:
    header = ["run", "accumulator bits", "seeds", "test error % (95 % CI)",
              "Δ vs fp32, paired (pp, 95 % CI)", "verdict", "time s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        d = row["delta_vs_fp32_pct"]
        half = (None if row["delta_ci_high_pct"] is None or d is None
                else row["delta_ci_high_pct"] - d)
        delta = "-" if row["policy"] == "fp32" else _pm(d, half, signed=True)
        lines.append("| " + " | ".join([
            row["run"], row["bits"], str(row["seeds"]),
            _pm(row["test_error_pct"], row["test_error_ci_pct"]), delta, row["verdict"],
            f"{row['train_time_s']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def health_rows(results: List[Mapping]) -> List[dict]:
    """Analysis against monitor for the unshifted predicted configurations: one row per
    emulated GEMM, over the seeds."""
    out: Dict[Tuple, dict] = {}
    for r in results:
        run = r["run"]
        if run["policy"] != "predicted" or run["offset"] != 0:
            continue
        for layer, per_gemm in (r.get("health") or {}).items():
            for gemm, v in per_gemm.items():
                key = (r["name"], layer, gemm)
                row = out.setdefault(key, {"run": r["name"], "layer": layer, "gemm": gemm,
                                           "predicted": v.get("predicted"), "last": [],
                                           "min": math.inf, "probes": 0, "short": 0})
                if v.get("last") is not None and math.isfinite(v["last"]):
                    row["last"].append(v["last"])
                if v.get("min") is not None and math.isfinite(v["min"]):
                    row["min"] = min(row["min"], v["min"])
                row["probes"] += int(v.get("probes", 0))
                row["short"] += int(v.get("short", 0))
    layer_order: Dict[str, int] = {}
    for key in out:
        layer_order.setdefault(key[1], len(layer_order))
    gemms = ("fwd", "bwd", "grad")
    table = []
    for key in sorted(out, key=lambda k: (k[0], layer_order[k[1]], gemms.index(k[2])
                                          if k[2] in gemms else 3)):
        row = out[key]
        last = row.pop("last")
        row["measured_last_mean"] = sum(last) / len(last) if last else None
        if not math.isfinite(row["min"]):
            row["min"] = None
        table.append(row)
    return table


def health_markdown(table: List[dict]) -> str:
    if not table:
        return ""
    lines = ["| run | GEMM | predicted retention | measured, last probe (mean over seeds) | "
             "measured, lowest probe | probes short of prediction |",
             "|---|---|---|---|---|---|"]
    for row in table:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        short = f"{row['short']} of {row['probes']}" + (" **short**" if row["short"] else "")
        lines.append(f"| {row['run']} | {row['layer']}/{row['gemm']} | {fmt(row['predicted'])} "
                     f"| {fmt(row['measured_last_mean'])} | {fmt(row['min'])} | {short} |")
    return "\n".join(lines) + "\n"


def write(model_dir: str, results: List[Mapping], title: str = "") -> str:
    """Writes summary.csv, summary.md (atomically) and the TensorBoard summary under
    ``<model_dir>/summary``; returns the Markdown text printed on the console."""
    table = rows(results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in COLUMNS})
    text = markdown(table)
    health = health_markdown(health_rows(results))
    if health:
        text += ("\nPredicted retention (the plan) against measured retention (the health "
                 "probe on test images during training):\n\n" + health)
    _atomic_write(os.path.join(model_dir, "summary.csv"), buffer.getvalue())
    _atomic_write(os.path.join(model_dir, "summary.md"),
                  (f"# {title}\n\n" if title else "") + text)
    _tensorboard(model_dir, table, (f"# {title}\n\n" if title else "") + text)
    return text


def _tensorboard(model_dir: str, table: List[dict], text: str):
    """The comparison as scalars (one tag per configuration) and the tables as text."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(os.path.join(model_dir, "summary"))
    with writer.as_default(step=0):
        tf.summary.text("summary", text)
        for row in table:
            name = row["run"]
            tf.summary.scalar(f"test_error_mean/{name}", row["test_error_pct"])
            if row["test_error_ci_pct"] is not None:
                tf.summary.scalar(f"test_error_ci_halfwidth/{name}", row["test_error_ci_pct"])
            if row["policy"] != "fp32" and row["delta_vs_fp32_pct"] is not None:
                tf.summary.scalar(f"delta_vs_fp32_mean/{name}", row["delta_vs_fp32_pct"])
                if row["delta_ci_low_pct"] is not None:
                    tf.summary.scalar(f"delta_vs_fp32_ci_low/{name}", row["delta_ci_low_pct"])
                    tf.summary.scalar(f"delta_vs_fp32_ci_high/{name}",
                                      row["delta_ci_high_pct"])
    writer.close()


def _atomic_write(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
