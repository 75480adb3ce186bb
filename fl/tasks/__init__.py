"""Tasks (`model.task`): ``seq_cls`` (sequence classification) and ``causal_lm`` (instruction tuning).

See `fl.tasks.base.Task` for the protocol and `register_task` to add one; `load_base_model` builds a
run's base model through its task.
"""

from __future__ import annotations

from fl.tasks import causal_lm, classification
from fl.tasks.base import Batch, Task, get_task, load_base_model, register_task, task_names

__all__ = [
    "Batch",
    "Task",
    "causal_lm",
    "classification",
    "get_task",
    "load_base_model",
    "register_task",
    "task_names",
]
