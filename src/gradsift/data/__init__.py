"""Data: reading records, chat formatting with a response-only loss mask, the task registry."""

from gradsift.data.formatting import IGNORE_INDEX, collate, encode, encode_records, length_batches
from gradsift.data.records import RecordError, read_records, read_rows
from gradsift.data.tasks import TASKS, UNANSWERABLE, Task, TaskSpec, load_task, task_names

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "UNANSWERABLE",
    "RecordError",
    "Task",
    "TaskSpec",
    "collate",
    "encode",
    "encode_records",
    "length_batches",
    "load_task",
    "read_records",
    "read_rows",
    "task_names",
]
