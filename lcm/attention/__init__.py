"""One attention entry point over interchangeable backends, and masks as values."""

from lcm.attention.attend import IMPLS, attend
from lcm.attention.layout import FULL, PARTIAL, SKIP, BlockLayout, mask_layout
from lcm.attention.masks import Causal, Document, Local, Mask

__all__ = ["IMPLS", "attend", "BlockLayout", "mask_layout", "SKIP", "PARTIAL", "FULL",
           "Causal", "Document", "Local", "Mask"]
