"""The evaluation record every generator and reader returns, and its JSON form.

A `Record` is one model input with its references: the long `context`, the `question` asked about
it, the full `prompt` built from the benchmark's own template, the `answers` and how to score them
(`metric` names a function in `lcm.eval.metrics`). `length` is the target context length in tokens
(the bucket key), `depth` the needle depth in [0, 1] when there is one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from lcm.checks import is_int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record:
    """One evaluation sample. Frozen and JSON-serialisable (`to_json` / `Record.from_json`)."""

    id: str
    task: str
    context: str
    question: str
    prompt: str
    answers: tuple[str, ...]
    all_classes: tuple[str, ...] | None = None
    length: int
    depth: float | None = None
    max_new_tokens: int
    metric: str
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("id", "task", "context", "question", "prompt", "metric"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"Record.{name} is a {type(value).__name__}; expected a str")
        if not self.id:
            raise ValueError("Record.id is empty; expected a unique, stable id")
        if not self.task:
            raise ValueError(f"Record {self.id!r}: task is empty; expected e.g. 'passkey'")
        # Lists (e.g. straight from JSON) become tuples: a record compares equal after a round trip.
        if isinstance(self.answers, (list, tuple)):
            object.__setattr__(self, "answers", tuple(self.answers))
        else:
            raise ValueError(f"Record {self.id!r}: answers={self.answers!r}; expected a tuple "
                             f"of str")
        if not all(isinstance(a, str) for a in self.answers):
            raise ValueError(f"Record {self.id!r}: answers={self.answers!r}; every answer must "
                             f"be a str")
        if self.all_classes is not None:
            if not isinstance(self.all_classes, (list, tuple)) or not all(
                    isinstance(c, str) for c in self.all_classes):
                raise ValueError(f"Record {self.id!r}: all_classes={self.all_classes!r}; "
                                 f"expected None or a tuple of str")
            object.__setattr__(self, "all_classes", tuple(self.all_classes))
        if not is_int(self.length) or self.length < 0:
            raise ValueError(f"Record {self.id!r}: length={self.length!r}; expected an int >= 0 "
                             f"(the target context length in tokens)")
        object.__setattr__(self, "length", int(self.length))  # NumPy ints are not JSON
        if self.depth is not None:
            if (isinstance(self.depth, (bool, np.bool_))
                    or not isinstance(self.depth, (int, float, np.integer, np.floating))
                    or not math.isfinite(self.depth) or not 0.0 <= self.depth <= 1.0):
                raise ValueError(f"Record {self.id!r}: depth={self.depth!r}; expected None or "
                                 f"a float in [0, 1]")
            object.__setattr__(self, "depth", float(self.depth))
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"Record {self.id!r}: max_new_tokens={self.max_new_tokens!r}; "
                             f"expected an int >= 1")
        object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))
        if not isinstance(self.meta, dict):
            raise ValueError(f"Record {self.id!r}: meta is a {type(self.meta).__name__}; "
                             f"expected a JSON-serialisable dict")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["answers"] = list(self.answers)
        d["all_classes"] = None if self.all_classes is None else list(self.all_classes)
        return d

    def to_json(self) -> str:
        """One line of JSON (non-ASCII kept as is)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        fields = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(d) - fields):
            raise ValueError(f"unknown Record fields {unknown}; expected a subset of "
                             f"{sorted(fields)}")
        return cls(**d)

    @classmethod
    def from_json(cls, line: str) -> Record:
        return cls.from_dict(json.loads(line))


def record_id(task: str, length: int, index: int, seed: int, **extra) -> str:
    """A stable id from the arguments a record is a pure function of, e.g.
    'niah_single_1/len=4096/seed=42/idx=7' (extra keys sorted, e.g. depth)."""
    parts = [task, f"len={length}", f"seed={seed}"]
    parts += [f"{k}={extra[k]}" for k in sorted(extra)]
    parts.append(f"idx={index}")
    return "/".join(parts)
