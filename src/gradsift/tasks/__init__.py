"""Tasks: the datasets of a continual fine-tuning sequence, by name.

:func:`register_task` binds a name to a loader returning a :class:`Task`; the hub tasks
(:mod:`gradsift.tasks.hub`: dolly, gsm8k, medmcqa, squad_v2, alpaca) and the generated
demo tasks (:mod:`gradsift.tasks.demo`) register themselves on import of this package.
:func:`load_task` takes a registered name, a data file or an ``hf:`` source.
"""

from gradsift.tasks.registry import RegisteredTask, Task, load_task, register_task, registered_task, task_names
from gradsift.tasks import hub as hub  # noqa: E402  (registers the hub tasks)
from gradsift.tasks import demo as demo  # noqa: E402  (registers the demo tasks)
from gradsift.tasks.hub import HUB_TASKS, UNANSWERABLE

__all__ = [
    "HUB_TASKS",
    "UNANSWERABLE",
    "RegisteredTask",
    "Task",
    "load_task",
    "register_task",
    "registered_task",
    "task_names",
]
