"""From per-item records to results: rows {model, task, subset, n, metric, value, stderr}, tables, comparisons.

The standard error is lm-evaluation-harness's for a mean: the sample standard deviation (n - 1
in the denominator) over the square root of n. Two runs differ beyond the noise when their
difference exceeds 1.96 standard errors of the difference (about a 95% two-sided test for
independent samples; on the same items it is conservative).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

from .data import HHH_SUBSETS

RESULTS_FILE = "results.json"
Z95 = 1.96


def mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def aggregate(records: Iterable[dict], model: str, task_order: list[str]) -> list[dict]:
    """One row per (task, subset) and one per task with subset "all" (the task's own figure)."""
    by_task: dict[str, dict[str, list[float]]] = {}
    for r in records:
        by_task.setdefault(r["task"], {}).setdefault(r["subset"], []).append(float(r["value"]))
    rows = []
    for task in [t for t in task_order if t in by_task] + sorted(set(by_task) - set(task_order)):
        subsets = by_task[task]
        order = [s for s in HHH_SUBSETS if s in subsets] + sorted(set(subsets) - set(HHH_SUBSETS) - {"all"})
        every = [v for s in subsets.values() for v in s]
        named = [(s, subsets[s]) for s in order] if order else []
        for subset, values in named + [("all", every)]:
            value, stderr = mean_stderr(values)
            rows.append({"model": model, "task": task, "subset": subset, "n": len(values), "metric": "acc",
                         "value": value, "stderr": stderr})
    return rows


def write_results(out_dir: Path, rows: list[dict]) -> Path:
    path = out_dir / RESULTS_FILE
    path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return path


def read_results(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results here (run `dromedary evaluate --output_dir {out_dir}` first)")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    keys = {"model", "task", "subset", "n", "metric", "value", "stderr"}
    if not isinstance(rows, list) or not all(isinstance(r, dict) and keys <= set(r) for r in rows):
        raise ValueError(f"{path}: expected a list of {{{', '.join(sorted(keys))}}} rows")
    return rows


def _grid(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *body]]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """task, subset, n, accuracy +- standard error, per model."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        body = [[r["task"], r["subset"], str(r["n"]), f"{r['value']:.4f}", f"± {r['stderr']:.4f}"]
                for r in rows if r["model"] == model]
        out.append(f"model: {model}\n" + _grid(["task", "subset", "n", "acc", "stderr"], body))
    return "\n\n".join(out)


def compare_table(a: list[dict], b: list[dict], name_a: str = "A", name_b: str = "B") -> str:
    """Two runs side by side: each figure, B - A, and whether the difference exceeds the noise."""
    index = {(r["task"], r["subset"]): r for r in b}
    body = []
    for r in a:
        other = index.get((r["task"], r["subset"]))
        if other is None:
            continue
        diff = other["value"] - r["value"]
        noise = Z95 * math.hypot(r["stderr"], other["stderr"])
        body.append([r["task"], r["subset"], f"{r['n']}/{other['n']}", f"{r['value']:.4f} ± {r['stderr']:.4f}",
                     f"{other['value']:.4f} ± {other['stderr']:.4f}", f"{diff:+.4f}",
                     "yes" if abs(diff) > noise else "no"])
    models = f"A: {a[0]['model'] if a else name_a}\nB: {b[0]['model'] if b else name_b}"
    if not body:
        return models + "\n(no task and subset in common)"
    return models + "\n" + _grid(["task", "subset", "n", f"A ({name_a})", f"B ({name_b})", "B - A", "beyond noise"], body)


def compare_runs(runs: list[list[dict]], names: list[str]) -> str:
    """Several runs side by side (A, B, C, ... in the order given, e.g. base, engraved, optimised):
    each figure, each run minus the one before it, and a * where that difference exceeds the noise.
    Only the (task, subset) rows that every run has."""
    letters = [chr(ord("A") + i) for i in range(len(runs))]
    indexes = [{(r["task"], r["subset"]): r for r in run} for run in runs[1:]]
    body = []
    for r in runs[0] if runs else []:
        row = [r, *(ix.get((r["task"], r["subset"])) for ix in indexes)]
        if any(x is None for x in row):
            continue
        cells = [r["task"], r["subset"], "/".join(str(x["n"]) for x in row),
                 *(f"{x['value']:.4f} ± {x['stderr']:.4f}" for x in row)]
        for before, after in zip(row, row[1:]):
            diff = after["value"] - before["value"]
            beyond = abs(diff) > Z95 * math.hypot(before["stderr"], after["stderr"])
            cells.append(f"{diff:+.4f}" + (" *" if beyond else "  "))
        body.append(cells)
    models = "\n".join(f"{letter}: {run[0]['model'] if run else name}" for letter, run, name in zip(letters, runs, names))
    if not body:
        return models + "\n(no task and subset in common)"
    header = ["task", "subset", "n", *(f"{letter} ({name})" for letter, name in zip(letters, names)),
              *(f"{b} - {a}" for a, b in zip(letters, letters[1:]))]
    return (models + "\n" + _grid(header, body)
            + f"\n* the difference exceeds the noise ({Z95} standard errors of the difference)")
