"""Training metrics: a CSV file (one row per logged step) and, optionally, TensorBoard events."""

from __future__ import annotations

import csv
import io
import os
import warnings


class MetricsWriter:
    """Appends rows `{step, name: value, ...}` to `<directory>/metrics.csv` (and TensorBoard
    event files under `<directory>/tensorboard` with `tensorboard=True`, via tensorboardX).

    `truncate_after(step)` drops rows past `step`, so a run resumed from a checkpoint at `step`
    rewrites the steps it repeats instead of logging them twice. A torn last row (a run killed
    mid-write: no trailing newline) is dropped with a warning; any other row that does not
    parse is a ValueError naming the file and the line.
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
            self._fields, _ = self._parse()
            self._cut_torn_tail()  # the next row must not be glued onto half a row

    def _cut_torn_tail(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def read(self) -> list[dict]:
        """The rows written so far, values as floats (step as int)."""
        return self._parse()[1]

    def _parse(self):
        """(header or None, rows) of the CSV; see the class docstring for bad rows."""
        if not os.path.isfile(self.path):
            return None, []
        with open(self.path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: not UTF-8 text ({e.reason} at byte {e.start})"
                             ) from None
        lines = text.splitlines()
        torn = bool(text) and not text.endswith("\n")
        if not lines:
            return None, []
        fields = next(csv.reader([lines[0]]))
        if torn and len(lines) == 1:  # killed while writing the header
            warnings.warn(f"{self.path}: the header line is incomplete (a killed run?); "
                          f"starting the file over", stacklevel=3)
            return None, []
        if fields[:1] != ["step"]:
            raise ValueError(f"{self.path}: line 1 is {lines[0][:80]!r}; expected a header "
                             f"starting with 'step'")
        if torn:  # even when it parses: its last value may be cut short
            warnings.warn(f"{self.path}: line {len(lines)} is incomplete (a run killed "
                          f"mid-write?); dropping it", stacklevel=3)
            lines = lines[:-1]
        rows = []
        for number, line in enumerate(lines[1:], 2):
            values = next(csv.reader(io.StringIO(line)), [])
            try:
                if len(values) != len(fields):
                    raise ValueError(f"{len(values)} values for {len(fields)} columns")
                rows.append({k: int(v) if k == "step" else float(v)
                             for k, v in zip(fields, values)})
            except ValueError as e:
                raise ValueError(f"{self.path}: line {number} is not a metrics row ({e})"
                                 ) from None
        return fields, rows

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
