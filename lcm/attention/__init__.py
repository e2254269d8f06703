"""One attention entry point over interchangeable backends, and masks as values."""

from lcm.attention.attend import IMPLS, attend
from lcm.attention.data_masks import BlockMask, Document, VerticalSlash
from lcm.attention.layout import FULL, PARTIAL, SKIP, BlockLayout, mask_layout
from lcm.attention.mask_fn import MaskFn
from lcm.attention.masks import Causal, Chunked, Local, Mask, PrefixLM, SinkWindow
from lcm.attention.ring import (LOAD_BALANCE, RingOrder, context_axis_size, make_ring_order,
                                ring_attention, ring_order_for)

__all__ = ["IMPLS", "attend", "BlockLayout", "mask_layout", "SKIP", "PARTIAL", "FULL", "Mask",
           "Causal", "Local", "SinkWindow", "Chunked", "PrefixLM", "Document", "BlockMask",
           "VerticalSlash", "MaskFn", "ring_attention", "RingOrder", "make_ring_order",
           "ring_order_for", "context_axis_size", "LOAD_BALANCE"]
