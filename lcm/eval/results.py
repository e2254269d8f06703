"""Results on disk: the per-sample JSONL, the summary JSON, markdown and CSV tables, heatmaps.

The JSONL is append-only: each batch's lines go out in one `write` followed by `fsync`, so a
killed run loses at most the batch in flight. On resume a torn last line (no trailing newline)
is cut off; any other line that does not parse is an error naming the file and the line, and
a row repeated exactly (same run, id and content) is counted once, with a warning.

The summary groups samples into cells keyed by (run, task, length) and scores each cell with
the metric's own aggregation (`lcm.eval.scoring.aggregate`). Headline averages, stated in the
outputs too: per run and length, `avg` is the unweighted mean of the task scores at that length
(RULER's headline, the mean over its tasks); per run and task, `all` is the unweighted mean over
that task's lengths. The heatmap is score (0-100) by needle depth x context length, per run and
task, for every task whose records carry a depth, and all runs of a task side by side in one PNG.

Intervals: a cell whose sample scores are all 0 or 1 (passkey's exact match, single-needle NIAH,
multiple choice) also gets `successes` and the 95% Wilson score interval of its success rate
(`ci_low`, `ci_high`, 0-100; `lcm.eval.metrics.wilson_interval`), shown in results.md's
per-cell table and in results.csv. A cell with fractional sample scores (multi-needle
string_match_all, F1, ROUGE) has no binomial count behind its mean, so its interval is None
('-'): an interval there would need another model (e.g. a bootstrap), which lcm does not
presume.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections import defaultdict

from lcm.eval.metrics import longbench_v2_table, wilson_interval
from lcm.eval.scoring import aggregate, length_group

RESULTS_FILE = "results.jsonl"


def append_lines(path: str, rows: list[dict]) -> None:
    """Appends rows as JSON lines in one write, then flushes them to disk."""
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


_REQUIRED = {"id": str, "task": str, "metric": str, "prediction": str, "score": (int, float)}


def read_results(path: str, *, repair: bool = False) -> list[dict]:
    """The rows of a results JSONL ([] when missing). repair=True cuts a torn last line and
    rewrites the file without repeated rows.

    A line that is not UTF-8, not JSON, or not a result row (id, task, length, metric,
    prediction, score) is a ValueError naming the file and the line. A (run, id) written twice
    with the same content (a batch appended twice) is counted once, with a warning; twice with
    different content is a ValueError naming both lines.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if not repair:
            line = data.count(b"\n") + 1
            raise ValueError(f"{path}: line {line} is incomplete (a killed run?); resume "
                             f"repairs it")
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    rows, seen, repeated = [], {}, []
    for number, raw in enumerate(data.split(b"\n")[:-1], 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: line {number} is not UTF-8 ({e.reason} at byte "
                             f"{e.start})") from None
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "id" not in row:
            raise ValueError(f"{path}: line {number} is not a result row (no 'id')")
        for key, kind in _REQUIRED.items():
            if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                raise ValueError(f"{path}: line {number} is not a result row ({key!r} is "
                                 f"{'missing' if key not in row else repr(row[key])[:40]})")
        if "length" not in row:
            raise ValueError(f"{path}: line {number} is not a result row ('length' is missing)")
        key = (row.get("run", "eval"), row["id"])
        if key in seen:
            first, kept = seen[key]
            if kept != row:
                raise ValueError(f"{path}: lines {first} and {number} both hold run "
                                 f"{key[0]!r} id {key[1]!r}, with different content; delete "
                                 f"the wrong one")
            repeated.append(number)
            continue
        seen[key] = (number, row)
        rows.append(row)
    if repeated:
        warnings.warn(f"{path}: lines {repeated} repeat earlier rows (same run, id and "
                      f"content); counted once{' and removed' if repair else ''}",
                      stacklevel=2)
        if repair:
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                                for r in rows).encode("utf-8"))
            os.replace(tmp, path)
    return rows


