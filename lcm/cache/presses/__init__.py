"""KV-cache presses, one module each, behind one protocol (`lcm.cache.presses.base`).

`PRESSES` lists every registered press by class name; `press_from_name("SnapKV",
compression_ratio=0.5)` builds one for configs. Writing a press: see `base.py`'s docstring;
registering it is its `@register` and one import line here.
"""

from lcm.cache.presses.adakv import AdaKV as AdaKV
from lcm.cache.presses.base import PRESSES, CacheFormat, Needs, Press, ScorerPress, register
from lcm.cache.presses.decoding import Decoding as Decoding
from lcm.cache.presses.duo import DuoAttention as DuoAttention
from lcm.cache.presses.expected_attention import ExpectedAttention as ExpectedAttention
from lcm.cache.presses.h2o import H2O as H2O
from lcm.cache.presses.keydiff import KeyDiff as KeyDiff
from lcm.cache.presses.kivi import KIVI as KIVI
from lcm.cache.presses.knorm import Knorm as Knorm
from lcm.cache.presses.lagkv import LagKV as LagKV
from lcm.cache.presses.merging import Merging as Merging
from lcm.cache.presses.observed_attention import ObservedAttention as ObservedAttention
from lcm.cache.presses.pyramidkv import PyramidKV as PyramidKV
from lcm.cache.presses.quest import Quest as Quest
from lcm.cache.presses.snapkv import SnapKV as SnapKV
from lcm.cache.presses.streaming_llm import StreamingLLM as StreamingLLM
from lcm.cache.presses.tova import TOVA as TOVA


def press_from_name(name: str, **kwargs) -> Press:
    """A press by its class name (`press_from_name("SnapKV", compression_ratio=0.5)`), for
    configs; unknown names raise ValueError listing the choices."""
    if name not in PRESSES:
        raise ValueError(f"policy={name!r}; expected one of {sorted(PRESSES)}")
    return PRESSES[name](**kwargs)


__all__ = ["PRESSES", "Press", "ScorerPress", "CacheFormat", "Needs", "register",
           "press_from_name", *sorted(PRESSES)]
