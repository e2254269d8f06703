"""Evaluation data: the Record type, tokenizers, synthetic generators, benchmark readers, Grain
pipelines."""

from lcm.data.niah import depth_grid, make_niah, make_ruler_niah
from lcm.data.passkey import make_passkey
from lcm.data.records import Record, record_id
from lcm.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, get_tokenizer

__all__ = ["Record", "record_id", "ByteTokenizer", "HFTokenizer", "Tokenizer", "get_tokenizer",
           "make_passkey", "make_niah", "make_ruler_niah", "depth_grid"]
