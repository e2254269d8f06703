"""What every experiment writes into its workdir: a summary JSON and an optional markdown report.

Writes are atomic (temporary file + rename), so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import json
import os


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically, creating parent directories."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_summary(workdir: str, summary: dict, *, markdown: str | None = None) -> dict:
    """Writes `summary.json` (and `results.md` when given) to `workdir`; returns `summary`."""
    write_text(os.path.join(workdir, "summary.json"),
               json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    if markdown is not None:
        write_text(os.path.join(workdir, "results.md"), markdown.rstrip() + "\n")
    return summary
