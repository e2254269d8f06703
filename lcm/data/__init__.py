"""Evaluation data: the Record type, tokenizers, synthetic generators, benchmark readers, Grain
pipelines."""

from lcm.data.jsonl import read_jsonl
from lcm.data.listops import (
                              LRA_VOCAB,
                              ListOpsEncoder,
                              listops_batches,
                              listops_examples,
                              make_listops,
                              read_lra_listops,
)
from lcm.data.longbench import read_longbench, read_longbench_v2
from lcm.data.niah import depth_grid, make_niah, make_ruler_niah
from lcm.data.passkey import make_passkey
from lcm.data.pipeline import (
                              BatchSpec,
                              LengthIndex,
                              Truncation,
                              batch_dataset,
                              encode_batch,
                              length_index,
                              plan_batches,
)
from lcm.data.records import Record, record_id
from lcm.data.tasks import (
                              GENERATORS,
                              RULER_TASKS,
                              SESSIONS,
                              make_record,
                              register,
                              synthetic_dataset,
)
from lcm.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, get_tokenizer

__all__ = [
    "Record", "record_id",
    "Tokenizer", "ByteTokenizer", "HFTokenizer", "get_tokenizer",
    "GENERATORS", "RULER_TASKS", "SESSIONS", "make_record", "register", "synthetic_dataset",
    "make_passkey", "make_niah", "make_ruler_niah", "depth_grid",
    "read_jsonl", "read_longbench", "read_longbench_v2",
    "make_listops", "read_lra_listops", "ListOpsEncoder", "LRA_VOCAB", "listops_examples",
    "listops_batches",
    "Truncation", "LengthIndex", "BatchSpec", "length_index", "plan_batches", "encode_batch",
    "batch_dataset",
]
