"""The argument checks every package uses, written once: each raises a ValueError that names
the argument, the value and what would be valid, before anything is traced.

`owner` names what the argument belongs to: "SnapKV" gives `SnapKV.window_size=0; ...`, and
with `call=True` `Local(window=0); ...` (the spelling of a constructor call); None gives the
bare name (`max_new_tokens=-1; ...`).
"""

from __future__ import annotations

import math

import numpy as np


def label(owner, name: str, value, *, call: bool = False) -> str:
    """How an error names the argument: `Owner.name=value`, `Owner(name=value)` or
    `name=value`."""
    if owner is None:
        return f"{name}={value!r}"
    return f"{owner}({name}={value!r})" if call else f"{owner}.{name}={value!r}"


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(owner, name: str, value, minimum: int | None = None, maximum: int | None = None,
              *, call: bool = False, why: str | None = None) -> None:
    """Raises unless value is an int in [minimum, maximum] (either bound may be None)."""
    if is_int(value) and (minimum is None or value >= minimum) and (
            maximum is None or value <= maximum):
        return
    if maximum is None:
        allowed = ("an int" if minimum is None else "a positive int" if minimum == 1
                   else f"an int >= {minimum}")
    else:
        allowed = f"an int in [{minimum}, {maximum}]" + (f" ({why})" if why else "")
    raise ValueError(f"{label(owner, name, value, call=call)}; expected {allowed}")


def check_number(owner, name: str, value, lo=-math.inf, hi=math.inf, *, lo_open=False,
                 hi_open=False, call: bool = False) -> None:
    """Raises unless value is a finite number in the interval (bools refused)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{label(owner, name, value, call=call)}; expected a number in "
                         f"{interval}")


def check_choice(owner, name: str, value, allowed, *, call: bool = False) -> None:
    """Raises unless value is one of allowed."""
    if value not in allowed:
        raise ValueError(f"{label(owner, name, value, call=call)}; expected one of "
                         f"{list(allowed)}")
