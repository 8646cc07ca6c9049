"""Evaluation tasks: one file each, registered by name in :data:`TASKS`.

Every module of this package is imported here (found with :mod:`pkgutil`, not listed by hand),
so adding a task is one file with its ``register_task`` line, and one test.
"""

import importlib
import pkgutil

from fedtune.eval.tasks.base import TASKS, Task, TaskContext, TaskResult, get_task, register_task, select


def load_task_modules() -> None:
    """Import every task module of this package (each registers its tasks on import)."""
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")


load_task_modules()

__all__ = ["TASKS", "Task", "TaskContext", "TaskResult", "get_task", "load_task_modules", "register_task", "select"]
