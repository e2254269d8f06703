"""Reading benchmark JSONL files from local disk, with errors that name the file and the line."""

from __future__ import annotations

import json
import os
from typing import Iterator, Sequence


def read_jsonl(path, *, required: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """(line number from 1, object) for every non-blank line of a JSONL file.

    Raises ValueError naming the file and line for a missing file, a line that is not JSON, a
    line that is not an object, or one that lacks a `required` field.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg} at column "
                                 f"{e.colno})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{path}, line {number}: a JSON {type(obj).__name__}; expected "
                                 f"an object")
            if missing := [k for k in required if k not in obj]:
                raise ValueError(f"{path}, line {number}: missing fields {missing}; this file "
                                 f"needs {list(required)}")
            yield number, obj
