"""Evaluation tasks: one file each, registered by name in :data:`TASKS`."""

from fedtune.eval.tasks.base import TASKS, Task, TaskContext, TaskResult, get_task, register_task, select
from fedtune.eval.tasks import gsm8k, heldout, helm_mini, humaneval, imdb, mmlu, nq_open_book, openbookqa  # noqa: F401,E402

__all__ = ["TASKS", "Task", "TaskContext", "TaskResult", "get_task", "register_task", "select"]
