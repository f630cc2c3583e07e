"""Data: reading records, chat formatting with a response-only loss mask (the tasks are in :mod:`gradsift.tasks`)."""

from gradsift.data.formatting import IGNORE_INDEX, collate, encode, encode_records, length_batches
from gradsift.data.records import RecordError, read_records, read_rows

__all__ = [
    "IGNORE_INDEX",
    "RecordError",
    "collate",
    "encode",
    "encode_records",
    "length_batches",
    "read_records",
    "read_rows",
]
