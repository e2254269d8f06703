"""Training metrics: a CSV file (one row per logged step) and, optionally, TensorBoard events."""

from __future__ import annotations

import csv
import os


class MetricsWriter:
    """Appends rows `{step, name: value, ...}` to `<directory>/metrics.csv` (and TensorBoard
    event files under `<directory>/tensorboard` with `tensorboard=True`, via tensorboardX).

    `truncate_after(step)` drops rows past `step`, so a run resumed from a checkpoint at `step`
    rewrites the steps it repeats instead of logging them twice.
    """

    def __init__(self, directory: str, *, tensorboard: bool = False):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.csv")
        self._fields = None
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # optional: only for TensorBoard output

            self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))
        if os.path.isfile(self.path):
            with open(self.path, newline="") as f:
                self._fields = next(csv.reader(f), None)

    def read(self) -> list[dict]:
        """The rows written so far, values as floats (step as int)."""
        if not os.path.isfile(self.path):
            return []
        with open(self.path, newline="") as f:
            return [{k: int(v) if k == "step" else float(v) for k, v in row.items()}
                    for row in csv.DictReader(f)]

    def truncate_after(self, step: int) -> None:
        rows = [r for r in self.read() if r["step"] <= step]
        if self._fields is None:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self._fields)
            writer.writeheader()
            writer.writerows({k: _text(v) for k, v in r.items()} for r in rows)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict) -> None:
        row = {"step": int(step), **{k: float(v) for k, v in sorted(metrics.items())}}
        if self._fields is None:
            self._fields = list(row)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self._fields)
        elif list(row) != self._fields:
            raise ValueError(f"metrics {list(row)} differ from the CSV columns {self._fields}")
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self._fields).writerow({k: _text(v) for k, v in row.items()})
        if self._tb is not None:
            for name, value in row.items():
                if name != "step":
                    self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _text(value) -> str:
    # repr of a Python float round-trips exactly: a resumed run's rows compare bit for bit.
    return str(value) if isinstance(value, int) else repr(float(value))
