"""What every experiment writes into its workdir: a summary JSON and an optional markdown report.

Writes are atomic (temporary file + rename), so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import json
import os
import subprocess


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


def run_peer(peer_python: str, script: str, args: list[str]) -> tuple[list[dict], list[dict]]:
    """Runs a benchmark's peer script (`experiments/<script>`) with the Python of a side
    environment; returns (rows with a "length", the other JSON lines it printed)."""
    python = os.path.expanduser(peer_python)
    if not os.path.isfile(python):
        raise ValueError(f"config.peer_python={peer_python!r} is not a file; point it at a "
                         f"Python with torch and transformers (bash "
                         f"tests/fixtures/make_side_env.sh torch makes .side/torch-venv), or "
                         f"pass '' to skip the peer")
    command = [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), script), *args]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the peer failed ({' '.join(command)}):\n{out.stderr[-3000:]}")
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return [x for x in lines if "length" in x], [x for x in lines if "length" not in x]