def _length_order(x):
    return (0, x, "") if isinstance(x, int) else (1, 0, str(x))


def summarize(rows: list[dict]) -> dict:
    """Cells (run, task, length) -> score, count, metric; plus the headline averages.

    The length of a cell is `lcm.eval.scoring.length_group` (LongBench: its buckets or 'all').
    Runs with LongBench v2 samples also get its Overall/Easy/Hard/Short/Medium/Long table.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        key = length_group(row["task"], row["length"], row.get("meta") or {})
        groups[(row.get("run", "eval"), row["task"], key)].append(row)
    cells = []
    for (run, task, length), items in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1], _length_order(kv[0][2]))):
        metrics = {r["metric"] for r in items}
        if len(metrics) != 1:
            raise ValueError(f"run={run!r} task={task!r} length={length}: samples use metrics "
                             f"{sorted(metrics)}; expected one per task")
        metric = metrics.pop()
        scores = [r["score"] for r in items]
        cells.append({"run": run, "task": task, "length": length, "metric": metric,
                      "score": aggregate(metric, scores, task=task),
                      "num_samples": len(items),
                      "num_empty": sum(1 for r in items if not r["prediction"].strip()),
                      **cell_interval(scores)})
    avg: dict[str, dict] = defaultdict(dict)
    for run in sorted({c["run"] for c in cells}):
        for length in sorted({c["length"] for c in cells if c["run"] == run}, key=_length_order):
            scores = [c["score"] for c in cells if c["run"] == run and c["length"] == length]
            avg[run][length] = round(sum(scores) / len(scores), 2)
    per_task = defaultdict(dict)
    for run, task in sorted({(c["run"], c["task"]) for c in cells}):
        scores = [c["score"] for c in cells if c["run"] == run and c["task"] == task]
        per_task[run][task] = round(sum(scores) / len(scores), 2)
    v2 = {}
    for run in sorted({r.get("run", "eval") for r in rows if r["metric"] == "extract_choice"}):
        v2[run] = longbench_v2_table(
            {"judge": r["score"] == 1.0, "difficulty": r["meta"]["difficulty"],
             "length": r["meta"]["length_class"]}
            for r in rows if r.get("run", "eval") == run and r["metric"] == "extract_choice")
    return {"cells": cells, "avg_over_tasks": dict(avg), "avg_over_lengths": dict(per_task),
            "num_samples": len(rows), **({"longbench_v2": v2} if v2 else {}),
            "definitions": {
                "score": "per (run, task, length): the task metric's own aggregate, 0-100",
                "avg": "per (run, length): unweighted mean of the task scores at that length",
                "all": "per (run, task): unweighted mean of the task's scores over lengths",
                "num_empty": "samples whose prediction is empty (RULER's 'Nulls')",
                "ci": "per cell with 0/1 sample scores: the 95% Wilson score interval of the "
                      "success rate (successes of num_samples), 0-100; None otherwise"}}


def cell_interval(scores, confidence: float = 0.95) -> dict:
    """{'successes', 'ci_low', 'ci_high'} of one cell's sample scores (each in [0, 1]): the
    count of scores equal to 1 and its Wilson interval in percent (2 decimals) when every score
    is 0 or 1; all three None when some score is fractional (see the module doc)."""
    scores = list(scores)
    if not scores:
        raise ValueError("scores is empty; a cell needs at least one sample")
    if any(s not in (0, 1) for s in scores):
        return {"successes": None, "ci_low": None, "ci_high": None}
    k = sum(1 for s in scores if s == 1)
    low, high = wilson_interval(k, len(scores), confidence)
    return {"successes": k, "ci_low": round(100 * low, 2), "ci_high": round(100 * high, 2)}


def _grid(summary):
    runs = sorted({c["run"] for c in summary["cells"]})
    lengths = sorted({c["length"] for c in summary["cells"]}, key=_length_order)
    by_key = {(c["run"], c["task"], c["length"]): c for c in summary["cells"]}
    rows = []
    for run in runs:
        for task in sorted({c["task"] for c in summary["cells"] if c["run"] == run}):
            cells = [by_key.get((run, task, n)) for n in lengths]
            rows.append((run, task, cells, summary["avg_over_lengths"][run][task]))
        avg = summary["avg_over_tasks"][run]
        rows.append((run, "avg", [{"score": avg[n]} if n in avg else None for n in lengths],
                     None))
    return lengths, rows


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


def markdown_table(summary: dict) -> str:
    """Run x task rows, one column per context length, then `all`; an `avg` row per run."""
    lengths, rows = _grid(summary)
    head = ["run", "task", *[_length_name(n) for n in lengths], "all"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, task, cells, overall in rows:
        scores = [_fmt(c["score"] if c else None) for c in cells]
        task_cell = "**avg**" if task == "avg" else task
        lines.append("| " + " | ".join([run, task_cell, *scores, _fmt(overall)]) + " |")
    d = summary["definitions"]
    lines += ["", f"score: {d['score']}; avg: {d['avg']}; all: {d['all']}."]
    for run, table in summary.get("longbench_v2", {}).items():
        lines += ["", f"LongBench v2 ({run}): " + ", ".join(
            f"{k} {_fmt(v) if v is not None else '-'}" for k, v in table.items())]
    lines += ["", interval_table(summary)]
    return "\n".join(lines)


def _ci(cell) -> str:
    if cell.get("ci_low") is None:
        return "-"
    return f"[{cell['ci_low']:.2f}, {cell['ci_high']:.2f}]"


def interval_table(summary: dict) -> str:
    """One row per cell (run, task, length): n, score, successes and the 95% Wilson interval
    ('-' for a cell with fractional sample scores), as markdown."""
    lines = ["| run | task | length | n | score | correct | 95% interval |",
             "|---|---|---:|---:|---:|---:|---|"]
    for c in summary["cells"]:
        k = "-" if c.get("successes") is None else str(c["successes"])
        lines.append(f"| {c['run']} | {c['task']} | {_length_name(c['length'])} | "
                     f"{c['num_samples']} | {_fmt(c['score'])} | {k} | {_ci(c)} |")
    lines += ["", "n: samples in the cell (depths pooled); correct: samples scoring 1; 95% "
              "interval: Wilson score interval of the success rate, 0-100 ('-': fractional "
              "sample scores, no interval)."]
    return "\n".join(lines) + "\n"


def csv_table(summary: dict) -> str:
    """One row per cell: run, task, length, metric, score, num_samples, num_empty, successes,
    ci_low, ci_high (empty where None)."""
    out = io.StringIO()
    fields = ["run", "task", "length", "metric", "score", "num_samples", "num_empty",
              "successes", "ci_low", "ci_high"]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for c in summary["cells"]:
        writer.writerow({k: "" if c.get(k) is None else c[k] for k in fields})
    for run, avg in summary["avg_over_tasks"].items():
        for length, score in avg.items():
            writer.writerow({"run": run, "task": "avg", "length": length, "metric": "mean",
                             "score": score, "num_samples": "", "num_empty": ""})
    return out.getvalue()


def _length_name(n) -> str:
    if isinstance(n, int) and n % 1024 == 0 and n >= 1024:
        return f"{n // 1024}k"
    return str(n)


def depth_grid(rows: list[dict], run: str, task: str, *, counts: bool = False):
    """(depths, lengths, scores [depth, length] in 0-100 or NaN) for one run and task; with
    counts=True also the samples behind each entry ([depth, length] int array, 0 where NaN)."""
    import numpy as np

    items = [r for r in rows if r.get("run", "eval") == run and r["task"] == task
             and r.get("depth") is not None]
    depths = sorted({round(r["depth"], 4) for r in items})
    lengths = sorted({r["length"] for r in items})
    grid = np.full((len(depths), len(lengths)), np.nan)
    sizes = np.zeros((len(depths), len(lengths)), dtype=int)
    cell: dict[tuple, list[float]] = defaultdict(list)
    for r in items:
        cell[(round(r["depth"], 4), r["length"])].append(r["score"])
    for (d, n), scores in cell.items():
        grid[depths.index(d), lengths.index(n)] = aggregate(
            next(r["metric"] for r in items), scores)
        sizes[depths.index(d), lengths.index(n)] = len(scores)
    return (depths, lengths, grid, sizes) if counts else (depths, lengths, grid)


def cell_text(score: float, n: int) -> str:
    """A heatmap entry: the score, and below it the samples behind it."""
    return f"{score:.0f}\nn={n}"


def _draw_grid(ax, rows, run, task, title):
    depths, lengths, grid, sizes = depth_grid(rows, run, task, counts=True)
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [_length_name(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if grid[i, j] == grid[i, j]:  # not NaN
                ax.text(j, i, cell_text(grid[i, j], sizes[i, j]), ha="center", va="center",
                        fontsize=7)
    ax.set_xlabel("context length (tokens)")
    ax.set_title(title, fontsize=10)
    return image, len(depths), len(lengths)


def plot_heatmap(rows: list[dict], runs, task: str, path: str) -> None:
    """Score by needle depth (rows, 0 at the top) x context length (columns) as a PNG, one panel
    per run (`runs`: a name or a list of names) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [runs] if isinstance(runs, str) else list(runs)
    for run in runs:
        if not depth_grid(rows, run, task)[0]:
            raise ValueError(f"run={run!r} task={task!r}: no samples with a depth to plot")
    sizes = [depth_grid(rows, run, task)[:2] for run in runs]
    height = 1.6 + 0.55 * max(len(d) for d, _ in sizes)
    width = 1.6 + sum(0.9 * len(n) + 0.9 for _, n in sizes)
    fig, axes = plt.subplots(1, len(runs), figsize=(width, height), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, run in zip(axes[0], runs):
        image, _, _ = _draw_grid(ax, rows, run, task, run if len(runs) > 1 else f"{task} ({run})")
    for ax in axes[0][1:]:
        ax.tick_params(labelleft=False)
    axes[0][0].set_ylabel("needle depth")
    if len(runs) > 1:
        fig.suptitle(task, fontsize=11)
    fig.colorbar(image, ax=list(axes[0]), label="score")
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_reports(workdir: str, rows: list[dict], *, extra: dict | None = None,
                  heatmaps: bool = True) -> dict:
    """summary.json, results.md, results.csv and heatmap_<run>_<task>.png for every (run, task)
    with depths, all from one call. Returns the summary (with `files`)."""
    summary = summarize(rows)
    if extra:
        summary.update(extra)
    files = {"summary": "summary.json", "markdown": "results.md", "csv": "results.csv"}
    if heatmaps:
        keys = sorted({(r.get("run", "eval"), r["task"]) for r in rows
                       if r.get("depth") is not None})
        for run, task in keys:
            name = f"heatmap_{_safe(run)}_{_safe(task)}.png"
            plot_heatmap(rows, run, task, os.path.join(workdir, name))
            files[f"heatmap/{run}/{task}"] = name
        for task in sorted({task for _, task in keys}):
            runs = [run for run, t in keys if t == task]
            if len(runs) > 1:  # every run of the task side by side
                name = f"heatmaps_{_safe(task)}.png"
                plot_heatmap(rows, runs, task, os.path.join(workdir, name))
                files[f"heatmaps/{task}"] = name
    summary["files"] = files
    _write_atomic(os.path.join(workdir, "results.md"), markdown_table(summary))
    _write_atomic(os.path.join(workdir, "results.csv"), csv_table(summary))
    _write_atomic(os.path.join(workdir, "summary.json"),
                  json.dumps(summary, indent=1) + "\n")
    return summary


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
