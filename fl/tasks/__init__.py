"""Tasks (`model.task`): ``seq_cls`` (sequence classification) and ``causal_lm`` (instruction tuning).

See `fl.tasks.base.Task` for the protocol and `register_task` to add one.
"""

from __future__ import annotations

from fl.tasks import causal_lm, classification
from fl.tasks.base import Batch, Task, get_task, register_task, task_names

__all__ = ["Batch", "Task", "causal_lm", "classification", "get_task", "register_task", "task_names"]
